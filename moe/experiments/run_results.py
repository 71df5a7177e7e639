"""What one trained model of a router comparison measured: curves, timing and routing.

Curves and timing come from the files the trainer wrote in its MODEL_DIR (`train/metrics.jsonl`
and `training_eval/<task>/metrics.jsonl`), so a resumed run's rows are the ones that count.
Routing (per-layer expert load, drops, experts per token) is measured after training on the
held-out split with the final parameters, in evaluation mode (the comparison's routers use
their training capacity there).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from moe import data, file_io
from moe.models.param_count import count_parameters
from moe.plots import read_metrics

# The Expert Choice paper's buckets of experts per token (its Figure 3).
HISTOGRAM_BUCKETS = ("0", "1", "2", "3-4", ">4")
CROSS_ENT = "cross_ent_loss"
_DIAGNOSTIC = "experts/{key}/"


def bucket_counts(counts: list[int]) -> dict[str, int]:
    """Token counts by experts per token ([E+1] counts, E >= 2) in the paper's buckets."""
    return {"0": counts[0], "1": counts[1], "2": counts[2], "3-4": sum(counts[3:5]),
            ">4": sum(counts[5:])}


def training_curves(model_dir: str, task: str) -> dict[str, Any]:
    """Per logged step: train cross-entropy, seconds per step; per eval: held-out cross-entropy.

    `seconds_per_step` is the mean over each log period (evaluation excluded). The first row
    of a run (or of a resumed run) includes compilation and has no rate: it is left out of the
    timing, and its step gets the run's median step time in `train_seconds`.
    """
    train_rows = read_metrics(file_io.join(model_dir, "train", "metrics.jsonl"))
    eval_path = file_io.join(model_dir, "training_eval", task, "metrics.jsonl")
    eval_rows = read_metrics(eval_path) if file_io.exists(eval_path) else []
    steps, losses, rates, drops = [], [], [], []
    for row in train_rows:
        steps.append(int(row["step"]))
        losses.append(float(row[CROSS_ENT]))
        rate = row.get("timing/steps_per_second")
        rates.append(1.0 / rate if rate else None)
        drops.append(row.get("experts/fraction_tokens_left_behind"))
    timed = [s for s in rates if s is not None]
    median = float(np.median(timed)) if timed else float("nan")
    # Wall time of training up to each logged step (compilation and evaluation excluded).
    elapsed, previous, total = [], 0, 0.0
    for step, seconds in zip(steps, rates, strict=True):
        total += (step - previous) * (seconds if seconds is not None else median)
        elapsed.append(total)
        previous = step
    return {
        "train": {"step": steps, "cross_ent_loss": losses, "seconds_per_step": rates,
                  "elapsed_seconds": elapsed, "fraction_tokens_left_behind": drops},
        "held_out": {
            "step": [int(r["step"]) for r in eval_rows],
            "cross_ent_loss": [float(r[f"eval/{CROSS_ENT}"]) for r in eval_rows],
        },
        "median_seconds_per_step": median,
    }


def data_fingerprint(cfg: data.DatasetConfig, feature_converter: Any, num_batches: int) -> str:
    """sha256 of the first `num_batches` batches that data configuration `cfg` yields (rebuilt
    from the run's parsed gin, not captured from the trainer's iterator): equal across runs
    iff their configurations feed the same examples in the same order, so a binding that
    changed the data (seed, task, lengths) would show."""
    digest = hashlib.sha256()
    batches = data.get_dataset(cfg, feature_converter).take(num_batches).as_numpy_iterator()
    for batch in batches:
        for name in sorted(batch):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(batch[name]).tobytes())
    return digest.hexdigest()


def _layer_diagnostics(metrics: Mapping[str, Any], key: str) -> dict[str, np.ndarray]:
    prefix = _DIAGNOSTIC.format(key=key)
    return {name[len(prefix):]: np.asarray(value) for name, value in metrics.items()
            if name.startswith(prefix)}


def routing_analysis(model: Any, params: Any, router_state: Any,
                     batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Per MoE layer on `batches`: expert load [E] (share of routing demand), max / mean
    load, tokens left behind (no expert), drops by rank, and token counts by experts per
    token (the paper's buckets, and the full [E+1] counts), over real tokens only."""
    loss = jax.jit(lambda p, b, s: model.loss_fn(p, b, None, router_state=s)[1])
    layers: dict[str, dict[str, Any]] = {}
    for batch in batches:
        metrics = jax.device_get(loss(params, batch, router_state))
        num_real = float(np.sum(np.asarray(batch["encoder_input_tokens"]) > 0))
        histograms, loads, left_behind, drop_by_rank = (
            _layer_diagnostics(metrics, key) for key in (
                "experts_per_token", "expert_load", "fraction_tokens_left_behind",
                "drop_fraction_by_rank"))
        for layer, histogram in histograms.items():
            entry = layers.setdefault(layer, {
                "tokens": 0.0, "counts": np.zeros_like(histogram, dtype=np.float64),
                "load": 0.0, "left_behind": 0.0, "drop_by_rank": 0.0,
            })
            entry["tokens"] += num_real
            entry["counts"] += histogram * num_real
            entry["load"] = entry["load"] + num_real * loads[layer]
            entry["left_behind"] += num_real * float(left_behind[layer])
            entry["drop_by_rank"] = entry["drop_by_rank"] + num_real * drop_by_rank[layer]
    out = {}
    for layer, entry in sorted(layers.items()):
        tokens = max(entry["tokens"], 1.0)
        load = entry["load"] / tokens
        counts = [round(c) for c in entry["counts"]]
        out[layer] = {
            "num_tokens": int(entry["tokens"]),
            "expert_load": [float(x) for x in load],
            "max_over_mean_load": float(np.max(load) * len(load)),
            "fraction_tokens_left_behind": entry["left_behind"] / tokens,
            "drop_fraction_by_rank": [float(x) for x in entry["drop_by_rank"] / tokens],
            "experts_per_token_counts": counts,
            "experts_per_token_buckets": bucket_counts(counts),
        }
    return out


def compute_summary(model: Any) -> dict[str, float]:
    """Parameters in total and per token, and the experts an average token uses."""
    count = count_parameters(model)
    sparse = model.module.config.encoder_sparse
    experts = (sparse.router.experts_per_token(sparse.group_size, sparse.num_experts)
               if sparse.num_sparse_layers else 1.0)
    return {"total_parameters": count.total, "activated_parameters": count.activated,
            "experts_per_token": experts}


__all__ = [
    "HISTOGRAM_BUCKETS",
    "bucket_counts",
    "compute_summary",
    "data_fingerprint",
    "routing_analysis",
    "training_curves",
]
