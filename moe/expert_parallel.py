"""Expert-parallel dropless dispatch: each device sends its tokens to the experts' devices.

Without it, the dropless dispatch (`moe.dispatch.dropless_moe`) flattens every group into one
grouped matmul over all experts; under a mesh with an 'expert' axis, XLA can only run that by
gathering every token (and every expert kernel) onto each device. Here the dispatch runs
inside `jax.shard_map` over the ('expert', 'data', 'model') mesh instead:

- the groups [G, T, d] are split like the batch (over ('expert', 'data')), the expert kernels
  [E, d, f] over 'expert' (and d_ff over 'model', Megatron style: each 'model' shard computes a
  slice of d_ff and the output matmul's partial sums are added with a `psum`);
- each device sorts its own (token, expert) choices by expert (`dropless_choices`, the code of
  the one-device dispatch), sends each row to the device that owns its expert with one
  all-to-all over 'expert', runs ONE grouped matmul over its local experts (the received rows
  re-sorted by local expert), and sends the results back the same way; they are weighted by the
  gates and summed per token in float32 as on one device.

The all-to-all moves each row once to its expert's device (and back), in place of a gather of
all tokens. `jax.lax.ragged_all_to_all` sends exactly the rows each peer needs; XLA:CPU cannot
run it (jax 0.10.2: "HLO opcode `ragged-all-to-all` is not supported by XLA:CPU"), so there a
fixed-size `jax.lax.all_to_all` emulates it with a worst-case buffer: any device may send all
its rows to one peer (every token chose that peer's experts), so each peer's block holds all
the sender's rows, and nothing is ever dropped. Both forms take the same arguments, so the
emulation checks on CPU the offsets the ragged form uses elsewhere. The receive side holds the
worst case in both: n blocks of a device's row count (static shapes cannot know the loads).
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec

from moe.dispatch import dropless_choices, plan_choices
from moe.errors import ConfigurationError
from moe.experts import RaggedMlp
from moe.routing.plan import RoutingPlan, TokenChoices

EXPERT_AXIS, DATA_AXIS, MODEL_AXIS = "expert", "data", "model"
# Groups are split like the batch: expert-major over ('expert', 'data').
GROUP_AXES = (EXPERT_AXIS, DATA_AXIS)
EXCHANGES = ("auto", "ragged", "padded")


def ragged_all_to_all_runs_on(platform: str) -> bool:
    """Whether XLA can compile `ragged-all-to-all` for `platform` (not XLA:CPU at jax 0.10.2)."""
    return platform != "cpu"


def padded_ragged_all_to_all(
    operand: jax.Array,
    output: jax.Array,
    input_offsets: jax.Array,
    send_sizes: jax.Array,
    output_offsets: jax.Array,
    recv_sizes: jax.Array,
    *,
    axis_name: str,
    max_rows_per_peer: int,
) -> jax.Array:
    """`jax.lax.ragged_all_to_all` through a fixed-size `jax.lax.all_to_all`.

    Same arguments and result: rows `input_offsets[j] : +send_sizes[j]` of `operand` land in
    peer j's `output` at its `output_offsets[j]` (an offset into the receiver's output, as in the
    ragged form); rows nobody writes keep `output`'s values. Each peer's block is
    `max_rows_per_peer` rows, the most any one send can hold, so no row is ever cut off.
    """
    num_peers = output_offsets.shape[0]
    rows = jnp.arange(max_rows_per_peer)
    source = input_offsets[:, None] + rows  # [n, R]
    sending = rows < send_sizes[:, None]
    source = jnp.where(sending, source, 0)
    blocks = jnp.where(_expand(sending, operand), operand[source], 0)  # [n, R, ...]
    received = jax.lax.all_to_all(blocks, axis_name, 0, 0)  # [n, R, ...]: block i from peer i
    # Where each peer wants its rows in my output (it computed the offsets for me).
    offsets_from = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # [n]
    target = offsets_from[:, None] + rows
    target = jnp.where(rows < recv_sizes[:, None], target, output.shape[0])  # past the end: drop
    flat = received.reshape(num_peers * max_rows_per_peer, *operand.shape[1:])
    return output.at[target.reshape(-1)].set(flat, mode="drop")


def _expand(mask: jax.Array, like: jax.Array) -> jax.Array:
    """[n, R] mask -> [n, R, 1, ...] to broadcast over `like`'s trailing axes."""
    return mask.reshape(*mask.shape, *([1] * (like.ndim - 1)))


