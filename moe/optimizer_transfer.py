"""Carrying Adafactor's statistics over from INITIAL_CHECKPOINT_PATH (ours or T5X's).

Fine-tuning or continuing from a checkpoint restarts the train step (TRAIN_STEPS counts this
run's steps) and the learning-rate schedule, but Adafactor's second-moment estimates
(`v_row`/`v_col` of factored matrices, `v` of the others) and their step count (which sets
their decay, beta2 = 1 - t^-0.8) are what the checkpoint's training had learned about its
gradients; T5X restores them with the parameters. They are used when they *fit*: every
parameter of the model has statistics in the checkpoint, factored the same way, of the same
shapes. Otherwise (another optimizer, upcycled experts, a different factoring) the optimizer
starts fresh and one log line says why.

T5X's Adafactor stores, per parameter (flaxformer names), `v_row` and `v_col` with the
reduced axes deleted (`[1]` when unused) and `v`. For a matrix without batch axes T5X factors
over its two largest axes, `v_row` keeping the smaller one (the earlier one on ties); expert
kernels `[E, ...]` follow its MoE rules (expert = batch, the embedding axis = row). Ours keeps
the axes with size 1 (`keepdims`) and calls the statistic that keeps the embedding axis
`v_row`; the estimate `v_row * v_col / mean(v_row)` is symmetric in the two, so the statistic
keeping the same axes is taken, whichever name it has there.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe import optimizers
from moe.checkpoint_sources import (
    OrbaxSource,
    T5xSource,
    flatten_params,
    open_param_source,
    unflatten_like,
)
from moe.interop.flaxformer_names import flaxformer_name, flaxformer_shape
from moe.orbax_arrays import metadata_tree, restore_host_tree

STATISTICS = ("v_row", "v_col", "v")


class NoFitError(Exception):
    """The checkpoint's optimizer state cannot serve this model's optimizer (the reason)."""


def _factored_state_path(opt_state: Any) -> tuple:
    """The tree path of the (single) `FactoredState` inside an optax chain's state."""
    found = []

    def visit(path, node):
        if isinstance(node, optimizers.FactoredState):
            found.append(path)
        return node

    jax.tree_util.tree_map_with_path(
        visit, opt_state, is_leaf=lambda x: isinstance(x, optimizers.FactoredState))
    if len(found) != 1:
        raise NoFitError(f"this run's optimizer is not Adafactor ({len(found)} Adafactor states)")
    return found[0]


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[getattr(key, "idx", getattr(key, "key", None))]
    return tree


# --- Where the statistics come from ---------------------------------------------------------


def _ours(source: OrbaxSource, wanted: dict[str, dict[str, tuple]]) -> tuple[dict, int]:
    """Statistics of one of our checkpoints (same names and layouts as this run's)."""
    tree = metadata_tree(source.state_dir)
    flat = flatten_params(tree.get("opt_state", {}))
    prefixes = {k.rsplit("/", 1)[0] for k in flat if k.endswith("/count")}
    prefixes = [p for p in prefixes if any(k.startswith(f"{p}/v_row/") for k in flat)]
    if len(prefixes) != 1:
        raise NoFitError("the checkpoint holds no Adafactor state")
    prefix = prefixes[0]
    keys = [f"{prefix}/{stat}/{name}" for name, stats in wanted.items() for stat in stats]
    for key in keys:
        stat, name = key[len(prefix) + 1:].split("/", 1)
        if key not in flat:
            raise NoFitError(f"no {stat} for {name}")
        if tuple(flat[key].shape) != wanted[name][stat]:
            raise NoFitError(f"{name}: {stat} is {tuple(flat[key].shape)} there, "
                             f"{wanted[name][stat]} here (factored differently)")
    # The stored containers (lists for optax's chain tuples) shape the restore target.
    template = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree["opt_state"])
    restored = flatten_params(restore_host_tree(source.state_dir, {"opt_state": template})
                              ["opt_state"])
    stats = {name: {stat: np.asarray(restored[f"{prefix}/{stat}/{name}"]) for stat in stats}
             for name, stats in wanted.items()}
    return stats, int(restored[f"{prefix}/count"])


