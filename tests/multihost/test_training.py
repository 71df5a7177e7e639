"""Training on a real local JAX cluster: 2 processes x 4 devices against 1 process x 8.

Each test starts real processes (`moe.local_cluster`) that join one cluster over 127.0.0.1
with gloo collectives, the code path of the hosts of a TPU pod slice.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moe import local_cluster
from tests.multihost import runs

# The expert axis spans both processes: 8 experts over an expert axis of 8 devices, the batch
# split 8 ways, so each process holds half of the experts and half of the batch.
EXPERTS_ACROSS_PROCESSES = ("--gin.NUM_EXPERT_PARTITIONS=8", "--gin.ToyModel.num_experts=8")
# The expert axis inside each process, the data axis across them: mesh (data 4, expert 2).
DATA_ACROSS_PROCESSES = ("--gin.NUM_EXPERT_PARTITIONS=2",)
# Evaluation at the last step on 9 validation examples, read as 4 + 4 per global batch of 8:
# host 0 has 2 eval batches, host 1 only 1. Every host must keep stepping (zero-weight
# padding) until all are done, and the metrics must be those of one process.
UNEVEN_EVAL = ("--gin.MIXTURE_OR_TASK_NAME='multihost_uneven_lm'",
               "--gin.DatasetConfig.module='tests.multihost.uneven_task'",
               "--gin.train.eval_dataset_cfg=@train_eval/DatasetConfig()",
               "--gin.EVAL_PERIOD=1000", "--gin.EVAL_STEPS=None")


def _eval_metrics(model_dir):
    path = os.path.join(model_dir, "training_eval", "multihost_uneven_lm", "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f][-1]


def _train_both(tmp_path, steps, extra, name="run", model=runs.TOY_MODEL):
    one_dir, two_dir = str(tmp_path / f"{name}_1x8"), str(tmp_path / f"{name}_2x4")
    one = runs.start(1, 8, runs.toy_train_args(one_dir, steps, extra, model))
    two = runs.start(2, 4, runs.toy_train_args(two_dir, steps, extra, model))
    return one_dir, runs.finish(one), two_dir, runs.finish(two)


def _assert_equivalent(one_dir, two_dir, steps):
    one_losses, two_losses = runs.losses(one_dir), runs.losses(two_dir)
    assert sorted(one_losses) == sorted(two_losses) == list(range(1, steps + 1))
    np.testing.assert_allclose([two_losses[s] for s in sorted(two_losses)],
                               [one_losses[s] for s in sorted(one_losses)], rtol=0, atol=1e-5)
    one_params = runs.checkpoint_params(one_dir, steps)
    moves = runs.leaf_moves(one_params, runs.checkpoint_params(one_dir, 1))
    runs.assert_same_params(one_params, runs.checkpoint_params(two_dir, steps), moves=moves)
    # The comparison means something only if training moved the parameters.
    assert max(jax.tree.leaves(moves)) > 1e-4


def test_two_processes_train_like_one_and_checkpoints_cross_over(tmp_path):
    """2x4 == 1x8 (losses, parameters, evaluation on uneven host shards) with the expert axis
    across processes; then each run's checkpoint resumes under the other process count and
    both continue identically."""
    steps = 2
    extra = EXPERTS_ACROSS_PROCESSES + UNEVEN_EVAL
    one_dir, one_results, two_dir, two_results = _train_both(tmp_path, steps, extra)
    for results in (one_results, two_results):
        assert "on mesh {'data': 1, 'expert': 8, 'model': 1}" in results[0].output
    # Summaries and progress lines come from process 0 only.
    assert "[train] step" in two_results[0].output
    assert "[train] step" not in two_results[1].output
    _assert_equivalent(one_dir, two_dir, steps)
    one_eval, two_eval = _eval_metrics(one_dir), _eval_metrics(two_dir)
    assert one_eval["step"] == two_eval["step"] == steps
    assert one_eval["eval/num_tokens"] == two_eval["eval/num_tokens"] > 0
    for key in ("eval/loss", "eval/accuracy"):
        np.testing.assert_allclose(two_eval[key], one_eval[key], rtol=0, atol=1e-5)

    # Cross-over: the 1-process checkpoint resumes on 2 processes and vice versa.
    one_then_two, two_then_one = str(tmp_path / "1x8_then_2x4"), str(tmp_path / "2x4_then_1x8")
    shutil.copytree(one_dir, one_then_two)
    shutil.copytree(two_dir, two_then_one)
    total = steps + 1
    a = runs.start(2, 4, runs.toy_train_args(one_then_two, total, extra))
    b = runs.start(1, 8, runs.toy_train_args(two_then_one, total, extra))
    a_results, b_results = runs.finish(a), runs.finish(b)
    for results in (a_results, b_results):
        assert f"Resuming from step {steps}" in results[0].output
    a_losses, b_losses = runs.losses(one_then_two), runs.losses(two_then_one)
    assert sorted(a_losses) == sorted(b_losses) == list(range(1, total + 1))
    np.testing.assert_allclose(a_losses[total], b_losses[total], rtol=0, atol=1e-5)
    runs.assert_same_params(runs.checkpoint_params(one_then_two, total),
                            runs.checkpoint_params(two_then_one, total))


@pytest.mark.slow
def test_two_processes_train_like_one_with_data_axis_across_processes(tmp_path):
    steps = 4
    one_dir, one_results, two_dir, _ = _train_both(tmp_path, steps, DATA_ACROSS_PROCESSES)
    assert "on mesh {'data': 4, 'expert': 2, 'model': 1}" in one_results[0].output
    _assert_equivalent(one_dir, two_dir, steps)


@pytest.mark.slow
def test_the_real_decoder_only_model_trains_alike_on_2x4_and_1x8(tmp_path):
    """The sparse decoder-only model (attention, MoE layer with its all-to-all over an expert
    axis spanning both processes), not only the toy."""
    steps = 3
    one_dir, one_results, two_dir, _ = _train_both(
        tmp_path, steps, ("--gin.NUM_EXPERT_PARTITIONS=8",), name="decoder_only",
        model=runs.DECODER_ONLY_TINY)
    assert "on mesh {'data': 1, 'expert': 8, 'model': 1}" in one_results[0].output
    _assert_equivalent(one_dir, two_dir, steps)


def _kill_and_time(tmp_path, victim):
    """Kill process `victim` of a running 2-process job; return (survivor result, seconds)."""
    heartbeat = 10
    args = runs.toy_train_args(str(tmp_path / "killed"), 100000,
                               ("--gin.CHECKPOINT_PERIOD=100000",))
    cluster = runs.start(2, 4, args, heartbeat_timeout=heartbeat, stop_on_failure=False)
    deadline = time.monotonic() + runs.RUN_TIMEOUT
    while "[train] step 2/" not in cluster.output(0):
        assert all(p.poll() is None for p in cluster.processes), (
            "a process ended before training started:\n" + cluster.output(0) + cluster.output(1))
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    killed_at = time.monotonic()
    cluster.kill(victim)
    results = cluster.wait(timeout=10 * heartbeat)
    elapsed = time.monotonic() - killed_at
    survivor = results[1 - victim]
    return survivor, elapsed, heartbeat


def test_killing_a_process_stops_the_other_with_a_clear_error(tmp_path):
    survivor, elapsed, heartbeat = _kill_and_time(tmp_path, victim=1)
    # The survivor was not stopped by the test's timeout (that would be SIGTERM/SIGKILL).
    assert survivor.returncode not in (0, -15, -9), survivor.output[-3000:]
    assert elapsed < 3 * heartbeat + 10
    # The runtime's words (always, once the coordination service sees the dead peer) ...
    assert "another task died" in survivor.output
    # ... and ours, when a collective failed first (the peer's socket closed).
    if "Gloo all-reduce failed" in survivor.output:
        assert "Another process most likely died or was stopped" in survivor.output


@pytest.mark.slow
def test_killing_the_coordinator_stops_the_other_with_a_clear_error(tmp_path):
    survivor, elapsed, heartbeat = _kill_and_time(tmp_path, victim=0)
    assert survivor.returncode not in (0, -15, -9), survivor.output[-3000:]
    assert elapsed < 3 * heartbeat + 10
    assert "another task died" in survivor.output or "leader task" in survivor.output


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    """Preemption reaches hosts at different times: all must save the same step and stop."""
    model_dir = str(tmp_path / "preempted")
    args = runs.toy_train_args(model_dir, 100000, ("--gin.CHECKPOINT_PERIOD=100000",))
    cluster = runs.start(2, 4, args, stop_on_failure=False)
    deadline = time.monotonic() + runs.RUN_TIMEOUT
    while "[train] step 2/" not in cluster.output(0):
        assert time.monotonic() < deadline and all(p.poll() is None for p in cluster.processes)
        time.sleep(0.2)
    cluster.kill(1, signal.SIGTERM)
    results = cluster.wait(timeout=120)
    assert [r.returncode for r in results] == [0, 0], results[0].output[-3000:]
    stopped = [int(r.output.split("Preempted at step ")[1].split(":")[0]) for r in results]
    assert stopped[0] == stopped[1]
    assert os.listdir(os.path.join(model_dir, "checkpoints")) == [str(stopped[0])]


def test_a_missing_process_fails_within_the_init_timeout():
    """Process 0 of 2 started alone fails after the init timeout instead of waiting forever."""
    init_timeout = 5
    env = local_cluster.process_env(0, 2, 4, f"127.0.0.1:{local_cluster.free_port()}",
                                    init_timeout=init_timeout)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tests.multihost.join_cluster"], env=env,
                          cwd=str(runs.REPO), capture_output=True, text=True,
                          timeout=20 * init_timeout)
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Joining a cluster of 2 processes at 127.0.0.1:" in output
    assert "joined" not in output
    assert elapsed < 4 * init_timeout + 30
