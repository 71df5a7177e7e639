"""What every router returns: a slot-major `RoutingPlan`, and the capacity arithmetic they share.

Notation (the Switch, GShard and Expert Choice papers): a group holds T tokens, E experts,
k experts per token, capacity factor cf, C slots per expert. The plan's core is slot-major: for
each expert slot, which token sits in it and with which combine weight. The layer's dispatch
implementations (mask/einsum, index, dropless) all read that one plan, so they cannot disagree
about who goes where.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

from moe.errors import ConfigurationError

CapacityFormula = Literal["scaled", "flaxformer"]
CAPACITY_FORMULAS = ("scaled", "flaxformer")


@struct.dataclass
class TokenChoices:
    """Token-major view of a token-choice routing (shapes [G, T, k], rank-major priority)."""

    experts: jax.Array  # [G, T, k] int32 expert chosen at each rank (pre-capacity)
    gates: jax.Array  # [G, T, k] float32 combine weight the policy defines for that choice
    selected: jax.Array  # [G, T, k] bool: real token and kept by the second-expert policy
    kept: jax.Array  # [G, T, k] bool: selected and within the expert's capacity
    # [G, T, k] int32: each kept choice's flat slot e * C + c in the plan's buffers, E * C
    # where not kept (the inverse of `RoutingPlan.slot_token`; lets the index dispatch move
    # rows by gathers only). None: routers that do not provide it.
    slot: jax.Array | None = None


@struct.dataclass
class SoftWeights:
    """Dense dispatch and combine weights of routers whose slots mix tokens (Soft MoE).

    A slot's input is `sum_t dispatch[g, e, c, t] x[g, t]` and a token's output
    `sum_{e,c} combine[g, e, c, t] y[g, e, c]`: the mask dispatch with these weights in place
    of the one-hot slot assignment and the slot weights.
    """

    dispatch: jax.Array  # [G, E, C, T] float32, each slot's weights over the tokens
    combine: jax.Array  # [G, E, C, T] float32, each token's weights over the slots


@struct.dataclass
class RoutingPlan:
    """Which token goes to which expert slot, with which weight, and what the router costs.

    `slot_token[g, e, c] == T` marks an empty slot (its weight is 0). A token that appears in no
    slot is dropped: the MoE branch gives it exactly zero and it passes through the residual.
    """

    slot_token: jax.Array  # [G, E, C] int32 in [0, T]
    slot_weight: jax.Array  # [G, E, C] float32
    probs: jax.Array  # [G, T, E] float32 router probabilities (full softmax)
    logits: jax.Array  # [G, T, E] float32 router logits
    padding_mask: jax.Array  # [G, T] bool, True for real tokens
    auxiliary_loss: jax.Array  # scalar
    router_z_loss: jax.Array  # scalar
    choices: TokenChoices | None = None  # routers where tokens choose experts only
    # Routers whose slots mix tokens only. `slot_token` then names each slot's largest
    # contributor (for the diagnostics); only the mask dispatch reads the weights.
    soft: SoftWeights | None = None

    @property
    def capacity(self) -> int:
        return self.slot_token.shape[-1]


def expert_capacity(
    num_tokens: int,
    num_experts: int,
    capacity_factor: float,
    num_selected_experts: int = 1,
    formula: CapacityFormula = "scaled",
    min_capacity: int = 4,
) -> int:
    """Slots per expert per group.

    - 'scaled' (default): `ceil(cf * k * T / E)`. Total slots are cf times the k*T assignments,
      so cf = 1 fits a perfectly balanced top-k router without drops (GShard's paper sizes top-2
      as 2N/(G*E)).
    - 'flaxformer': `round(cf * T / E)`, which does not grow with k: top-2 at cf 1.25 then drops
      >= 37.5% of assignments even under perfect balance.
    Both are floored at `min_capacity` and capped at T (an expert never holds a token twice).
    """
    if capacity_factor <= 0:
        raise ConfigurationError(f"capacity_factor must be > 0, got {capacity_factor}.")
    if formula == "scaled":
        capacity = math.ceil(capacity_factor * num_selected_experts * num_tokens / num_experts)
    elif formula == "flaxformer":
        capacity = round(capacity_factor * num_tokens / num_experts)
    else:
        raise ConfigurationError(
            f"Unknown capacity_formula {formula!r}; use 'scaled' or 'flaxformer'."
        )
    return max(1, min(max(min_capacity, capacity), num_tokens))


def spec_capacity(
    spec, num_tokens: int, num_experts: int, deterministic: bool, num_selected_experts: int = 1
) -> int:
    """`expert_capacity` from a spec's capacity settings: its eval capacity factor when
    `deterministic` and it has one (else training's), formula and minimum."""
    factor = spec.capacity_factor
    if deterministic and spec.eval_capacity_factor is not None:
        factor = spec.eval_capacity_factor
    return expert_capacity(num_tokens, num_experts, factor, num_selected_experts,
                           spec.capacity_formula, spec.min_capacity)


def check_capacity_settings(spec) -> None:
    """Refuse non-positive capacity factors, a minimum capacity below 1 and unknown formulas."""
    name = type(spec).__name__
    for field in ("capacity_factor", "eval_capacity_factor"):
        value = getattr(spec, field)
        if value is not None and value <= 0:
            raise ConfigurationError(f"{name}.{field} must be > 0, got {value}.")
    if spec.min_capacity < 1:
        raise ConfigurationError(f"{name}.min_capacity must be >= 1, got {spec.min_capacity}.")
    if spec.capacity_formula not in CAPACITY_FORMULAS:
        raise ConfigurationError(
            f"Unknown {name}.capacity_formula {spec.capacity_formula!r}; use 'scaled' or "
            "'flaxformer'."
        )


def real_mask(padding_mask: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
    """[G, T] bool: True for real tokens (all of them without a padding mask)."""
    if padding_mask is None:
        return jnp.ones(shape, bool)
    return padding_mask.astype(bool)


def check_logits(logits: jax.Array) -> None:
    """Refuse router logits that are not [groups, tokens, experts]."""
    if logits.ndim != 3:
        raise ValueError(
            f"Router logits must be [groups, tokens, experts], got shape {logits.shape}."
        )
