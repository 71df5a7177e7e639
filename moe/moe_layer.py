"""The MoE layer: group tokens, route, dispatch to the experts, run them, combine.

The layer owns no routing rule (see `moe.routing`) and no dispatch arithmetic (see
`moe.dispatch`); it only arranges the data and the shardings:

    x [B, L, d] -> tokens [N, d] -> groups [G, T, d]           (G sharded like the batch)
    -> expert buffers [G, E, C, d] -> [E, G, C, d]              (all-to-all: E over 'expert')
    -> experts -> [E, G, C, d] -> [G, E, C, d] -> combine [G, T, d] -> [B, L, d]

Groups are contiguous slices of the flattened [B*L] tokens. Two formulas choose how many:
'fewest' (ours, `group_shape`) and 'flaxformer' (`flaxformer_group_shape`), which reproduces
flaxformer's `_num_groups` and its padding of the batch or length so that checkpoints trained
there route the same tokens together here.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from moe import expert_parallel
from moe.dispatch import BUFFERED_DISPATCH
from moe.errors import ConfigurationError
from moe.expert_matmul import IMPLEMENTATIONS as EXPERT_MATMULS
from moe.experts import MlpExperts
from moe.grouped_matmul import IMPLEMENTATIONS
from moe.routing import RouterSpec, TokenChoice
from moe.routing.interface import DISPATCHES
from moe.routing.metrics import routing_diagnostics
from moe.routing.shell import Router

# Logical axes of expert buffers: [G, E, C, d] split like the batch, then [E, G, C, d] split
# over the experts (what is left of the batch split stays on the group axis).
GROUP_SHARDED = ("batch", "unmodeled", "expert_capacity", "embed")
EXPERT_SHARDED = ("expert", "expert_group", "expert_capacity", "embed")


def group_shape(
    num_tokens: int, max_group_size: int, num_expert_partitions: int
) -> tuple[int, int]:
    """(number of groups G, tokens per group T) for `num_tokens` tokens.

    G is the fewest groups of at most `max_group_size` tokens, rounded up to a multiple of the
    expert partitions so that groups split evenly over the expert shards. T*G may exceed
    num_tokens: the remainder is padding that is never routed and is removed afterwards.
    """
    num_groups = math.ceil(num_tokens / max_group_size)
    num_groups = math.ceil(num_groups / num_expert_partitions) * num_expert_partitions
    return num_groups, math.ceil(num_tokens / num_groups)


def flaxformer_group_shape(
    batch: int,
    length: int,
    max_group_size: int,
    num_experts: int,
    num_expert_replicas: int = 1,
) -> tuple[int, int, int, int]:
    """(padded batch, padded length, G, T) as flaxformer's MoeLayer computes them.

    If the B*L tokens are not a multiple of `num_experts * num_expert_replicas`, flaxformer
    pads whichever of the batch or the length needs fewer padding tokens (its `_maybe_pad`;
    ties pad the length). Then G is the smallest count >= N // max_group_size and >= that
    multiple that divides N and is a multiple of it (its `_num_groups`); T = N / G.
    """
    total_experts = num_experts * num_expert_replicas
    if (batch * length) % total_experts:
        pad_batch = next(p for p in range(1, total_experts + 1)
                         if ((batch + p) * length) % total_experts == 0)
        pad_length = next(p for p in range(1, total_experts + 1)
                          if (batch * (length + p)) % total_experts == 0)
        if pad_length * batch > pad_batch * length:
            batch += pad_batch
        else:
            length += pad_length
    num_tokens = batch * length
    num_groups = max(num_tokens // max_group_size, total_experts)
    while num_groups < num_tokens and (
        num_tokens % num_groups or num_groups % total_experts
    ):
        num_groups += 1
    return batch, length, num_groups, num_tokens // num_groups


GROUP_FORMULAS = ("fewest", "flaxformer")


@functools.cache
def _warn_capacity_leak(router: RouterSpec) -> None:
    """Say once per router configuration that it leaks the future through capacity."""
    logging.warning(
        "%s with fill_order='rank' in a causal stack: with a capacity, a later token's first "
        "choice can take the slot an earlier token's second choice needed, so training leaks "
        "the future through capacity (as GShard and flaxformer decoders do). "
        "fill_order='token' or dispatch='dropless' is causal; allow_causal=True silences this.",
        type(router).__name__,
    )


def _batch_shards() -> int:
    """How many ways the current mesh splits the batch (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = nn.logical_to_mesh_axes(("batch",))[0]
    axes = (axes,) if isinstance(axes, str) else axes or ()
    return math.prod(mesh.shape.get(axis, 1) for axis in axes)


@functools.cache
def _warn_groups_do_not_split(num_groups: int, shards: int) -> None:
    logging.warning(
        "The MoE layer routes %d groups, which the mesh's %d batch shards cannot split "
        "evenly: XLA gathers the layer's tokens across devices instead of moving only the "
        "expert buffers. Make the group count a multiple of %d: lower GROUP_SIZE (at most "
        "tokens per batch / %d) or raise the batch.",
        num_groups, shards, shards, shards,
    )


def _warn_if_groups_do_not_split(num_groups: int, dispatch: str) -> None:
    """Say once when capacity dispatch groups cannot be split like the batch (dropless pads
    its groups to the shards itself)."""
    shards = _batch_shards()
    if dispatch != "dropless" and num_groups % shards:
        _warn_groups_do_not_split(num_groups, shards)


class MoeLayer(nn.Module):
    """Sparse feed-forward block: a router and `num_experts` stacked expert MLPs.

    Attributes:
      num_experts: E.
      d_ff: hidden size of each expert.
      router: a router spec (`moe.routing.RouterSpec`: `TokenChoice`, `ExpertChoice`, ...).
      activation: 'relu', 'gelu', 'gated-gelu', ... (see `moe.activations`).
      dispatch: 'index' (gather/scatter), 'mask' (einsum, TPU style) or 'dropless'
        (token choice, `ragged_dot`, no capacity; expert-parallel by all-to-all under a mesh
        with an 'expert' axis, see `moe.expert_parallel`).
      max_group_size: tokens per routing group at most; capacity is per group.
      num_expert_partitions: size of the mesh's 'expert' axis the layer is laid out for; the
        number of groups is a multiple of it, and E must be divisible by it.
      expert_dropout_rate: dropout inside the experts (training only).
      dtype: activation dtype of the experts (the router always computes in float32).
      param_dtype: dtype the expert kernels are stored in: float32 (T5X's convention, cast to
        `dtype` each step) or bfloat16 (half the memory, and no per-step cast of every expert's
        weights and gradients: at 64 experts on a GPU those casts took over half as long as
        the grouped matmuls). The router's kernel stays float32.
      causal: True inside a causal decoder: routers that look at later tokens are refused,
        those that leak through capacity are warned about (see `moe.routing.Causality`).
      kernel_init_scale: variance scale of the expert kernels (T5X MoE configs use 0.1).
      group_formula: 'fewest' (`group_shape`) or 'flaxformer' (`flaxformer_group_shape`).
      num_expert_replicas: the replica count of the 'flaxformer' formula.
      router_init_stddev: the router kernel's initial stddev (flaxformer's 2e-2: routing
        starts near uniform); 0 initializes it to zero, so every token scores every expert
        alike (fine-grained upcycling then computes the dense function exactly).
      grouped_matmul: how dropless runs its experts (`moe.grouped_matmul`): 'auto' picks per
        backend; 'blocked', 'megablox', 'mosaic_gpu' or 'ragged_dot' force one (benchmarks).
      expert_matmul: how index and mask dispatch run their experts' batched matmuls
        (`moe.expert_matmul`): 'auto' picks the CPU kernel where it pays; 'xla' or
        'cpu_kernel' force one (benchmarks).
    """

    num_experts: int
    d_ff: int
    router: RouterSpec = TokenChoice()
    activation: str = "gated-gelu"
    dispatch: str = "index"
    max_group_size: int = 4096
    num_expert_partitions: int = 1
    expert_dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    causal: bool = False
    kernel_init_scale: float = 1.0
    group_formula: str = "fewest"
    num_expert_replicas: int = 1
    router_init_stddev: float = 2e-2
    grouped_matmul: str = "auto"
    expert_matmul: str = "auto"

    def check_config(self) -> None:
        """Raise a ConfigurationError naming the problem and the fix for a bad configuration."""
        if self.num_experts < 1:
            raise ConfigurationError(f"num_experts must be >= 1, got {self.num_experts}.")
        self.router.validate(self.num_experts)
        if self.dispatch not in DISPATCHES:
            raise ConfigurationError(
                f"Unknown dispatch {self.dispatch!r}; choose one of {list(DISPATCHES)}."
            )
        if self.dispatch not in self.router.dispatches:
            why = {
                "dropless": "works with token choice only (routers that can route without "
                "capacity)",
                "index": "needs slots that each hold one token",
            }.get(self.dispatch, "is not one this router supports")
            raise ConfigurationError(
                f"dispatch={self.dispatch!r} {why}; {type(self.router).__name__} runs with "
                f"{list(self.router.dispatches)}. Use dispatch={self.router.dispatches[0]!r}."
            )
        if self.num_expert_partitions < 1 or self.num_experts % self.num_expert_partitions:
            raise ConfigurationError(
                f"num_experts={self.num_experts} is not divisible by num_expert_partitions="
                f"{self.num_expert_partitions}; pick NUM_EXPERT_PARTITIONS dividing NUM_EXPERTS."
            )
        if self.max_group_size < 1:
            raise ConfigurationError(f"max_group_size must be >= 1, got {self.max_group_size}.")
        if self.group_formula not in GROUP_FORMULAS:
            raise ConfigurationError(
                f"Unknown group_formula {self.group_formula!r}; choose one of "
                f"{list(GROUP_FORMULAS)}."
            )
        if self.grouped_matmul != "auto" and self.grouped_matmul not in IMPLEMENTATIONS:
            raise ConfigurationError(
                f"Unknown grouped_matmul {self.grouped_matmul!r}; choose 'auto' or one of "
                f"{sorted(IMPLEMENTATIONS)}."
            )
        if self.expert_matmul not in ("auto", *EXPERT_MATMULS):
            raise ConfigurationError(
                f"Unknown expert_matmul {self.expert_matmul!r}; choose 'auto' or one of "
                f"{list(EXPERT_MATMULS)}."
            )
        if self.num_expert_replicas < 1:
            raise ConfigurationError(
                f"num_expert_replicas must be >= 1, got {self.num_expert_replicas}."
            )
        if self.causal and not self.router.allow_causal:
            self._check_causality()

    def _check_causality(self) -> None:
        """Refuse routers that look ahead in a causal stack; warn once about capacity leaks."""
        causality = self.router.causality
        if causality == "looks_ahead":
            raise ConfigurationError(
                f"{type(self.router).__name__} compares tokens across the whole group (expert "
                "choice or batch-prioritized routing), so in a causal decoder a token's routing "
                "depends on later tokens and leaks the future. Use TokenChoice without "
                "batch_prioritized in the decoder, or set allow_causal=True on the router to "
                "accept the leakage knowingly."
            )
        if causality == "leaks_through_capacity" and self.dispatch != "dropless":
            _warn_capacity_leak(self.router)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        padding_mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """x [batch, length, d_model], padding_mask [batch, length] (1 = real) -> [B, L, d]."""
        self.check_config()
        if x.ndim != 3:
            raise ValueError(f"MoeLayer expects x as [batch, length, d_model], got {x.shape}.")
        batch, length, d_model = x.shape
        if padding_mask is not None and padding_mask.shape != (batch, length):
            raise ValueError(
                f"padding_mask has shape {padding_mask.shape}; expected (batch, length) = "
                f"{(batch, length)}."
            )
        real = jnp.ones((batch, length), bool) if padding_mask is None else padding_mask
        # Padding is routed like a real token when the router does not ignore it (flaxformer).
        real = real.astype(bool) | (not self.router.ignore_padding_tokens)
        if self.group_formula == "flaxformer":
            padded_batch, padded_length, num_groups, group_size = flaxformer_group_shape(
                batch, length, self.max_group_size, self.num_experts, self.num_expert_replicas
            )
            # flaxformer pads with zero tokens, which its routers route unless they ignore
            # padding tokens.
            grow = ((0, padded_batch - batch), (0, padded_length - length))
            x = jnp.pad(x, (*grow, (0, 0)))
            real = jnp.pad(real, grow, constant_values=not self.router.ignore_padding_tokens)
        else:
            padded_batch, padded_length = batch, length
            num_groups, group_size = group_shape(
                batch * length, self.max_group_size, self.num_expert_partitions
            )
        _warn_if_groups_do_not_split(num_groups, self.dispatch)
        num_tokens = padded_batch * padded_length
        pad = num_groups * group_size - num_tokens
        tokens = jnp.pad(x.reshape(num_tokens, d_model), ((0, pad), (0, 0)))
        real = jnp.pad(real.reshape(-1), (0, pad)).reshape(num_groups, group_size)
        grouped = tokens.reshape(num_groups, group_size, d_model)  # [G, T, d]
        grouped = nn.with_logical_constraint(grouped, ("batch", "unmodeled", "embed"))

        dropless = self.dispatch == "dropless"
        router_init = (nn.initializers.normal(self.router_init_stddev) if self.router_init_stddev
                       else nn.initializers.zeros)
        plan = Router(self.num_experts, self.router, router_init, name="router")(
            grouped, real, deterministic=deterministic, capacity=group_size if dropless else None
        )
        experts = MlpExperts(
            num_experts=self.num_experts,
            d_ff=self.d_ff,
            activation=self.activation,
            dropout_rate=self.expert_dropout_rate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init_scale=self.kernel_init_scale,
            grouped_matmul=self.grouped_matmul,
            expert_matmul=self.expert_matmul,
            name="expert",
        )
        grouped = grouped.astype(self.dtype)
        if dropless:
            # Expert-parallel (shard_map + all-to-all) under a mesh with an 'expert' axis.
            out = experts(grouped, deterministic=deterministic,
                          dropless=lambda xs, mlp: expert_parallel.dropless(xs, plan, mlp))
        else:
            dispatch, combine = BUFFERED_DISPATCH[self.dispatch]
            expert_in = dispatch(grouped, plan)  # [G, E, C, d]
            expert_in = nn.with_logical_constraint(expert_in, GROUP_SHARDED)
            # Resharding from group-sharded to expert-sharded is the all-to-all.
            expert_in = nn.with_logical_constraint(
                jnp.swapaxes(expert_in, 0, 1), EXPERT_SHARDED
            )  # [E, G, C, d]
            expert_out = experts(expert_in, deterministic=deterministic)
            expert_out = nn.with_logical_constraint(expert_out, EXPERT_SHARDED)
            expert_out = nn.with_logical_constraint(
                jnp.swapaxes(expert_out, 0, 1), GROUP_SHARDED
            )  # [G, E, C, d]
            out = combine(expert_out, plan)  # [G, T, d]
        out = nn.with_logical_constraint(out, ("batch", "unmodeled", "embed"))
        self.sow("moe", "diagnostics", routing_diagnostics(plan))
        # Each token's most probable expert, [batch, length]: kept only when the caller asks
        # for the 'intermediates' collection (`moe.logits` compares it with other codebases).
        top1 = jnp.argmax(plan.probs, axis=-1).reshape(-1)[:num_tokens]
        self.sow("intermediates", "router_top1_expert",
                 top1.reshape(padded_batch, padded_length)[:batch, :length])
        out = out.reshape(num_groups * group_size, d_model)[:num_tokens]
        return out.reshape(padded_batch, padded_length, d_model)[:batch, :length]