def _exchange(ragged: bool, rows_per_peer: int) -> Callable[..., jax.Array]:
    """The ragged all-to-all over 'expert', or its fixed-size emulation."""
    if ragged:
        return functools.partial(jax.lax.ragged_all_to_all, axis_name=EXPERT_AXIS)
    return functools.partial(
        padded_ragged_all_to_all, axis_name=EXPERT_AXIS, max_rows_per_peer=rows_per_peer
    )


def _run_on_expert_devices(
    sorted_x: jax.Array,
    group_sizes: jax.Array,
    *,
    mlp: RaggedMlp,
    num_peers: int,
    ragged: bool,
    model_sharded: bool,
) -> jax.Array:
    """The `run_experts` of `dropless_choices` on one device: rows sorted by (global) expert,
    group_sizes [E] -> the experts' outputs in the same order, computed where the experts live.

    Experts are owned in contiguous blocks (device j holds experts j*E/n ... (j+1)*E/n - 1, the
    'expert' split of the kernels), so the rows for each peer are contiguous in `sorted_x`.
    """
    rows = sorted_x.shape[0]
    local_experts = mlp.output_kernel.shape[0]
    per_peer = group_sizes.reshape(num_peers, local_experts)  # [n, E/n]: rows I send to peer j
    send_sizes = per_peer.sum(axis=1).astype(jnp.int32)
    input_offsets = (jnp.cumsum(send_sizes) - send_sizes).astype(jnp.int32)
    counts_from = jax.lax.all_to_all(per_peer, EXPERT_AXIS, 0, 0, tiled=True)  # [n, E/n]
    recv_sizes = counts_from.sum(axis=1).astype(jnp.int32)
    me = jax.lax.axis_index(EXPERT_AXIS)
    exchange = _exchange(ragged, rows)

    # Out: peer i's rows land in my block i (the receive buffer holds the worst case).
    received = exchange(
        sorted_x, jnp.zeros((num_peers * rows, *sorted_x.shape[1:]), sorted_x.dtype),
        input_offsets, send_sizes, jnp.full((num_peers,), me * rows, jnp.int32), recv_sizes,
    )  # [n * R, d]
    # Each block is sorted by local expert; re-sort all blocks together for one grouped matmul.
    ends = jnp.cumsum(counts_from, axis=1)  # [n, E/n]
    local_expert = jax.vmap(lambda e: jnp.searchsorted(e, jnp.arange(rows), side="right"))(ends)
    order = jnp.argsort(local_expert.reshape(-1), stable=True)  # block padding sorts last
    out = mlp(received[order], counts_from.sum(axis=0).astype(jnp.int32))
    if model_sharded:  # each 'model' shard computed a slice of d_ff: add the partial outputs
        out = jax.lax.psum(out, MODEL_AXIS)
    out = jnp.zeros_like(out).at[order].set(out)  # back to the received layout

    # Back: block i returns to peer i, at the offset where peer i's rows for me started.
    offsets_at_peer = jax.lax.all_to_all(input_offsets, EXPERT_AXIS, 0, 0, tiled=True)  # [n]
    return exchange(
        out, jnp.zeros((rows, *out.shape[1:]), out.dtype),
        jnp.arange(num_peers, dtype=jnp.int32) * rows, recv_sizes, offsets_at_peer, send_sizes,
    )  # [R, d], in the order of sorted_x


def _mesh_axis(mesh: AbstractMesh, name: str) -> int:
    return mesh.shape.get(name, 1) if not mesh.empty else 1


