"""training.png: the panels it draws (read from the figure's axes, not its pixels)."""

import json
import os

import matplotlib.pyplot as plt
import numpy as np
import pytest

from moe import plots


def _write(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _train_records(steps, loss=lambda s: 2.0 + 4.0 / s):
    return [{"step": s, "loss": loss(s), "experts/expert_load/decoder/layers_1/mlp/0": 0.6,
             "experts/expert_load/decoder/layers_1/mlp/1": 0.4} for s in steps]


STEPS = [1, *range(100, 1001, 100)]


@pytest.fixture
def pretrain_dir(tmp_path):
    _write(tmp_path / "train" / "metrics.jsonl", _train_records(STEPS))
    _write(tmp_path / "training_eval" / "pydoc" / "metrics.jsonl",
           [{"step": s, "eval/loss": 2.5, "eval/accuracy": 0.3} for s in (500, 1000)])
    return tmp_path


def _panels(fig):
    """`{title: axes}` of the plot panels (colorbars have no title)."""
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def _line(ax, label):
    (line,) = [x for x in ax.get_lines() if x.get_label() == label]
    return np.asarray(line.get_xdata()), np.asarray(line.get_ydata())


def test_pretraining_plot_has_a_log_loss_a_zoomed_loss_and_the_expert_load(pretrain_dir):
    fig = plots.training_figure(str(pretrain_dir))
    panels = _panels(fig)
    assert list(panels) == ["Loss (log scale)", "Loss after the first 20% of the steps",
                            "Expert load per layer (step 1000; uniform = 0.500)"]
    full, zoom = panels["Loss (log scale)"], panels["Loss after the first 20% of the steps"]
    assert full.get_yscale() == "log"
    steps, losses = _line(full, "train loss (mean over the log period)")
    assert list(steps) == STEPS and losses[0] == 6.0
    # The zoom leaves out the first steps' losses (6.0 at step 1) and shows all later ones.
    low, high = zoom.get_ylim()
    later = [2.0 + 4.0 / s for s in STEPS if s >= 200] + [2.5]  # and the eval losses
    assert low <= min(later) and max(later) <= high < 3.0
    assert zoom.get_xlim() == (200.0, 1000.0)
    assert _line(full, "eval loss (pydoc)")[0].tolist() == [500, 1000]
    plt.close(fig)


def test_fine_tuning_plot_adds_the_task_metrics(pretrain_dir):
    _write(pretrain_dir / "training_eval" / "boolq" / "metrics.jsonl", [
        row for s in (500, 1000) for row in (
            {"step": s, "eval/loss": 0.7},  # the teacher-forced and the inference rows of a step
            {"step": s, "inference_eval/boolq/accuracy": s / 20},
        )
    ])
    fig = plots.training_figure(str(pretrain_dir))
    task = _panels(fig)["Task metrics (inference eval)"]
    steps, accuracy = _line(task, "boolq/accuracy")
    assert steps.tolist() == [500, 1000] and accuracy.tolist() == [25.0, 50.0]
    plt.close(fig)


def test_a_log_that_went_back_in_step_is_plotted_as_the_latest_run_left_it(tmp_path):
    killed = _train_records([1, 100, 200, 300], loss=lambda s: 9.0)
    resumed = _train_records([200, 300, 400], loss=lambda s: 1.0)
    _write(tmp_path / "train" / "metrics.jsonl", killed + resumed)
    fig = plots.training_figure(str(tmp_path))
    steps, losses = _line(_panels(fig)["Loss (log scale)"], "train loss (mean over the log period)")
    assert steps.tolist() == [1, 100, 200, 300, 400]
    assert losses.tolist() == [9.0, 9.0, 1.0, 1.0, 1.0]
    plt.close(fig)


def test_latest_records_merges_rows_of_one_step_and_drops_superseded_ones():
    records = [{"step": 1, "a": 1}, {"step": 5, "a": 5}, {"step": 5, "b": 5},
               {"step": 9, "a": 9}, {"step": 5, "a": 50}, {"step": 7, "a": 7}]
    assert plots.latest_records(records) == [
        {"step": 1, "a": 1}, {"step": 5, "a": 50, "b": 5}, {"step": 7, "a": 7}]


def test_write_training_plot_writes_a_png_and_refuses_an_empty_log(pretrain_dir, tmp_path):
    path = plots.write_training_plot(str(pretrain_dir))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    _write(tmp_path / "empty" / "train" / "metrics.jsonl", [])
    with pytest.raises(ValueError, match="No training metrics"):
        plots.write_training_plot(str(tmp_path / "empty"))
