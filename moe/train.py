"""Train, continue, fine-tune or upcycle a model from gin files: `python -m moe.train`.

    python -m moe.train --gin_file=models/tokens_choose_tiny.gin --gin_file=runs/pretrain.gin \
        --gin.MODEL_DIR="'/tmp/run'" --gin.MIXTURE_OR_TASK_NAME="'pydoc_topics_span_corruption'" \
        --gin.TASK_FEATURE_LENGTHS="{'inputs': 64, 'targets': 16}" --gin.TRAIN_STEPS=200

What `train` does, in order: check MODEL_DIR is writable and the task exists (fail before any
compilation), write the gin config to MODEL_DIR, build the mesh and the trainer, then take the
state from (1) the latest checkpoint in MODEL_DIR/checkpoints (resume, including the data
position), else (2) INITIAL_CHECKPOINT_PATH through an assignment map (fine-tuning, sparse
upcycling; fresh optimizer), else (3) a fresh initialization. Then it trains, evaluating every
eval period, and ends with a final checkpoint, evaluation and plots.
"""

import sys

import moe.start_up  # noqa: F401 - first: before JAX and TensorFlow load

if __name__ == "__main__":
    # Run the importable `moe.train`, so that gin registers its configurables once (as
    # `moe.train.train`, not also as `__main__.train`).
    from moe.train import main

    sys.exit(main())

import logging
import os
from collections.abc import Sequence
from typing import Any

import gin
import jax

from moe import checkpoints, compilation_cache, data, file_io, optimizer_transfer
from moe import eval as moe_eval
from moe.entry_point import run_entry_point
from moe.metrics_writer import MetricsWriter
from moe.partitioning import Partitioner
from moe.routing.shell import ROUTER_STATE
from moe.trainer import Trainer, log_param_table, train_loop


def input_shapes_for(
    feature_converter: Any, task_feature_lengths: dict[str, int], batch_size: int
) -> dict[str, tuple[int, int]]:
    """Global batch shapes of the model features (T5X: from the feature converter)."""
    lengths = feature_converter.get_model_feature_lengths(task_feature_lengths)
    return {name: (batch_size, length) for name, length in lengths.items()}


def make_eval_fn(trainer, cfg, feature_converter, layout, model_dir, eval_steps, inference_eval,
                 resume_step=None):
    """`eval_fn(state, step)`: teacher-forced metrics on `cfg` (and seqio.Evaluator metrics).

    `resume_step`: eval rows a previous run logged past it are dropped (`MetricsWriter`).
    """
    writer = MetricsWriter(os.path.join(model_dir, "training_eval", cfg.mixture_or_task_name),
                           resume_step=resume_step)

    def eval_fn(state, step):
        ds = data.get_dataset(cfg, feature_converter, layout.shard_id, layout.num_shards,
                              drop_remainder=False)
        if eval_steps:
            ds = ds.take(eval_steps)
        router_state = state.get(ROUTER_STATE)
        metrics = trainer.evaluate(state["params"], ds.as_numpy_iterator(), router_state)
        scalars = writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})
        if inference_eval:
            task_metrics = moe_eval.inference_metrics(
                trainer.model, state["params"], trainer.partitioner, cfg,
                router_state=router_state,
            )
            scalars.update(writer.write(step, {f"inference_eval/{k}": v
                                               for k, v in task_metrics.items()}))
        writer.console(step, {k.removeprefix("eval/"): v for k, v in scalars.items()},
                       prefix="eval")
        return scalars

    return eval_fn


