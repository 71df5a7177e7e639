"""Orbax checkpoints: periodic asynchronous saves, restore, partial restore and upcycling.

Fine-grained upcycling (DeepSeekMoE-style) splits each dense MLP's hidden units instead of
copying them: the shared experts take the first units, the E routed experts the rest, f each;
see `HiddenSplit`.

A checkpoint step directory `MODEL_DIR/checkpoints/<step>/` holds two items:
- `state`: the train state `{'step', 'params', 'opt_state'}`, plus `'router_state'` for
  routers that keep state (Orbax's standard pytree format);
- `data`: JSON with the position of the training data iterator, so that a restart continues
  on exactly the examples the run would have seen.

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save never leaves a half-written checkpoint behind that `latest_step` would pick.

Restoring onto another mesh, or in another dtype, is a matter of the *abstract target*: each
leaf's `jax.ShapeDtypeStruct` carries the sharding and dtype wanted, and Orbax reshards and
casts while reading.

Partial restore (T5X's `assignment_map`): the parameters of a new model are filled from a
checkpoint by name. Each target parameter path (`'encoder/layers_1/mlp/expert/wi_0'`) is looked
up through the first rule `(target_regex, source)` whose regex matches it fully: `source` is a
substitution (`r'\1'` style) giving the checkpoint path, or None to keep the fresh
initialization. Sparse upcycling is a partial restore where an expert kernel `[E, ...]` takes
a dense kernel `[...]` from the checkpoint, copied into every expert.
"""

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from moe import file_io
from moe.checkpoint_errors import CheckpointError
from moe.checkpoint_sources import (
    DATA_ITEM,
    STATE_ITEM,
    OrbaxSource,
    T5xSource,
    _path_str,
    absolute_path,
    flatten_params,
    open_param_source,
    resolve_state_dir,
    unflatten_like,
)
from moe.interop import t5x_checkpoint, t5x_gin
from moe.orbax_arrays import metadata_tree, read_host_arrays
from moe.routing.shell import ROUTER_STATE

AssignmentMap = Sequence[tuple[str, str | None]]

MAX_PROBLEMS_SHOWN = 12  # a mismatched model gin fails every parameter alike


@gin.configurable
class Checkpointer:
    """Saves and restores train states under `directory` (T5X's checkpoint period and keep).

    `period`: save every `period` steps (a final save is forced by the trainer).
    `keep`: how many recent checkpoints to keep (None keeps all).
    `async_save`: write in a background thread while training continues.
    """

    def __init__(
        self,
        directory: str,
        period: int = 1000,
        keep: int | None = None,
        async_save: bool = True,
    ):
        self.directory = absolute_path(directory)
        self.period = period
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=1,  # the period is decided in `save`
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=True,
            ),
            item_names=(STATE_ITEM, DATA_ITEM),
        )

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: Mapping[str, Any], force: bool = False
             ) -> bool:
        """Save at `step` if it is a multiple of the period (or `force`); returns whether it did."""
        if not force and step % self.period:
            return False
        if step in self.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardSave(state),
                    DATA_ITEM: ocp.args.JsonSave(dict(data_state)),
                }
            ),
            force=True,
        )

    def delete_after(self, step: int) -> list[int]:
        """Delete the checkpoints after `step` (restarting from an earlier one); returns them."""
        later = [s for s in self.all_steps() if s > step]
        for s in later:
            self._manager.delete(s)
        return later

    def wait_until_finished(self) -> None:
        """Block until asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore `(state, data_state)` at `step` (default: the latest) into `abstract_state`.

        `abstract_state` is a tree of `jax.ShapeDtypeStruct` with the wanted shardings and
        dtypes (for example `jax.eval_shape` of the state initializer, plus shardings).
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise CheckpointError(
                f"No checkpoint at step {step} in {self.directory}; available steps: "
                f"{self.all_steps()}."
            )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                    DATA_ITEM: ocp.args.JsonRestore(),
                }
            ),
        )
        return restored[STATE_ITEM], dict(restored[DATA_ITEM] or {})

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


# ---------------------------------------------------------------------------------------------
# Partial restore from another checkpoint (fine-tuning, upcycling, T5X checkpoints)
# ---------------------------------------------------------------------------------------------


def checkpoint_param_shapes(state_dir: epath.Path) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shapes and dtypes of every parameter in one of our saved states."""
    return OrbaxSource.open(epath.Path(state_dir)).shapes