def _t5x_keeps_for_v_row(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The axes (of flaxformer's layout) T5X's `v_row` keeps for a factored parameter."""
    if "/expert/" in name and len(shape) == 3:  # MoE rules: expert = batch, embed = row
        return (0, 2) if name.split("/")[-2] == "wo" else (0, 1)
    largest = int(np.argsort(shape, kind="stable")[-1])
    return tuple(i for i in range(len(shape)) if i != largest)


def _axis_groups(ours: Sequence[int], theirs: Sequence[int]) -> list[tuple[int, ...]] | None:
    """For each of their axes, the run of our axes it merges (row-major reshape); None when
    the shapes are not such a merge."""
    groups, i = [], 0
    for size in theirs:
        group, product = [], 1
        while i < len(ours) and (product < size or (ours[i] == 1 and not group)):
            group.append(i)
            product *= ours[i]
            i += 1
        if product != size:
            return None
        groups.append(tuple(group))
    return groups if i == len(ours) else None


def _t5x(source: T5xSource, wanted: dict[str, dict[str, tuple]], specs: dict[str, tuple]
         ) -> tuple[dict, int]:
    """Statistics of a T5X checkpoint, mapped onto ours (see the module docstring)."""
    available = source.checkpoint.param_states
    plan: dict[str, dict[str, str]] = {}  # our name -> our stat -> their key
    for name, stats in wanted.items():
        ff = flaxformer_name(name)
        keys = {stat: f"{ff}/{stat}" for stat in STATISTICS}
        missing = [k for k in keys.values() if k not in available]
        if missing:
            raise NoFitError(f"no {missing[0]} in the checkpoint")
        shapes = {stat: available[key][0] for stat, key in keys.items()}
        t5x_factored = shapes["v_row"] != (1,)
        if "v" in stats:  # unfactored here
            if t5x_factored:
                raise NoFitError(f"{ff} is factored there, not here (min_dim_size_to_factor)")
            if math.prod(shapes["v"]) != math.prod(stats["v"]):
                raise NoFitError(f"{ff}: v is {shapes['v']} there, {stats['v']} here")
            plan[name] = {"v": keys["v"]}
            continue
        if not t5x_factored:
            raise NoFitError(f"{ff} is factored here, not there (min_dim_size_to_factor)")
        param_shape = tuple(stats["shape"])
        ff_shape = flaxformer_shape(name, param_shape)
        groups = _axis_groups(param_shape, ff_shape)
        if groups is None:
            raise NoFitError(f"{ff}: {ff_shape} there, {param_shape} here")
        kept_ff = _t5x_keeps_for_v_row(ff, ff_shape)
        kept_ours = tuple(a for g in (groups[i] for i in kept_ff) for a in g)
        row_axes = tuple(i for i, r in enumerate(specs[name])
                         if r in (optimizers.BATCH, optimizers.ROW))
        if set(kept_ours) == set(row_axes):
            plan[name] = {"v_row": keys["v_row"], "v_col": keys["v_col"]}
        else:  # their v_row keeps our column axes: the same statistic under the other name
            plan[name] = {"v_row": keys["v_col"], "v_col": keys["v_row"]}
        for stat, key in plan[name].items():
            if math.prod(available[key][0]) != math.prod(stats[stat]):
                raise NoFitError(f"{key} is {available[key][0]} there, {stats[stat]} here")
    needed = sorted({k for p in plan.values() for k in p.values()})
    values = source.checkpoint.read(needed, group="param_states")
    out = {name: {stat: values[key].reshape(wanted[name][stat]) for stat, key in p.items()}
           for name, p in plan.items()}
    return out, source.step


# --- Putting them into the run's state -------------------------------------------------------


def carry_over_statistics(state: Any, path: str, factor_specs: Any,
                          step: int | None = None) -> tuple[Any, str]:
    """`state` with Adafactor's statistics (and their step count) from the checkpoint at
    `path` when they fit, else `state` as it is; and a line saying which happened."""
    try:
        state = _with_statistics(state, path, factor_specs, step)
    except NoFitError as e:
        message = (f"Optimizer state of {path} not used ({e}): the optimizer starts fresh.")
        logging.info(message)
        return state, message
    message = f"Optimizer state: Adafactor's statistics carried over from {path}."
    logging.info(message)
    return state, message


def _with_statistics(state: Any, path: str, factor_specs: Any, step: int | None) -> Any:
    opt_state = state["opt_state"]
    location = _factored_state_path(opt_state)
    fresh: optimizers.FactoredState = _get(opt_state, location)
    params = flatten_params(state["params"])
    specs = {} if factor_specs is None else {
        "/".join(str(getattr(k, "key", k)) for k in p): spec
        for p, spec in jax.tree_util.tree_flatten_with_path(
            factor_specs, is_leaf=lambda x: isinstance(x, tuple))[0]}
    flat = {stat: flatten_params(getattr(fresh, stat)) for stat in STATISTICS}
    wanted: dict[str, dict[str, tuple]] = {}
    for name in params:
        factored = flat["v_row"][name].ndim > 0
        stats = ("v_row", "v_col") if factored else ("v",)
        wanted[name] = {stat: tuple(flat[stat][name].shape) for stat in stats}
    source = open_param_source(path, step)
    if isinstance(source, T5xSource):
        shaped = {n: {**w, "shape": tuple(params[n].shape)} for n, w in wanted.items()}
        for name in params:
            specs.setdefault(name, optimizers.default_factor_spec(params[name].shape))
        stats, count = _t5x(source, shaped, specs)
    else:
        stats, count = _ours(source, wanted)
    new_fields = {"count": jax.device_put(jnp.asarray(count, fresh.count.dtype),
                                          fresh.count.sharding)}
    for stat in STATISTICS:
        leaves = {}
        for name, leaf in flat[stat].items():
            value = stats[name].get(stat)
            leaves[name] = leaf if value is None else jax.device_put(
                jnp.asarray(value, leaf.dtype), leaf.sharding)
        new_fields[stat] = unflatten_like(getattr(fresh, stat), leaves)
    replacement = optimizers.FactoredState(**new_fields)
    new_opt_state = jax.tree_util.tree_map_with_path(
        lambda p, node: replacement if p == location else node, opt_state,
        is_leaf=lambda x: isinstance(x, optimizers.FactoredState))
    return {**state, "opt_state": new_opt_state}


__all__ = ["NoFitError", "carry_over_statistics"]
