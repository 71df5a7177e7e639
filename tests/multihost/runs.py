"""Helpers of the multi-host tests: toy training runs as local clusters, their losses and params.

Every run is `python -m moe.train` on the toy MoE model of `tests/trainer/toy.py`, started by
`moe.local_cluster` as N processes x D emulated CPU devices that form one JAX cluster.

Why the runs are comparable across process counts: seqio's `ShardInfo` gives host i every
N-th example, so with `shuffle=False` each step's global batch holds the same examples under
any number of processes, only in another row order (host-major). The toy model is given
enough expert capacity that no token is dropped, which makes a step independent of the row
order up to float summation order; the tests then demand the same losses and parameters.
"""

import json
import os
import pathlib
from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from moe import local_cluster

REPO = pathlib.Path(__file__).resolve().parents[2]
# Generous bound for one short run on a loaded 2-core machine (start-up + compilation).
RUN_TIMEOUT = 420


# The toy MoE model of tests/trainer/toy.py with room for every token (no drops).
TOY_MODEL = ("--gin_file=tests/trainer/toy_model.gin", "--gin.ToyModel.capacity_factor=8.0")
# The real decoder-only sparse model (2 layers, 8 experts, top-2), no drops, no dropout.
DECODER_ONLY_TINY = ("--gin_file=models/decoder_only_tiny.gin",
                     "--gin.TRAIN_EXPERT_CAPACITY_FACTOR=8.0",
                     "--gin.EVAL_EXPERT_CAPACITY_FACTOR=8.0",
                     "--gin.DatasetConfig.module='tests.trainer.toy'")


def toy_train_args(model_dir: str, steps: int, extra: Sequence[str] = (),
                   model: Sequence[str] = TOY_MODEL) -> list[str]:
    """`moe.train` arguments: `model` on the toy task, no shuffle, a checkpoint every step."""
    return [
        *model,
        "--gin_file=runs/pretrain.gin",
        f"--gin.MODEL_DIR='{model_dir}'",
        "--gin.MIXTURE_OR_TASK_NAME='toy_trainer_lm'",
        "--gin.TASK_FEATURE_LENGTHS={'targets': 16}",
        f"--gin.TRAIN_STEPS={steps}",
        "--gin.BATCH_SIZE=8",
        "--gin.PACK=False",
        "--gin.LOG_PERIOD=1",
        "--gin.CHECKPOINT_PERIOD=1",
        "--gin.train/DatasetConfig.shuffle=False",
        "--gin.train.eval_dataset_cfg=None",
        "--gin.train.write_plots=False",
        # A learning rate large enough that parameters move visibly in a few steps.
        "--gin.rsqrt_decay_schedule.warmup_steps=10",
        *extra,
    ]


def start(num_processes: int, devices_per_process: int, args: Sequence[str],
          **kwargs) -> local_cluster.LocalCluster:
    kwargs.setdefault("echo", None)
    return local_cluster.LocalCluster(num_processes, devices_per_process, args, cwd=str(REPO),
                                      **kwargs).start()


def finish(cluster: local_cluster.LocalCluster,
           timeout: float = RUN_TIMEOUT) -> list[local_cluster.ProcessResult]:
    """Wait for `cluster` and fail with every process's output if any process failed."""
    results = cluster.wait(timeout)
    if any(r.returncode != 0 for r in results):
        logs = "\n".join(f"--- process {r.process_id} (status {r.returncode}) ---\n"
                         f"{r.output[-6000:]}" for r in results)
        raise AssertionError(f"A process of the local cluster failed:\n{logs}")
    return results


def losses(model_dir: str) -> dict[int, float]:
    """Step -> training loss, from process 0's `train/metrics.jsonl`."""
    with open(os.path.join(model_dir, "train", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"steps logged more than once: {steps}"
    return {r["step"]: r["loss"] for r in records}


def checkpoint_params(model_dir: str, step: int) -> dict:
    """The parameters saved at `step`, read onto this process's first device as numpy."""
    state_dir = os.path.join(model_dir, "checkpoints", str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(state_dir)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return jax.tree.map(np.asarray, checkpointer.restore(state_dir, abstract)["params"])


def leaf_moves(params: dict, start: dict) -> dict:
    """Per leaf, the largest change of one value from `start` to `params`."""
    return jax.tree.map(lambda x, x0: float(np.abs(x - x0).max()), params, start)


def assert_same_params(a: dict, b: dict, atol: float = 1e-5, moves: dict | None = None,
                       move_rtol: float = 1e-4) -> None:
    """`a` equals `b` up to float32 summation order.

    With `moves` (`leaf_moves` of the run over its last steps), each leaf's absolute tolerance
    grows to `move_rtol` times how far that leaf moved: rounding that the two process layouts
    sum in a different order scales with the update. Measured on an AMD EPYC (AVX-512) after 3
    steps of the tiny decoder-only model: the token embedding moved 0.40 and differed by 1.9e-5
    between 2x4 and 1x8, every other leaf by at most 1.5e-6. A sharding or collective bug
    differs by the order of the move itself, far above the tolerance.
    """
    assert jax.tree.structure(a) == jax.tree.structure(b)
    tolerances = jax.tree.map(lambda _: atol, a) if moves is None else jax.tree.map(
        lambda move: max(atol, move_rtol * move), moves)
    jax.tree.map(lambda x, y, tol: np.testing.assert_allclose(x, y, rtol=1e-5, atol=tol),
                 a, b, tolerances)