def _source_for(target: str, assignment_map: AssignmentMap) -> str | None:
    for pattern, replacement in assignment_map:
        if re.fullmatch(pattern, target):
            return None if replacement is None else re.sub(
                f"^(?:{pattern})$", replacement, target
            )
    return target


@dataclasses.dataclass(frozen=True)
class HiddenSplit:
    """Hidden units [start, start + num_experts * units) of a dense MLP kernel along `axis`
    (wi: the last, wo: the first), as `num_experts` stacked kernels (or one plain kernel)."""

    axis: int
    start: int
    units: int
    num_experts: int | None  # None: a plain (shared-experts) kernel

    def take(self, dense: np.ndarray) -> np.ndarray:
        count = self.units * (self.num_experts or 1)
        part = np.take(dense, np.arange(self.start, self.start + count), axis=self.axis)
        if self.num_experts is None:
            return part
        # [d, E*f] -> [E, d, f] (wi), [E*f, d] -> [E, f, d] (wo)
        pieces = np.split(part, self.num_experts, axis=self.axis)
        return np.stack(pieces)


def _hidden_split(name: str, shape: tuple[int, ...], stored: tuple[int, ...]
                  ) -> HiddenSplit | None:  # fmt: skip
    """How an expert or shared-experts MLP kernel takes part of a dense one's hidden units
    (fine-grained upcycling), or None.

    Routed experts `.../expert/{wi,wi_0,wi_1,wo}` [E, ...] take the dense kernel's last E*f
    units, expert e the e-th f of them; shared experts `.../shared_experts/...` take the first
    s. Together they tile the dense units exactly (checked), so with every expert chosen at gate
    1 the sparse layer computes the dense one.
    """
    kernel = name.rsplit("/", 1)[-1]
    if kernel not in ("wi", "wi_0", "wi_1", "wo"):
        return None
    routed, shared = "/expert/" in name, "/shared_experts/" in name
    if not (routed or shared):
        return None
    dense_shape = shape[1:] if routed else shape
    axis = 0 if kernel == "wo" else len(dense_shape) - 1
    if len(dense_shape) != len(stored) or any(
        a != b for i, (a, b) in enumerate(zip(dense_shape, stored)) if i != axis
    ):
        return None
    units, total = dense_shape[axis], stored[axis]
    if routed:
        experts = shape[0]
        if experts * units > total:
            return None
        return HiddenSplit(axis, total - experts * units, units, experts)
    return HiddenSplit(axis, 0, units, None) if units < total else None


def _untiled_splits(plan: Mapping[str, Any]) -> list[str]:
    """Problems where the shared and routed slices of a dense kernel do not tile its units."""
    by_source: dict[str, list[tuple[str, HiddenSplit]]] = {}
    for name, entry in plan.items():
        if entry is not None and isinstance(entry[1], HiddenSplit):
            by_source.setdefault(entry[0], []).append((name, entry[1]))
    problems = []
    for source_name, splits in by_source.items():
        shared = sum(s.units for _, s in splits if s.num_experts is None)
        routed_start = {s.start for _, s in splits if s.num_experts is not None}
        if routed_start != {shared}:
            problems.append(
                f"{source_name}: shared experts take its first {shared} hidden units and the "
                f"routed experts start at {sorted(routed_start)}; fine-grained upcycling needs "
                "NUM_SHARED_EXPERTS * EXPERT_MLP_DIM + NUM_EXPERTS * EXPERT_MLP_DIM = MLP_DIM "
                f"of the dense model ({[n for n, _ in splits]})"
            )
    return problems


