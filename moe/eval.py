"""Evaluation of a checkpoint with `seqio.Evaluator`: the task's own metrics.

    python -m moe.eval --gin_file=models/<model>.gin --gin_file=runs/eval.gin \
        --gin.CHECKPOINT_PATH="'/tmp/ft/checkpoints'" --gin.EVAL_OUTPUT_DIR="'/tmp/eval'" \
        --gin.MIXTURE_OR_TASK_NAME="'super_glue_boolq_v102'" --gin.TASK_FEATURE_LENGTHS=...

The evaluator sorts a task's metric functions into prediction metrics (decoded outputs:
accuracy, F1, ...) and score metrics (log-likelihoods: rank classification,
multiple_choice_grade); this module hands it the model's predict and score functions. For a
BIG-bench task with subtasks, the printed metrics end with the parent's aggregate as BIG-bench
reports it (`seqio_tasks/bigbench/aggregate.py`): each metric's unweighted mean over the
subtasks and `normalized_aggregate_score`. `MIXTURE_OR_TASK_NAME` may name a BIG-bench task of
the folder bound to `seqio_tasks.config.data_paths.bigbench_dir` (see `moe.evaluation`).
"""

import sys

import moe.start_up  # noqa: F401 - first: before JAX and TensorFlow load

if __name__ == "__main__":
    from moe.eval import main  # gin registers the importable module's configurables once

    sys.exit(main())

import json
from collections.abc import Sequence
from typing import Any

import gin
import seqio

from moe import data, evaluation, file_io
from moe.entry_point import run_entry_point
from moe.partitioning import Partitioner


def _uses(task: seqio.Task | seqio.Mixture, kind: str) -> bool:
    tasks = task.tasks if isinstance(task, seqio.Mixture) else [task]
    return any(getattr(t, f"{kind}_metric_fns") for t in tasks)


def inference_metrics(
    model: Any,
    params: Any,
    partitioner: Partitioner,
    cfg: data.DatasetConfig,
    num_examples: int | None = None,
    router_state: Any = None,
) -> dict[str, float]:
    """`{'<task>/<metric>': value}` from `seqio.Evaluator` on `cfg`'s split; for a BIG-bench
    task with subtasks also its aggregate, `'<name>/<metric>'` (see `moe.evaluation`)."""
    task = data.get_task(cfg)
    evaluator = evaluation.make_evaluator(model, cfg, num_examples)
    predict_fn = score_fn = None
    if _uses(task, "predict"):
        predict_fn = evaluation.make_predict_fn(model, params, partitioner, cfg.batch_size,
                                                router_state)
    if _uses(task, "score"):
        score_fn = evaluation.make_score_fn(model, params, partitioner, cfg.batch_size,
                                            router_state)
    return evaluation.evaluator_metrics(evaluator, cfg, predict_fn, score_fn)


@gin.configurable
def evaluate(
    model: Any = gin.REQUIRED,
    checkpoint_path: str = gin.REQUIRED,
    dataset_cfg: data.DatasetConfig = gin.REQUIRED,
    output_dir: str = gin.REQUIRED,
    num_expert_partitions: int = 1,
    num_model_partitions: int = 1,
    checkpoint_step: int | None = None,
    num_examples: int | None = None,
) -> dict[str, float]:
    """Evaluate a checkpoint; writes `output_dir/metrics.json` (`output_dir` may be a `gs://`
    URL: `moe.file_io`) and returns the metrics."""
    restored = evaluation.restore_for_inference(
        model, checkpoint_path, dataset_cfg, output_dir, num_expert_partitions,
        num_model_partitions, checkpoint_step,
    )  # fmt: skip
    metrics = inference_metrics(
        model, restored.params, restored.partitioner, dataset_cfg, num_examples,
        restored.router_state,
    )
    file_io.write_atomically(file_io.join(output_dir, "metrics.json"),
                             json.dumps(metrics, indent=2, sort_keys=True))
    for name, value in sorted(metrics.items()):
        print(f"{name}: {value:.4f}", flush=True)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    description = "Evaluate a checkpoint on a seqio task with its metrics."
    return run_entry_point(description, evaluate, argv)[0]