def expert_parallel(mesh: AbstractMesh | None = None) -> bool:
    """Whether the dropless dispatch runs expert-parallel: a mesh whose 'expert' axis is > 1."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return _mesh_axis(mesh, EXPERT_AXIS) > 1


def dropless(
    x: jax.Array, plan: RoutingPlan, mlp: RaggedMlp, *, exchange: str = "auto"
) -> jax.Array:
    """The dropless dispatch, x [G, T, d] -> [G, T, d] float32: expert-parallel when the current
    mesh (`jax.sharding.get_abstract_mesh()`) has an 'expert' axis > 1, else `dropless_moe`.

    `exchange`: 'ragged' (`jax.lax.ragged_all_to_all`), 'padded' (the worst-case fixed-size
    all-to-all) or 'auto' (ragged wherever the mesh's platform can compile it).
    """
    if exchange not in EXCHANGES:
        raise ConfigurationError(f"Unknown exchange {exchange!r}; choose one of {EXCHANGES}.")
    choices = plan_choices(plan)
    num_experts = plan.probs.shape[-1]
    mesh = jax.sharding.get_abstract_mesh()
    if not expert_parallel(mesh):
        return dropless_choices(x, choices, num_experts, mlp)
    num_peers = _mesh_axis(mesh, EXPERT_AXIS)
    if num_experts % num_peers:
        raise ConfigurationError(
            f"dispatch='dropless' splits the {num_experts} experts over the mesh's 'expert' axis "
            f"of size {num_peers}, which does not divide them; pick NUM_EXPERT_PARTITIONS "
            f"dividing NUM_EXPERTS."
        )
    ragged = exchange == "ragged" or (
        exchange == "auto" and ragged_all_to_all_runs_on(mesh.abstract_device.platform)
    )
    return _sharded_dropless(x, choices, num_experts, mlp, mesh, ragged=ragged)


def _sharded_dropless(
    x: jax.Array,
    choices: TokenChoices,
    num_experts: int,
    mlp: RaggedMlp,
    mesh: AbstractMesh,
    *,
    ragged: bool,
) -> jax.Array:
    """`dropless_choices` on each device's groups inside `jax.shard_map`, experts remote."""
    manual = tuple(a for a in (EXPERT_AXIS, DATA_AXIS, MODEL_AXIS) if a in mesh.axis_names)
    group_axes = tuple(a for a in GROUP_AXES if a in manual)
    shards = math.prod(_mesh_axis(mesh, a) for a in group_axes)
    model_sharded = _mesh_axis(mesh, MODEL_AXIS) > 1
    num_groups = x.shape[0]
    pad = -num_groups % shards  # empty groups (nothing selected) so that G splits evenly
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0), (0, 0)))
        choices = jax.tree.map(lambda a: jnp.pad(a, ((0, pad), (0, 0), (0, 0))), choices)

    def local(x, choices, mlp):
        mlp = mlp.fold_in(jax.lax.axis_index(manual))
        run = functools.partial(
            _run_on_expert_devices, mlp=mlp, num_peers=_mesh_axis(mesh, EXPERT_AXIS),
            ragged=ragged, model_sharded=model_sharded,
        )
        return dropless_choices(x, choices, num_experts, run)

    model = MODEL_AXIS if MODEL_AXIS in manual else None
    groups = PartitionSpec(group_axes)
    mlp_specs = mlp.replace(
        input_kernels=tuple(PartitionSpec(EXPERT_AXIS, None, model) for _ in mlp.input_kernels),
        output_kernel=PartitionSpec(EXPERT_AXIS, model, None),
        dropout_rng=None if mlp.dropout_rng is None else PartitionSpec(),
    )
    out = jax.shard_map(
        local, mesh=mesh, in_specs=(groups, groups, mlp_specs), out_specs=groups,
        axis_names=frozenset(manual),
        # The grouped matmul traces every backend's branch (`jax.lax.platform_dependent`), and
        # the TPU branch's Pallas kernel declares no varying-axes types, which check_vma needs.
        check_vma=False,
    )(x, choices, mlp)
    return out[:num_groups]