def put_like(value: np.ndarray, leaf: Any) -> jax.Array:
    """`value` (a host array, or a broadcast view of one) as an array of `leaf`'s dtype and
    sharding, each device building only its own shard.

    Sparse upcycling broadcasts a dense kernel to [E, ...]: materializing that on the host
    would hold E copies (64 x 64 MB for an 8B/64E layer). Here each addressable device reads
    its slice of the view (`jax.make_array_from_callback`), so the host holds one shard at a
    time, and in multi-host runs each host builds only its devices' shards.
    """
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        return jnp.asarray(value, dtype=leaf.dtype)
    return jax.make_array_from_callback(
        tuple(leaf.shape), sharding, lambda index: np.asarray(value[index], dtype=leaf.dtype)
    )


def restore_params_from(
    path: str,
    init_params: Any,
    assignment_map: AssignmentMap = (),
    fallback_to_scratch: bool = False,
    step: int | None = None,
    strict: bool = True,
    model_config: Any = None,
) -> tuple[Any, dict[str, str]]:
    """Fill `init_params` (a tree of initialized arrays) from the checkpoint at `path`, one of
    ours or a T5X one (see `moe.checkpoint_sources`).

    Returns the new parameters (same tree, shardings and dtypes as `init_params`: values are
    cast, reshaped from the checkpoint's layout and resharded) and a report
    `{target_path: source_path | 'initialized'}`.

    A target whose source is missing raises `CheckpointError` unless `fallback_to_scratch`
    (then it keeps its initialization). A source of shape `S` fills a target of shape
    `(E, *S)` by copying it into each of the E experts (sparse upcycling). With `strict`, a
    checkpoint parameter that no target takes is an error too: the model would silently be a
    different network (fewer layers, tied instead of separate logits, ...). With
    `model_config` (the model's TransformerConfig), a T5X checkpoint that has its config.gin
    beside it is also checked against it for what shapes cannot show (heads x head_dim, top-k,
    activation, ...).
    """
    source = open_param_source(path, step)
    if model_config is not None and isinstance(source, T5xSource):
        gin_path = t5x_checkpoint.gin_written_with(source.checkpoint.step_dir)
        if gin_path is not None:
            try:
                t5x_gin.check_config_against_checkpoint_gin(model_config, gin_path)
            except t5x_gin.T5xGinError as e:
                raise CheckpointError(str(e)) from e
    targets = flatten_params(init_params)

    plan: dict[str, tuple[str, tuple[int, ...]] | None] = {}
    problems = []
    for name, leaf in targets.items():
        source_name = _source_for(name, assignment_map)
        if source_name is None:
            plan[name] = None
            continue
        stored = source.stored_shape(source_name)
        if stored is None:
            if fallback_to_scratch:
                plan[name] = None
                continue
            problems.append(f"{name} <- {source_name}: not in the checkpoint")
            continue
        shape = tuple(leaf.shape)
        split = _hidden_split(name, shape, stored)
        if stored == source.expected_shape(source_name, shape):
            plan[name] = (source_name, shape)
        elif shape and stored == source.expected_shape(source_name, shape[1:]):
            plan[name] = (source_name, shape[1:])  # upcycling: one copy per expert
        elif split is not None and stored == source.expected_shape(source_name, stored):
            plan[name] = (source_name, split)  # fine-grained upcycling: a slice of the units
        else:
            problems.append(
                f"{name}: the model's shape is {shape}, the checkpoint's "
                f"{source.native_name(source_name)} has {stored} (this model would need "
                f"{source.expected_shape(source_name, shape)})"
            )
    problems += _untiled_splits(plan)
    if strict:
        used = {p[0] for p in plan.values() if p is not None}
        unused = source.unused(used)
        if unused:
            problems.append(
                f"checkpoint parameters no model parameter takes: {sorted(unused)}"
            )
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise CheckpointError(
            f"The model does not fit the checkpoint {source.description}:\n  "
            + "\n  ".join(shown)
            + "\nUse the model gin the checkpoint was trained with (for a T5X checkpoint, its "
            "config.gin, or `python -m moe.convert from_t5x` to write ours), fix the macros "
            "that differ (EMBED_DIM, NUM_HEADS, NUM_EXPERTS, ...), or add assignment_map rules "
            "(target_regex, source or None) / fallback_to_scratch=True for deliberate changes."
        )

    needed = sorted({p[0] for p in plan.values() if p is not None})
    loaded = source.read(needed)

    new_leaves = {}
    report = {}
    for name, leaf in targets.items():
        if plan[name] is None:
            new_leaves[name] = leaf
            report[name] = "initialized"
            continue
        source_name, shape = plan[name]
        if isinstance(shape, HiddenSplit):
            value = shape.take(loaded[source_name])
        else:
            value = loaded[source_name].reshape(shape)
        if value.shape != leaf.shape:  # sparse upcycling: one copy of the dense kernel per expert
            value = np.broadcast_to(value, leaf.shape)  # a view: no copy is made here
        new_leaves[name] = put_like(value, leaf)
        report[name] = source_name
    flat_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(init_params)[0]]
    treedef = jax.tree.structure(init_params)
    params = jax.tree.unflatten(treedef, [new_leaves[_path_str(p)] for p in flat_paths])
    initialized = [k for k, v in report.items() if v == "initialized"]
    logging.info(
        "Restored %d parameters from %s; %d freshly initialized: %s",
        len(report) - len(initialized), source.description, len(initialized), initialized,
    )
    return params, report


