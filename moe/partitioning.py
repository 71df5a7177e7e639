"""Mesh and logical-axis rules: how named array axes map onto the ('data', 'expert', 'model') mesh.

Parameters and activations are annotated with *logical* axis names (`'embed'`, `'mlp'`,
`'expert'`, ...). The rules below translate them to mesh axes, as T5X's MoE partitioner does:
the batch is split over ('expert', 'data'), experts over 'expert', wide matrices over 'model'.
"""

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moe.errors import ConfigurationError

MESH_AXES = ("data", "expert", "model")
# The batch is split over both axes, expert-major (T5X's MoE partitioner).
BATCH_MESH_AXES = ("expert", "data")

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# The defaults of T5X's MoE partitioner (`moe_partitioning.standard_logical_axis_rules`).
DEFAULT_LOGICAL_AXIS_RULES: LogicalRules = (
    ("batch", ("expert", "data")),
    ("vocab", "model"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("joined_kv", "model"),
    ("length", None),
    ("relpos_buckets", None),
    ("abspos_buckets", None),
    ("layers", None),
    ("stack", None),
    ("expert", "expert"),
    # The group axis of expert inputs after the all-to-all: what is left of the batch split.
    ("expert_group", "data"),
    ("expert_replicas", "data"),
    ("unmodeled", None),
)


def expert_axis_size(num_data_parallel: int, num_expert_partitions: int) -> int:
    """The largest divisor of the data-parallel size that is <= num_expert_partitions (T5X)."""
    if num_expert_partitions < 1:
        raise ConfigurationError(
            f"num_expert_partitions must be >= 1, got {num_expert_partitions}."
        )
    for size in range(min(num_expert_partitions, num_data_parallel), 0, -1):
        if num_data_parallel % size == 0:
            return size
    return 1


def make_mesh(
    num_expert_partitions: int = 1,
    num_model_partitions: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ('data', 'expert', 'model') mesh over `devices` (default: all devices of all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if num_model_partitions < 1 or n % num_model_partitions:
        raise ConfigurationError(
            f"NUM_MODEL_PARTITIONS={num_model_partitions} must divide the {n} devices; "
            f"choose one of {[d for d in range(1, n + 1) if n % d == 0]}."
        )
    data_parallel = n // num_model_partitions
    expert = expert_axis_size(data_parallel, num_expert_partitions)
    shape = (data_parallel // expert, expert, num_model_partitions)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def _host_batch_slices(device_grid: np.ndarray) -> dict[int, frozenset[int]]:
    """For each process index, which batch slices its devices hold.

    `device_grid` is the mesh's [data, expert, model] device array; the batch is split over
    ('expert', 'data'), so the slice index of a device is `expert_index * data + data_index`.
    """
    data, expert, _ = device_grid.shape
    slices: dict[int, set[int]] = {}
    for d in range(data):
        for e in range(expert):
            for device in device_grid[d, e, :]:
                slices.setdefault(device.process_index, set()).add(e * data + d)
    return {process: frozenset(s) for process, s in slices.items()}


@dataclasses.dataclass(frozen=True)
class DataLayout:
    """Which part of the global batch this host reads (T5X's `DataLayout`).

    A host feeds `batch_size // num_shards` examples, the `shard_id`-th slice of the global batch.
    Hosts that hold the same batch slice (model-parallel replicas) read the same shard.
    """

    batch_size: int
    shard_id: int
    num_shards: int


def data_layout(device_grid: np.ndarray, batch_size: int, process_index: int) -> DataLayout:
    """The `DataLayout` of process `process_index` on a [data, expert, model] device grid."""
    per_host = _host_batch_slices(device_grid)
    distinct = sorted({tuple(sorted(s)) for s in per_host.values()})
    mine = tuple(sorted(per_host[process_index]))
    return DataLayout(batch_size, shard_id=distinct.index(mine), num_shards=len(distinct))


def _reduced_axes_of(leaf_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether `leaf_shape` is `shape` with some axes reduced to 1 (keepdims statistics)."""
    return len(leaf_shape) == len(shape) and leaf_shape != shape and all(
        n in (full, 1) for n, full in zip(leaf_shape, shape, strict=True))


@gin.configurable
class Partitioner:
    """Owns the ('data', 'expert', 'model') mesh and every sharding derived from it.

    Parameters carry logical axis names (`nn.with_logical_partitioning`); the logical axis rules
    turn them into mesh shardings. The batch is split over ('expert', 'data'), as in T5X's MoE
    partitioner, so that each expert shard sees its own slice of tokens before the all-to-all.
    Functions are compiled with `jax.jit(in_shardings=..., out_shardings=...)`.

    Use `with partitioner.context():` around model code that is traced (init, apply): it enters
    the mesh and the logical axis rules that the layers' `nn.with_logical_constraint` read.
    """

    def __init__(
        self,
        num_expert_partitions: int = 1,
        num_model_partitions: int = 1,
        logical_axis_rules: LogicalRules | None = None,
        devices: Sequence[jax.Device] | None = None,
    ):
        self.mesh = make_mesh(num_expert_partitions, num_model_partitions, devices)
        rules = DEFAULT_LOGICAL_AXIS_RULES if logical_axis_rules is None else logical_axis_rules
        self.logical_axis_rules: tuple[tuple[str, Any], ...] = tuple(
            (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules
        )
        for name, axes in self.logical_axis_rules:
            for axis in (axes,) if isinstance(axes, str) or axes is None else axes:
                if axis is not None and axis not in MESH_AXES:
                    raise ConfigurationError(
                        f"Logical axis rule ({name!r}, {axes!r}) names mesh axis {axis!r}; "
                        f"the mesh axes are {MESH_AXES}."
                    )

    # --- Mesh facts -----------------------------------------------------------------------

    @property
    def num_expert_partitions(self) -> int:
        return self.mesh.shape["expert"]

    @property
    def num_model_partitions(self) -> int:
        return self.mesh.shape["model"]

    @property
    def num_batch_shards(self) -> int:
        """How many slices the global batch is split into (data x expert axis sizes)."""
        return self.mesh.shape["data"] * self.mesh.shape["expert"]

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and the logical axis rules, for tracing sharded model code."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.logical_axis_rules):
            yield

    # --- Shardings ------------------------------------------------------------------------

    @property
    def batch_spec(self) -> PartitionSpec:
        return PartitionSpec(BATCH_MESH_AXES)

    @property
    def batch_sharding(self) -> NamedSharding:
        """Leading (batch) axis split over ('expert', 'data'); other axes replicated."""
        return NamedSharding(self.mesh, self.batch_spec)

    @property
    def replicated_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def logical_to_sharding(self, logical_specs: Any) -> Any:
        """A tree of logical PartitionSpecs (or None) -> a tree of NamedShardings."""
        return jax.tree.map(
            lambda spec: NamedSharding(
                self.mesh,
                PartitionSpec()
                if spec is None
                else nn.logical_to_mesh_axes(spec, self.logical_axis_rules),
            ),
            logical_specs,
            is_leaf=_is_spec_leaf,
        )

    def get_shardings(self, boxed_tree: Any) -> Any:
        """Shardings for a tree of (possibly abstract) variables still boxed in their logical axes.

        `boxed_tree` is what `jax.eval_shape(module.init, ...)` returns: leaves wrapped in
        `nn.LogicallyPartitioned` get their rule-mapped sharding, other leaves are replicated.
        The result has the structure of the *unboxed* tree (`nn.meta.unbox(boxed_tree)`).
        """
        shardings = self.logical_to_sharding(nn.get_partition_spec(boxed_tree))
        self._check_divisible(nn.meta.unbox(boxed_tree), shardings)
        return shardings

    def _check_divisible(self, abstract_tree: Any, shardings: Any) -> None:
        """Every sharded dimension must split evenly over its mesh axes (heads over 'model',
        experts over 'expert', ...): say which parameter does not, and what to change."""
        leaves = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
        for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings)):
            for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
                axes = (axes,) if isinstance(axes, str) else axes or ()
                parts = math.prod(self.mesh.shape[a] for a in axes)
                if size % parts:
                    raise ConfigurationError(
                        f"Parameter {jax.tree_util.keystr(path)} has size {size} in dimension "
                        f"{dim}, which is sharded over mesh axes {axes} of total size {parts}; "
                        f"{size} is not divisible by {parts}. Change NUM_MODEL_PARTITIONS / "
                        f"NUM_EXPERT_PARTITIONS or the model size (heads, experts, d_ff, vocab)."
                    )

    def optimizer_state_shardings(
        self, abstract_opt_state: Any, abstract_params: Any, param_shardings: Any
    ) -> Any:
        """Shardings for an optimizer state whose leaves mirror (some of) the parameters.

        A state leaf is matched to the parameter whose key path is a suffix of the leaf's path
        (optax states hold `mu`, `nu`, ... trees shaped like the params). A leaf with the same
        shape as its parameter takes the parameter's sharding, so that moments of expert
        weights stay expert-sharded. A leaf of the parameter's rank whose every axis is the
        parameter's or 1 (Adafactor's factored `v_row` [E, d, 1] and `v_col` [E, 1, f] of an
        expert kernel [E, d, f]) keeps the parameter's sharding on the axes it keeps, so
        expert statistics are split along the expert axis as T5X splits them; any other leaf
        (step counts, optax's rank-reduced factors) is replicated.
        """
        params_by_path = {
            tuple(path): (leaf.shape, sharding)
            for (path, leaf), sharding in zip(
                jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                jax.tree.leaves(param_shardings),
            )
        }

        def sharding_for(path, leaf):
            path = tuple(path)
            for start in range(len(path)):
                match = params_by_path.get(path[start:])
                if match is not None:
                    shape, sharding = match
                    leaf_shape = tuple(getattr(leaf, "shape", ()))
                    if leaf_shape == tuple(shape):
                        return sharding
                    if _reduced_axes_of(leaf_shape, shape) and hasattr(sharding, "spec"):
                        spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
                        kept = [axis if n == full else None
                                for axis, n, full in zip(spec, leaf_shape, shape, strict=True)]
                        return NamedSharding(sharding.mesh, PartitionSpec(*kept))
                    break
            return self.replicated_sharding

        return jax.tree_util.tree_map_with_path(sharding_for, abstract_opt_state)

    # --- Compilation and data -------------------------------------------------------------

    def partition(
        self,
        fn: Callable[..., Any],
        in_shardings: Any,
        out_shardings: Any,
        static_argnums: int | Sequence[int] = (),
        donate_argnums: int | Sequence[int] = (),
        compiler_options: dict[str, Any] | None = None,
    ) -> Callable[..., Any]:
        """`fn` compiled with `jax.jit` over the mesh, tracing inside `context()`."""
        jitted = jax.jit(
            fn,
            in_shardings=in_shardings,
            out_shardings=out_shardings,
            static_argnums=static_argnums,
            donate_argnums=donate_argnums,
            compiler_options=compiler_options,
        )

        @functools.wraps(fn)
        def run(*args, **kwargs):
            with self.context():
                return jitted(*args, **kwargs)

        run.lower = jitted.lower  # type: ignore[attr-defined]
        return run

    def get_data_layout(self, batch_size: int) -> DataLayout:
        """Which slice of a `batch_size` global batch this host must load.

        With one host: the whole batch. With several, hosts whose devices hold the same batch
        slices load the same shard (model-parallel replicas read identical data).
        """
        if batch_size % self.num_batch_shards:
            raise ConfigurationError(
                f"BATCH_SIZE={batch_size} is not divisible by the {self.num_batch_shards} batch "
                f"shards of the mesh {dict(self.mesh.shape)}; use a multiple of "
                f"{self.num_batch_shards}."
            )
        return data_layout(self.mesh.devices, batch_size, jax.process_index())

    def shard_batch(self, host_batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Host-local arrays (this host's shard of the batch) -> global batch-sharded arrays."""
        return {
            name: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x))
            for name, x in host_batch.items()
        }
