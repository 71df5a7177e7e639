"""A router comparison's report (`report.md`) and figure (`comparison.png`) from its results.

Both are written from `results.json` alone, so they can be redrawn without training:
`python -m moe.experiments.report DIR`. Files go through `moe.file_io` (DIR may be a `gs://`
URL).
"""

import sys

import moe.start_up  # noqa: F401 - first: before JAX and TensorFlow load

if __name__ == "__main__":
    from moe.experiments.report import main

    sys.exit(main())

import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from moe import file_io
from moe.experiments import claims as claims_lib
from moe.experiments.run_results import HISTOGRAM_BUCKETS

REFERENCE_ENTRY = "dense"


def corpus_description(task: str) -> dict[str, Any] | None:
    """Size and composition of the embedded corpus `task` reads, when it is one."""
    if task.startswith("python_docs"):
        from seqio_tasks import python_docs

        return python_docs.corpus_summary()
    return None


def _mean_curve(runs: Sequence[Mapping[str, Any]], x_key: str, part: str = "held_out"
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(x, mean, min, max) of the held-out loss over seeds, on the first run's x values
    (every seed evaluates at the same steps)."""
    length = min(len(r[part]["cross_ent_loss"]) for r in runs)
    losses = np.asarray([r[part]["cross_ent_loss"][:length] for r in runs])
    x = np.asarray([r[part][x_key][:length] for r in runs]).mean(axis=0)
    return x, losses.mean(axis=0), losses.min(axis=0), losses.max(axis=0)


def _held_out_elapsed(run: Mapping[str, Any]) -> list[float]:
    """Training wall time at each evaluation (interpolated on the logged steps)."""
    return list(np.interp(run["held_out"]["step"], [0, *run["train"]["step"]],
                          [0.0, *run["train"]["elapsed_seconds"]]))


def _difference_curves(runs: Sequence[Mapping[str, Any]],
                       reference: Sequence[Mapping[str, Any]]
                       ) -> tuple[np.ndarray, np.ndarray] | None:  # fmt: skip
    """(steps, [seeds, evaluations]) held-out loss minus the reference's of the same seed."""
    by_seed = {r["seed"]: r for r in reference}
    pairs = [(r, by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
    if not pairs:
        return None
    length = min(min(len(a["held_out"]["step"]), len(b["held_out"]["step"])) for a, b in pairs)
    steps = np.asarray(pairs[0][0]["held_out"]["step"][:length])
    return steps, np.asarray([np.subtract(a["held_out"]["cross_ent_loss"][:length],
                                          b["held_out"]["cross_ent_loss"][:length])
                              for a, b in pairs])


def write_figure(results: Mapping[str, Any], path: str) -> str:
    """Held-out loss by step and by wall time, its difference to the dense model of the same
    seed (the data order moves every model's loss alike; the difference removes that), and the
    experts-per-token histogram."""
    by_entry = claims_lib.runs_by_entry(results)
    order = [e for e in results["entries"] if e in by_entry]
    fig, grid = plt.subplots(2, 2, figsize=(16, 10.5))
    by_step, by_time, difference, histogram = grid.flat
    colors = plt.get_cmap("tab10")
    reference = by_entry.get(REFERENCE_ENTRY)
    for i, name in enumerate(order):
        runs, color = by_entry[name], colors(i % 10)
        label = f"{runs[0]['label']} ({len(runs)} seeds)"
        steps, mean, low, high = _mean_curve(runs, "step")
        by_step.plot(steps, mean, color=color, label=label)
        by_step.fill_between(steps, low, high, color=color, alpha=0.15)
        timed = [{**r, "held_out": {**r["held_out"], "elapsed": _held_out_elapsed(r)}}
                 for r in runs]
        seconds, mean, low, high = _mean_curve(timed, "elapsed")
        by_time.plot(seconds, mean, color=color, label=label)
        by_time.fill_between(seconds, low, high, color=color, alpha=0.07)
        curves = _difference_curves(runs, reference) if reference else None
        if curves is not None and name != REFERENCE_ENTRY:
            steps, values = curves
            difference.plot(steps, values.mean(axis=0), color=color, label=label)
    for ax, xlabel in ((by_step, "training step"), (by_time, "training wall time (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        _zoom(ax, by_entry, order)
    by_step.set_title("Held-out loss by step (shaded: range over seeds)")
    by_time.set_title("Held-out loss by training wall time (one process)")
    by_step.legend(fontsize=7)
    difference.axhline(0.0, color="black", linewidth=0.8)
    difference.set_xlabel("training step")
    difference.set_ylabel("held-out loss minus dense, same seed (nats/token)")
    difference.set_title("Held-out loss minus the dense model's of the same seed, mean over "
                         "seeds (below 0: better)")
    difference.grid(alpha=0.3)
    _zoom_difference(difference)
    sparse = [n for n in order if _routes_whole_tokens(by_entry[n][0])]
    width = 0.8 / max(len(sparse), 1)
    for i, name in enumerate(sparse):
        shares = np.asarray([[claims_lib.bucket_shares(r).get(b, 0.0) for b in HISTOGRAM_BUCKETS]
                             for r in by_entry[name]])
        x = np.arange(len(HISTOGRAM_BUCKETS)) + (i - (len(sparse) - 1) / 2) * width
        histogram.bar(x, shares.mean(axis=0), width, color=colors(order.index(name) % 10),
                      label=by_entry[name][0]["label"],
                      yerr=[shares.mean(0) - shares.min(0), shares.max(0) - shares.mean(0)])
    histogram.set_xticks(np.arange(len(HISTOGRAM_BUCKETS)), HISTOGRAM_BUCKETS)
    histogram.set_xlabel("experts per token")
    histogram.set_ylabel("share of held-out tokens (all MoE layers)")
    histogram.set_title("Experts per token (routers that send whole tokens)")
    histogram.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    png = io.BytesIO()  # matplotlib writes local files only
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    file_io.write_atomically(path, png.getvalue())
    return path


def _zoom_difference(ax: Any) -> None:
    """Leave out the first evaluations, where differences are an order of magnitude larger."""
    values = [y for line in ax.get_lines()[1:] for x, y in zip(*line.get_data(), strict=True)
              if x >= 0.3 * max(line.get_xdata())]
    if values:
        low, high = min(values), max(values)
        margin = 0.1 * max(high - low, 1e-3)
        ax.set_ylim(min(low, 0.0) - margin, max(high, 0.0) + margin)


def _routes_whole_tokens(run: Mapping[str, Any]) -> bool:
    """Sparse models whose tokens go to whole experts: drops and experts per token apply."""
    return bool(run["sparse"] and run.get("discrete", True))


def paired_difference(runs: Sequence[Mapping[str, Any]],
                      reference: Sequence[Mapping[str, Any]] | None) -> list[float]:
    """Held-out loss minus the reference's, per seed both have (same data and init seed)."""
    if not reference:
        return []
    by_seed = {r["seed"]: claims_lib.final_held_out(r) for r in reference}
    return [claims_lib.final_held_out(r) - by_seed[r["seed"]] for r in runs
            if r["seed"] in by_seed]


def _zoom(ax: Any, by_entry: Mapping[str, Sequence[Mapping]], order: Sequence[str]) -> None:
    """Show the second half of training's range of losses: the first evaluations sit far
    above the rest and would flatten the differences."""
    finals = [r["held_out"]["cross_ent_loss"] for n in order for r in by_entry[n]]
    if not finals or not all(finals):
        return
    low = min(min(c) for c in finals)
    mid = max(c[len(c) // 2] for c in finals)
    if mid > low:
        ax.set_ylim(low - 0.05 * (mid - low), mid + 0.3 * (mid - low))


def _fmt_range(values: Sequence[float], digits: int = 4) -> str:
    mean = float(np.mean(values))
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _fmt_delta(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return " / ".join(f"{v:+.4f}" for v in values)


def router_table(results: Mapping[str, Any]) -> list[str]:
    by_entry = claims_lib.runs_by_entry(results)
    reference = by_entry.get(REFERENCE_ENTRY)
    ref_time = (float(np.mean([r["median_seconds_per_step"] for r in reference]))
                if reference else None)
    lines = [
        "| model | seeds | experts/token | params (activated) | held-out loss | vs dense, "
        "paired by seed | train loss (last 10%) | ms/step | vs dense | tokens without expert | "
        "max/mean load | " + " | ".join(f"{b} experts" for b in HISTOGRAM_BUCKETS) + " |",
        "|" + "---|" * (11 + len(HISTOGRAM_BUCKETS)),
    ]
    for name in [e for e in results["entries"] if e in by_entry]:
        runs = by_entry[name]
        first = runs[0]
        step_time = float(np.mean([r["median_seconds_per_step"] for r in runs]))
        ratio = f"{step_time / ref_time:.2f}x" if ref_time else "-"
        load = "-"
        if first["sparse"]:
            load = _fmt_range([claims_lib.mean_layer_value(r, "max_over_mean_load")
                               for r in runs], 2)
        if _routes_whole_tokens(first):
            dropped = _fmt_range([claims_lib.mean_layer_value(r, "fraction_tokens_left_behind")
                                  for r in runs], 3)
            shares = [np.mean([claims_lib.bucket_shares(r).get(b, 0.0) for r in runs])
                      for b in HISTOGRAM_BUCKETS]
            buckets = " | ".join(f"{s:.1%}" for s in shares)
        else:
            dropped = "-"
            buckets = " | ".join("-" for _ in HISTOGRAM_BUCKETS)
        lines.append(
            f"| {first['label']} | {len(runs)} | {first['experts_per_token']:g} | "
            f"{first['total_parameters'] / 1e3:.0f}k ({first['activated_parameters'] / 1e3:.0f}k)"
            f" | {_fmt_range([claims_lib.final_held_out(r) for r in runs])} | "
            f"{_fmt_delta(paired_difference(runs, reference)) if name != REFERENCE_ENTRY else '-'}"
            f" | {_fmt_range([claims_lib.final_train(r) for r in runs])} | "
            f"{step_time * 1e3:.1f} | "
            f"{ratio} | {dropped} | {load} | {buckets} |"
        )
    return lines


def claims_table(results: Mapping[str, Any]) -> list[str]:
    lines = ["| paper's claim | measured here | verdict | how it was judged |",
             "|---|---|---|---|"]
    for claim in claims_lib.check_claims(results):
        lines.append(f"| {claim.claim} | {claim.measured} | **{claim.verdict}** | {claim.why} |")
    return lines


def corpus_lines(corpus: Mapping[str, Any] | None) -> list[str]:
    """The corpus's identity, its splits, and a table of what each source contributed."""
    if not corpus:
        return ["The pretraining task's corpus is not one this report describes."]
    lines = [f"- {key}: `{value}`" for key, value in corpus.items()
             if not isinstance(value, dict | list)]
    if corpus.get("missing_packages"):
        lines.append(f"- not installed, left out: {corpus['missing_packages']}")
    for split, value in corpus.get("splits", {}).items():
        lines.append(f"- {split}: {value.get('documents')} documents, {value.get('bytes'):,} "
                     f"bytes, sha256 `{value.get('sha256')}`")
    sources = corpus.get("sources", {})
    if sources:
        lines += ["", "| source | version | documents | bytes | train bytes | held-out bytes |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {v.get('version')} | {v.get('documents')} | {v.get('bytes'):,} | "
                  f"{v.get('train_bytes'):,} | {v.get('validation_bytes'):,} |"
                  for name, v in sources.items()]
    return lines


def _tokens_trained(settings: Mapping[str, Any]) -> str | None:
    try:
        per_step = settings["BATCH_SIZE"] * sum(settings["TASK_FEATURE_LENGTHS"].values())
        return f"{settings['TRAIN_STEPS'] * per_step:,} (inputs and targets, packed)"
    except (KeyError, TypeError, AttributeError):
        return None


def write_markdown(results: Mapping[str, Any], path: str, figure: str) -> str:
    seeds = ", ".join(str(s) for s in results["seeds"])
    settings = results.get("settings", {})
    tokens = _tokens_trained(settings)
    lines = [
        "# Router comparison",
        "",
        f"Written by `python -m moe.experiments.compare_routers` (preset "
        f"`{results.get('preset', '?')}`), seeds {seeds}. Every model of a seed starts from "
        "the same initialization seed and reads the same batches in the same order (the "
        "fingerprints of the first batches each run's data configuration yields: "
        + ", ".join(sorted(_fingerprints(results))) + "). "
        "Models differ only in the router of their encoder MoE layers (the dense baseline has "
        "a dense MLP of the expert's width there). Losses are cross-entropy in nats per target "
        "token, without auxiliary losses. Step times are medians of the logged periods, "
        "evaluation and compilation excluded, all runs trained one after the other in one "
        "process on the same machine.",
        "",
        *(f"- {k}: {v}" for k, v in settings.items()),
        *([f"- tokens trained per model: {tokens}"] if tokens else []),
        "",
        f"![comparison]({os.path.basename(figure)})",
        "",
        "## The paper's claims at this scale",
        "",
        *claims_table(results),
        "",
        "## Every model",
        "",
        "Mean over seeds (min-max in brackets). Held-out loss: the last evaluation; 'vs dense, "
        "paired by seed' is its difference to the dense model of the same seed (same data and "
        "initialization seed), one value per seed: seeds move the loss more than most routers "
        "do, so this is the column to compare. Routing columns: held-out tokens, evaluation "
        "mode at the training capacity, mean over MoE layers; experts-per-token shares count a "
        "token once per MoE layer. Soft MoE mixes every token of a sequence into every slot, "
        "so drops and experts per token do not apply to it.",
        "",
        *router_table(results),
        "",
        "## Pretraining corpus",
        "",
        *corpus_lines(results.get("corpus")),
        "",
    ]
    file_io.write_atomically(path, "\n".join(lines))
    return path


def _fingerprints(results: Mapping[str, Any]) -> set[str]:
    return {f"seed {r['seed']} `{r['data_fingerprint'][:12]}`" for r in results["runs"]}


def write_report(results: Mapping[str, Any], output: str) -> list[str]:
    figure = write_figure(results, file_io.join(output, "comparison.png"))
    return [write_markdown(results, file_io.join(output, "report.md"), figure), figure]


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not file_io.exists(file_io.join(argv[0], "results.json")):
        print("usage: python -m moe.experiments.report DIR (a comparison's --output, holding "
              "results.json)", file=sys.stderr)
        return 2
    results = json.loads(file_io.read_text(file_io.join(argv[0], "results.json")))
    for path in write_report(results, argv[0]):
        print(f"wrote {path}")
    return 0