@gin.configurable
def train(
    model: Any = gin.REQUIRED,
    model_dir: str = gin.REQUIRED,
    train_dataset_cfg: data.DatasetConfig = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    num_expert_partitions: int = 1,
    num_model_partitions: int = 1,
    partitioner: Partitioner | None = None,
    eval_dataset_cfg: data.DatasetConfig | None = None,
    eval_period: int = 1000,
    eval_steps: int | None = 20,
    inference_eval: bool = False,
    checkpoint_period: int = 1000,
    keep_checkpoints: int | None = None,
    async_checkpoints: bool = True,
    log_period: int = 100,
    progress_interval_s: float | None = 30.0,
    initial_checkpoint_path: str | None = None,
    assignment_map: checkpoints.AssignmentMap = (),
    fallback_to_scratch: bool = False,
    strict_restore: bool = True,
    use_checkpoint_optimizer_state: bool = True,
    write_plots: bool = True,
    resume_step: int | None = None,
) -> dict[str, Any]:
    """Train `model` on `train_dataset_cfg` for `train_steps` steps in total (see module doc).

    `resume_step` resumes from that checkpoint of MODEL_DIR instead of the latest; the later
    checkpoints are deleted, since training replaces them.

    INITIAL_CHECKPOINT_PATH may be one of ours or a T5X checkpoint (see
    `moe.checkpoint_sources`). `strict_restore`: a checkpoint parameter that no model parameter
    takes is an error. `use_checkpoint_optimizer_state`: Adafactor's statistics come from the
    checkpoint when they fit the model's optimizer (T5X restores them too), else the
    optimizer starts fresh; either way a line says which (`moe.optimizer_transfer`).
    `progress_interval_s`: between log periods, a console progress line (step, steps/s, ETA)
    at least this often (None: only every `log_period`).
    Returns `{'reason': 'done' | 'preempted', 'step': int, 'eval': last eval scalars or None}`.
    """
    checkpoints.directory_is_writable(model_dir)
    data.get_task(train_dataset_cfg)
    if eval_dataset_cfg is not None:
        data.get_task(eval_dataset_cfg)
    if jax.process_index() == 0:
        file_io.write_text(file_io.join(model_dir, "config.gin"), gin.config_str())

    partitioner = partitioner or Partitioner(num_expert_partitions, num_model_partitions)
    layout = partitioner.get_data_layout(train_dataset_cfg.batch_size)
    converter = model.feature_converter_cls(pack=train_dataset_cfg.pack)
    shapes = input_shapes_for(converter, dict(train_dataset_cfg.task_feature_lengths),
                              train_dataset_cfg.batch_size)
    trainer = Trainer(model=model, partitioner=partitioner, input_shapes=shapes)
    # The train step compiles in the background (XLA releases the GIL) while the state is
    # restored or initialized and the input pipeline starts; the first step finds it compiled.
    step_compiled = compilation_cache.compile_in_background(trainer.lower_train_step())

    checkpointer = checkpoints.Checkpointer(
        os.path.join(model_dir, "checkpoints"), checkpoint_period, keep_checkpoints,
        async_checkpoints,
    )
    data_state: dict[str, Any] = {}
    resuming = checkpointer.latest_step() is not None
    if resuming:
        state, data_state = checkpointer.restore(trainer.abstract_state, resume_step)
        if resume_step is not None:
            checkpointer.delete_after(resume_step)
        print(f"Resuming from step {int(state['step'])} in {model_dir}.", flush=True)
    # The input pipeline starts in the background now, while the model initializes/compiles.
    batches = data.ResumableIterator(
        lambda: data.get_dataset(train_dataset_cfg, converter, layout.shard_id, layout.num_shards),
        batches_consumed=int(data_state.get("batches_consumed", 0)),
    )
    if not resuming:
        state = trainer.init_state()
        if initial_checkpoint_path:
            params, report = checkpoints.restore_params_from(
                initial_checkpoint_path, state["params"], assignment_map, fallback_to_scratch,
                strict=strict_restore, model_config=getattr(model.module, "config", None),
            )
            state = trainer.state_with_params(state, params)
            fresh = sorted(k for k, v in report.items() if v == "initialized")
            print(f"Initialized from {initial_checkpoint_path}: {len(report) - len(fresh)} "
                  f"parameters restored, fresh: {fresh}", flush=True)
            if use_checkpoint_optimizer_state:
                state, line = optimizer_transfer.carry_over_statistics(
                    state, initial_checkpoint_path, trainer.factor_specs)
                print(line, flush=True)
    table = log_param_table(state["params"], trainer.logical_param_specs, trainer.param_shardings)
    logging.info("Parameters:\n%s", table)
    if jax.process_index() == 0:
        file_io.write_text(file_io.join(model_dir, "parameters.txt"),
                           f"mesh {dict(partitioner.mesh.shape)}\n{table}\n")
        print(table.splitlines()[-1], f"on mesh {dict(partitioner.mesh.shape)}", flush=True)

    # Rows logged past the step this run starts from (by a run killed after its last
    # checkpoint) are dropped: the steps are trained again.
    start_step = int(jax.device_get(state["step"]))
    writer = MetricsWriter(os.path.join(model_dir, "train"), total_steps=train_steps,
                           resume_step=start_step)
    eval_fn = None
    last_eval: dict[str, Any] = {}
    if eval_dataset_cfg is not None:
        evaluate = make_eval_fn(trainer, eval_dataset_cfg, converter, layout, model_dir,
                                eval_steps, inference_eval, resume_step=start_step)
        eval_fn = lambda s, step: last_eval.update(evaluate(s, step))
    # Tokens per step: every input and target position of the batch (padding included).
    tokens = train_dataset_cfg.batch_size * sum(train_dataset_cfg.task_feature_lengths.values())
    try:
        step_compiled.result()  # its compile error, if any, is the first step's
        state, reason = train_loop(
            trainer, state, batches, train_steps, checkpointer, writer,
            log_period=log_period, eval_period=eval_period, eval_fn=eval_fn,
            tokens_per_batch=tokens, progress_interval_s=progress_interval_s,
        )
    finally:
        batches.close()
    writer.close()
    checkpointer.close()
    if jax.process_index() == 0:
        file_io.write_text(file_io.join(model_dir, "operative_config.gin"),
                           gin.operative_config_str())
        if write_plots and reason == "done":
            from moe import plots

            path = plots.write_training_plot(model_dir)
            print(f"Plot written to {path}", flush=True)
    return {"reason": reason, "step": int(jax.device_get(state["step"])),
            "eval": last_eval or None}


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    code, result = run_entry_point(
        "Train a model configured by gin files (T5X style).", train, argv
    )
    if code == 0:
        print(f"Training {result['reason']} at step {result['step']}.", flush=True)
    return code

