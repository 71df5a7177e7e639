"""The training plot: loss curves, task metrics and per-layer expert load, as a PNG in MODEL_DIR.

Reads `MODEL_DIR/train/metrics.jsonl` and `MODEL_DIR/training_eval/<task>/metrics.jsonl`
(written by `MetricsWriter`), so it can be rerun on any finished or running job:
`python -m moe.plots MODEL_DIR`. Files are read and written through `moe.file_io`, so MODEL_DIR
may be a `gs://` bucket.

Panels: the loss on a log scale (the first steps sit an order of magnitude above the rest), the
loss zoomed on the steps after the initial drop, the task metrics of inference evaluation when
the logs have any (fine-tuning), and the last logged expert load per layer.
"""

import io
import json
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from moe import file_io

_LOAD = re.compile(r"^experts/expert_load/(.+)/(\d+)$")
TASK_METRIC_PREFIX = "inference_eval/"
# The zoomed loss panel leaves out this leading fraction of the logged steps.
ZOOM_SKIP_FRACTION = 0.2


def latest_records(records: list[dict[str, float]]) -> list[dict[str, float]]:
    """One record per step, in increasing step order, as the latest writes left them.

    A log that goes back in step (a run that resumed from a checkpoint older than its last
    logged step, written before logs were cut on resume) drops the rows from that step on;
    rows of the same step (an eval writes two) are merged, the later value winning.
    """
    out: list[dict[str, float]] = []
    for record in records:
        step = record["step"]
        while out and out[-1]["step"] > step:
            out.pop()
        if out and out[-1]["step"] == step:
            out[-1] = {**out[-1], **record}
        else:
            out.append(dict(record))
    return out


def read_metrics(path: str) -> list[dict[str, float]]:
    """The records of a `metrics.jsonl`, one per step in step order (see `latest_records`)."""
    records = []
    with file_io.open_file(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a blank line, or a write cut short by a kill
                continue
    return latest_records(records)


def expert_load_by_layer(record: dict[str, float]) -> dict[str, np.ndarray]:
    """`{layer path: load per expert}` from one metrics record."""
    layers: dict[str, dict[int, float]] = {}
    for key, value in record.items():
        match = _LOAD.match(key)
        if match:
            layers.setdefault(match.group(1), {})[int(match.group(2))] = value
    return {name: np.array([v[i] for i in sorted(v)]) for name, v in sorted(layers.items())}


def read_eval_metrics(model_dir: str) -> dict[str, list[dict[str, float]]]:
    """`{task: records}` from `MODEL_DIR/training_eval/<task>/metrics.jsonl`."""
    eval_dir = file_io.join(model_dir, "training_eval")
    out = {}
    if file_io.isdir(eval_dir):
        for task in file_io.listdir(eval_dir):
            path = file_io.join(eval_dir, task, "metrics.jsonl")
            if file_io.exists(path):
                out[task] = read_metrics(path)
    return out


def _plot_series(ax: Axes, records: list[dict[str, float]], key: str, label: str,
                 style: str = "-") -> bool:
    points = [(r["step"], r[key]) for r in records if key in r]
    if points:
        ax.plot(*zip(*points, strict=True), style, label=label)
    return bool(points)


def _plot_losses(ax: Axes, train: list[dict[str, float]],
                 evals: dict[str, list[dict[str, float]]]) -> None:
    _plot_series(ax, train, "loss", "train loss (mean over the log period)")
    for task, records in evals.items():
        _plot_series(ax, records, "eval/loss", f"eval loss ({task})", "o-")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)


def _zoom_on_later_steps(ax: Axes, last_step: int) -> None:
    """Limit the axes to the curves after the first `ZOOM_SKIP_FRACTION` of the steps."""
    cut = ZOOM_SKIP_FRACTION * last_step
    later = [y for line in ax.get_lines()
             for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True) if x >= cut]
    low, high = min(later), max(later)
    margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
    ax.set_xlim(cut, last_step)
    ax.set_ylim(low - margin, high + margin)


def task_metric_names(evals: dict[str, list[dict[str, float]]]) -> list[tuple[str, str]]:
    """`(task, metric key)` for every inference-eval (task) metric in the eval logs."""
    return [
        (task, key)
        for task, records in evals.items()
        for key in sorted({k for r in records for k in r if k.startswith(TASK_METRIC_PREFIX)})
    ]


def _plot_task_metrics(ax: Axes, evals: dict[str, list[dict[str, float]]],
                       names: list[tuple[str, str]]) -> None:
    for task, key in names:
        _plot_series(ax, evals[task], key, key.removeprefix(TASK_METRIC_PREFIX), "o-")
    ax.set_xlabel("step")
    ax.set_title("Task metrics (inference eval)")
    ax.legend(fontsize=8)


def _plot_expert_load(fig: Figure, ax: Axes, record: dict[str, float]) -> None:
    loads = expert_load_by_layer(record)
    if not loads:
        ax.text(0.5, 0.5, "no expert_load metrics", ha="center", va="center")
        ax.set_axis_off()
        return
    matrix = np.stack(list(loads.values()))  # [layers, experts]
    image = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(loads)), list(loads), fontsize=7)
    ax.set_xlabel("expert")
    ax.set_title(f"Expert load per layer (step {record['step']}; uniform = "
                 f"{1 / matrix.shape[1]:.3f})")
    fig.colorbar(image, ax=ax)


def training_figure(model_dir: str) -> Figure:
    """The figure of `write_training_plot`; its axes titles name the panels."""
    train = [r for r in read_metrics(file_io.join(model_dir, "train", "metrics.jsonl"))
             if "loss" in r]
    if not train:
        raise ValueError(f"No training metrics in {model_dir}/train/metrics.jsonl yet.")
    evals = read_eval_metrics(model_dir)
    tasks = task_metric_names(evals)
    if tasks:
        fig, axes = plt.subplots(2, 2, figsize=(13, 9))
        ax_loss, ax_zoom, ax_task, ax_load = axes.reshape(-1)
        _plot_task_metrics(ax_task, evals, tasks)
    else:
        fig, (ax_loss, ax_zoom, ax_load) = plt.subplots(1, 3, figsize=(18, 4.5))

    _plot_losses(ax_loss, train, evals)
    ax_loss.set_yscale("log")
    ax_loss.set_title("Loss (log scale)")
    _plot_losses(ax_zoom, train, evals)
    _zoom_on_later_steps(ax_zoom, train[-1]["step"])
    ax_zoom.set_title(f"Loss after the first {ZOOM_SKIP_FRACTION:.0%} of the steps")
    _plot_expert_load(fig, ax_load, train[-1])
    fig.tight_layout()
    return fig


def write_training_plot(model_dir: str, filename: str = "training.png") -> str:
    """Write `training_figure(model_dir)` as `MODEL_DIR/<filename>`; returns the PNG path."""
    fig = training_figure(model_dir)
    path = file_io.join(model_dir, filename)
    png = io.BytesIO()  # matplotlib writes local files only
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    file_io.write_atomically(path, png.getvalue())
    return path


if __name__ == "__main__":
    print(write_training_plot(sys.argv[1]))
