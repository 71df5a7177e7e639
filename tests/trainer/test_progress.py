"""Progress lines between log periods: every `progress_interval_s` of wall time, console only."""

import re
import types

import gin
import pytest

from moe import metrics_writer
from moe.metrics_writer import MetricsWriter
from moe.trainer import train_loop
from tests.trainer.test_metrics_period import ScriptedTrainer, _batches, _rows, _state

SECONDS_PER_STEP = 10.0


class ClockedTrainer(ScriptedTrainer):
    """The scripted trainer on a fake clock that each step moves by `SECONDS_PER_STEP`."""

    def __init__(self):
        self.now = 0.0

    def train_step(self, state, batch):
        self.now += SECONDS_PER_STEP
        return super().train_step(state, batch)


@pytest.fixture
def trainer(monkeypatch):
    trainer = ClockedTrainer()
    clock = types.SimpleNamespace(monotonic=lambda: trainer.now, perf_counter=lambda: trainer.now)
    monkeypatch.setattr(metrics_writer, "time", clock)
    return trainer


def _progress_lines(out):
    return [line for line in out.splitlines() if line.startswith("[progress]")]


def test_a_progress_line_every_interval_between_log_rows(tmp_path, trainer, capsys):
    writer = MetricsWriter(str(tmp_path), total_steps=20)
    train_loop(trainer, _state(), _batches(), 20, writer=writer, log_period=10,
               progress_interval_s=30)
    writer.close()
    lines = _progress_lines(capsys.readouterr().out)
    steps = [int(re.match(r"\[progress\] step (\d+)/20", line).group(1)) for line in lines]
    # Step 1 (a row) at 10 s, then a line once 30 s have passed since the last one; the row at
    # step 10 restarts the count.
    assert steps == [4, 7, 13, 16, 19]
    # Steps 2-4 (losses 2, 3, 4) in 30 s: 0.1 steps/s, 16 steps left.
    assert lines[0] == "[progress] step 4/20, loss 3.0000, 0.10 steps/s, ETA 160s"
    assert list(_rows(tmp_path)) == [1, 10, 20]  # no rows for progress lines


def test_no_progress_lines_when_the_interval_is_none(tmp_path, trainer, capsys):
    writer = MetricsWriter(str(tmp_path), total_steps=20)
    train_loop(trainer, _state(), _batches(), 20, writer=writer, log_period=10,
               progress_interval_s=None)
    writer.close()
    assert _progress_lines(capsys.readouterr().out) == []


def test_the_interval_is_a_gin_parameter_of_train():
    import moe.train  # noqa: F401  (registers `train` with gin)

    gin.clear_config()
    try:
        gin.parse_config("train.progress_interval_s = 5.0")
        assert gin.query_parameter("train.progress_interval_s") == 5.0
    finally:
        gin.clear_config()


def test_steps_per_second_leaves_evaluation_out(tmp_path, trainer, monkeypatch):
    """An evaluation taking 1000 s on the fake clock between steps 5 and 6 does not count in
    the period's steps/s: the row at step 10 still reads one step per SECONDS_PER_STEP."""
    from moe import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(
        perf_counter=lambda: trainer.now))

    def slow_eval(state, step):
        trainer.now += 1000.0

    writer = MetricsWriter(str(tmp_path), total_steps=10)
    train_loop(trainer, _state(), _batches(), 10, writer=writer, log_period=10, eval_period=5,
               eval_fn=slow_eval, progress_interval_s=None)
    writer.close()
    assert _rows(tmp_path)[10]["timing/steps_per_second"] == pytest.approx(1 / SECONDS_PER_STEP)
