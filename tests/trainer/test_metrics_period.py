"""Train metrics rows hold the means over their log period (T5X), from one transfer per period.

The loop runs a scripted trainer whose step `i` reports loss `i`, so every mean is known
exactly; the real train step's metrics go through the same code (tests/trainer/test_loop.py).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.metrics_writer import MetricsWriter
from moe.trainer import PeriodMetrics, train_loop


class _Partitioner:
    def shard_batch(self, batch):
        return batch


class ScriptedTrainer:
    """Step i (counted from 1) reports loss i, learning rate 1/i and expert load [i, 2i]."""

    partitioner = _Partitioner()

    def train_step(self, state, batch):
        step = state["step"] + 1
        value = step.astype(jnp.float32)
        metrics = {"loss": value, "update_norm": value, "learning_rate": 1.0 / value,
                   "accuracy": 0.5 * value,
                   "experts/expert_load/moe": jnp.stack([value, 2 * value])}
        return {"step": step}, metrics


def _state(step=0):
    return {"step": jnp.asarray(step, jnp.int32)}


def _batches():
    while True:
        yield {}


def _rows(log_dir):
    with open(log_dir / "metrics.jsonl") as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_rows_hold_the_mean_over_the_steps_since_the_previous_row(tmp_path):
    writer = MetricsWriter(str(tmp_path), total_steps=12)
    train_loop(ScriptedTrainer(), _state(), _batches(), 12, writer=writer, log_period=5,
               progress_interval_s=None)
    writer.close()
    rows = _rows(tmp_path)
    assert sorted(rows) == [1, 5, 10, 12]  # the first step, every 5, the last
    expected_steps = {1: [1], 5: [2, 3, 4, 5], 10: [6, 7, 8, 9, 10], 12: [11, 12]}
    for step, steps in expected_steps.items():
        row = rows[step]
        assert row["loss"] == np.mean(steps)
        assert row["accuracy"] == 0.5 * np.mean(steps)
        assert row["experts/expert_load/moe/1"] == 2 * np.mean(steps)
        assert row["loss_last_step"] == step
        assert abs(row["learning_rate"] - 1 / step) < 1e-7  # the logged step's, not a mean


def test_a_resumed_loop_averages_from_its_first_step(tmp_path):
    writer = MetricsWriter(str(tmp_path), total_steps=10)
    train_loop(ScriptedTrainer(), _state(6), _batches(), 10, writer=writer, log_period=5,
               progress_interval_s=None)
    writer.close()
    rows = _rows(tmp_path)
    assert sorted(rows) == [7, 10]
    assert rows[10]["loss"] == np.mean([8, 9, 10])


def test_metrics_are_fetched_once_per_row_not_once_per_step(tmp_path, monkeypatch):
    fetched_keys = []
    device_get = jax.device_get

    def recording_device_get(tree):
        fetched_keys.extend(k for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, dict))
                            if isinstance(x, dict) for k in x)
        return device_get(tree)

    monkeypatch.setattr(jax, "device_get", recording_device_get)
    writer = MetricsWriter(str(tmp_path), total_steps=20)
    train_loop(ScriptedTrainer(), _state(), _batches(), 20, writer=writer, log_period=10,
               progress_interval_s=None)
    writer.close()
    # Rows at steps 1, 10 and 20: the per-step fetch is the loss check's, nothing more.
    assert fetched_keys.count("accuracy") == 3


def test_period_metrics_refuse_a_row_without_steps():
    with pytest.raises(ValueError, match="No step"):
        PeriodMetrics().pop_means()
