"""A resumed run replaces what the killed run logged past its last checkpoint: metrics.jsonl
(rewritten atomically) and TensorBoard (a restart mark its event loader purges on) hold each
step once, in increasing order."""

import json
import os
import time

import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.util import tensor_util

from moe import checkpoints, metrics_writer
from moe.metrics_writer import MetricsWriter, discard_records_after
from moe.trainer import train_loop
from tests.trainer.test_loop import _batches, _trainer


def _steps(path):
    with open(path) as f:
        return [json.loads(line)["step"] for line in f]


def _write_log(path, steps, torn_tail=""):
    with open(path, "w") as f:
        f.writelines(json.dumps({"step": s, "loss": 10.0 + s}) + "\n" for s in steps)
        f.write(torn_tail)


def test_records_past_the_step_and_a_torn_last_line_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_log(path, [1, 10, 20, 30], torn_tail='{"step": 40, "lo')
    assert discard_records_after(str(path), 20) == 2
    assert _steps(path) == [1, 10, 20]
    assert path.read_text().endswith("\n")
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # no temporary file left behind


def test_a_log_with_nothing_past_the_step_is_not_rewritten(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_log(path, [1, 10, 20])
    inode = os.stat(path).st_ino
    assert discard_records_after(str(path), 20) == 0
    assert os.stat(path).st_ino == inode
    assert discard_records_after(str(tmp_path / "absent.jsonl"), 20) == 0


def test_a_failed_rewrite_leaves_the_old_log_whole(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    _write_log(path, [1, 10, 20, 30])

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(metrics_writer.os, "replace", fail)
    with pytest.raises(OSError):
        discard_records_after(str(path), 10)
    assert _steps(path) == [1, 10, 20, 30]


def _loss_points(log_dir):
    """The loss points as TensorBoard's Python event loader serves them."""
    accumulator = plugin_event_accumulator.EventAccumulator(str(log_dir))
    accumulator.Reload()
    return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item())
            for e in accumulator.Tensors("loss")]


def test_a_resumed_writer_replaces_later_steps_in_jsonl_and_tensorboard(tmp_path, capsys):
    first = MetricsWriter(str(tmp_path))
    for step in range(1, 7):
        first.write(step, {"loss": 100.0 + step})
    first.close()
    # Event files sort by their second of creation; a real restart is seconds later.
    time.sleep(1.05 - time.time() % 1)

    resumed = MetricsWriter(str(tmp_path), resume_step=3)
    assert "Dropped 3 metrics rows logged past step 3" in capsys.readouterr().out
    for step in range(4, 9):
        resumed.write(step, {"loss": float(step)})
    resumed.close()

    assert _steps(tmp_path / "metrics.jsonl") == list(range(1, 9))
    points = _loss_points(tmp_path)
    assert [s for s, _ in points] == list(range(1, 9))
    assert [v for _, v in points] == [101.0, 102.0, 103.0, 4.0, 5.0, 6.0, 7.0, 8.0]


class KilledError(Exception):
    """Stands for kill -9 in the middle of a run."""


def test_a_loop_killed_after_its_checkpoint_then_resumed_logs_each_step_once(tmp_path):
    trainer = _trainer()
    ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), period=4, async_save=False)
    batches = _batches()

    class KilledAtSeventh:
        get_state = batches.get_state

        def __next__(self):
            if batches.batches_consumed == 6:
                raise KilledError  # no checkpoint, no cleanup
            return next(batches)

    writer = MetricsWriter(str(tmp_path / "train"))
    with pytest.raises(KilledError):
        train_loop(trainer, trainer.init_state(), KilledAtSeventh(), 10, ckpt, writer,
                   log_period=1)
    writer.close()
    assert _steps(tmp_path / "train" / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert ckpt.latest_step() == 4

    state, data_state = ckpt.restore(trainer.abstract_state)
    writer = MetricsWriter(str(tmp_path / "train"), resume_step=int(state["step"]))
    train_loop(trainer, state, _batches(data_state["batches_consumed"]), 10, ckpt, writer,
               log_period=1)
    writer.close()
    ckpt.close()
    assert _steps(tmp_path / "train" / "metrics.jsonl") == list(range(1, 11))