def restore_router_state_from(path: str, init_router_state: Any, step: int | None = None) -> Any:
    """The routers' state (`'router_state'` of our train state) of the checkpoint at `path`, in
    the shardings of `init_router_state`; `init_router_state` itself when the checkpoint has
    none (a T5X or converted checkpoint, or one written before the model had router state),
    with a line saying so. A state of another shape is a `CheckpointError`."""
    source = open_param_source(path, step)
    stored = {}
    if isinstance(source, OrbaxSource):
        tree = metadata_tree(source.state_dir)
        if ROUTER_STATE in tree:
            stored = {k: (tuple(m.shape), m.dtype)
                      for k, m in flatten_params(tree[ROUTER_STATE]).items()}
    targets = flatten_params(init_router_state)
    if not stored:
        print(f"{source.description} holds no router state: the routers' state starts from "
              "its initialization.", flush=True)
        return init_router_state
    wrong = {k: (tuple(v.shape), stored.get(k, (None,))[0]) for k, v in targets.items()
             if stored.get(k, (None,))[0] != tuple(v.shape)}
    if wrong:
        raise CheckpointError(
            f"The router state of {source.description} does not fit the model "
            f"(name: (model shape, checkpoint shape)): {wrong}. Use the model gin the checkpoint "
            "was trained with."
        )
    arrays = read_host_arrays(source.state_dir,
                              {f"{ROUTER_STATE}/{k}": stored[k] for k in targets})
    return unflatten_like(init_router_state, {
        k: put_like(arrays[f"{ROUTER_STATE}/{k}"], leaf) for k, leaf in targets.items()
    })


def save_params(model_dir: str, params: Any, step: int = 0) -> str:
    """Write `params` as one of our checkpoints under `model_dir/checkpoints/<step>` (a
    converted checkpoint: state `{'step', 'params'}`, no optimizer state), usable as
    INITIAL_CHECKPOINT_PATH or CHECKPOINT_PATH. Complete or absent: Orbax renames the step
    into place only when it is fully written. Returns the checkpoint directory."""
    directory = str(absolute_path(model_dir) / "checkpoints")
    checkpointer = Checkpointer(directory, period=1, async_save=False)
    try:
        checkpointer.save(step, {"step": np.asarray(step, np.int32), "params": params}, {},
                          force=True)
    finally:
        checkpointer.close()
    return str(absolute_path(directory) / str(step))


def directory_is_writable(path: str) -> None:
    """Raise a clear error now if MODEL_DIR cannot be created or written."""
    try:
        file_io.check_writable(path)  # a gs:// MODEL_DIR too
    except OSError as e:
        raise CheckpointError(
            f"MODEL_DIR {path!r} is not writable ({e.strerror}). Choose a directory you can "
            "write, e.g. --gin.MODEL_DIR=\"'/tmp/moe_run'\"."
        ) from e


__all__ = [
    "AssignmentMap",
    "CheckpointError",
    "Checkpointer",
    "checkpoint_param_shapes",
    "directory_is_writable",
    "flatten_params",
    "resolve_state_dir",
    "restore_params_from",
    "save_params",
]
