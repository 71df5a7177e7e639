"""Inference: a model's predictions for a seqio task, written as JSON lines.

    python -m moe.infer --gin_file=models/<model>.gin --gin_file=runs/infer.gin \
        --gin.CHECKPOINT_PATH="'/tmp/run/checkpoints'" --gin.INFER_OUTPUT_DIR="'/tmp/infer'" \
        --gin.MIXTURE_OR_TASK_NAME="'super_glue_boolq_v102'" --gin.TASK_FEATURE_LENGTHS=...

The checkpoint, the task and the `seqio.Evaluator` (whose cached datasets give the examples)
are set up as `moe.eval` sets them up (`moe.evaluation`), and the model decodes as it does for
evaluation.
"""

import sys

import moe.start_up  # noqa: F401 - first: before JAX and TensorFlow load

if __name__ == "__main__":
    from moe.infer import main  # gin registers the importable module's configurables once

    sys.exit(main())

import json
from collections.abc import Sequence
from typing import Any

import gin
import seqio

from moe import data, evaluation, file_io
from moe.entry_point import run_entry_point


@gin.configurable
def infer(
    model: Any = gin.REQUIRED,
    checkpoint_path: str = gin.REQUIRED,
    dataset_cfg: data.DatasetConfig = gin.REQUIRED,
    output_dir: str = gin.REQUIRED,
    num_expert_partitions: int = 1,
    num_model_partitions: int = 1,
    checkpoint_step: int | None = None,
    num_examples: int | None = None,
    decode_method: str = "greedy",
) -> str:
    """Write `output_dir/<task>-<split>.jsonl`: one line per example with its inputs, target and
    prediction (decoded with the task's vocabulary). Returns the path. `output_dir` may be a
    `gs://` URL (`moe.file_io`)."""
    restored = evaluation.restore_for_inference(
        model, checkpoint_path, dataset_cfg, output_dir, num_expert_partitions,
        num_model_partitions, checkpoint_step,
    )  # fmt: skip
    evaluator = evaluation.make_evaluator(model, dataset_cfg, num_examples)
    predict = evaluation.make_predict_fn(model, restored.params, restored.partitioner,
                                         dataset_cfg.batch_size, restored.router_state,
                                         decode_method=decode_method)
    path = file_io.join(output_dir, f"{restored.task.name}-{dataset_cfg.split}.jsonl")
    lines = []
    for sub_task in evaluator.eval_tasks:
        vocab = sub_task.output_features["targets"].vocabulary
        ds = evaluator.cached_model_datasets[sub_task.name]
        examples = list(evaluator.cached_task_datasets[sub_task.name].as_numpy_iterator())
        for index, tokens in sorted(predict(ds)):
            example = examples[index]
            record = {"task": sub_task.name, "index": index,
                      "prediction": vocab.decode(_until_eos(tokens, vocab))}
            for feature in ("inputs", "targets"):
                if feature in example:
                    record[feature] = vocab.decode([int(t) for t in example[feature] if t != 0])
            lines.append(json.dumps(record) + "\n")
    # Complete or absent: a run killed while decoding leaves no partial predictions file.
    file_io.write_atomically(path, "".join(lines))
    print(f"Wrote predictions to {path}", flush=True)
    return path


def _until_eos(tokens: Sequence[int], vocab: seqio.Vocabulary) -> list[int]:
    out = []
    for t in tokens:
        if t == vocab.eos_id:
            break
        out.append(int(t))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return run_entry_point("Write a model's predictions for a seqio task as JSONL.", infer, argv)[0]
