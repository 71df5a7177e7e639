"""Expert choice routing (Zhou et al. 2022): each expert takes its top k_e = cf*T/E tokens.

Load is balanced by construction (no auxiliary loss); a token may get zero, one or many experts.
The choice compares tokens across the whole group, so in a causal decoder a token's routing
depends on later tokens: the router is not causal-safe.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe.routing import losses
from moe.routing.interface import CAPACITY_DISPATCHES, Causality, RouterDefaults
from moe.routing.plan import (
    CapacityFormula,
    RoutingPlan,
    check_capacity_settings,
    check_logits,
    real_mask,
    spec_capacity,
)
from moe.routing.registry import register_router


def plan_from_expert_scores(
    logits: jax.Array, probs: jax.Array, real: jax.Array, priority: jax.Array, capacity: int
) -> RoutingPlan:
    """Each expert takes its `capacity` top tokens by `priority` [G, E, T]; gates are `probs`."""
    num_tokens = logits.shape[1]
    priority = jnp.where(real[:, None, :], priority, -jnp.inf)
    _, token_index = jax.lax.top_k(priority, capacity)  # [G, E, C]
    chosen_real = jnp.take_along_axis(
        jnp.broadcast_to(real[:, None, :], priority.shape), token_index, axis=-1
    )
    chosen_priority = jnp.take_along_axis(priority, token_index, axis=-1)
    valid = chosen_real & (chosen_priority > -jnp.inf)
    gates = jnp.take_along_axis(jnp.swapaxes(probs, 1, 2), token_index, axis=-1)
    return RoutingPlan(
        slot_token=jnp.where(valid, token_index, num_tokens).astype(jnp.int32),
        slot_weight=jnp.where(valid, gates, 0.0),
        probs=probs,
        logits=logits,
        padding_mask=real,
        auxiliary_loss=jnp.zeros((), jnp.float32),  # balanced by construction
        router_z_loss=losses.router_z_loss(logits, real),
    )


def route_experts_choose(
    logits: jax.Array, padding_mask: jax.Array | None, *, capacity: int
) -> RoutingPlan:
    """Expert choice (Zhou et al. 2022): each expert takes its top-`capacity` tokens by S^T."""
    check_logits(logits)
    logits = logits.astype(jnp.float32)
    real = real_mask(padding_mask, logits.shape[:2])
    probs = jax.nn.softmax(logits, axis=-1)
    return plan_from_expert_scores(logits, probs, real, jnp.swapaxes(probs, 1, 2), capacity)


@register_router
@dataclasses.dataclass(frozen=True)
class ExpertChoice(RouterDefaults):
    """Expert choice routing: each expert takes its top k_e = cf*T/E tokens of the group.

    It compares tokens across the whole group, so in a causal decoder a token's routing depends
    on later tokens (the model can learn to cheat). Causal stacks refuse it unless
    `allow_causal=True`. `ignore_padding_tokens` and `capacity_formula` as for `TokenChoice`
    (with k = 1: 'scaled' is ceil(cf*T/E), 'flaxformer' round(cf*T/E)).
    """

    capacity_factor: float = 2.0
    eval_capacity_factor: float | None = None
    min_capacity: int = 1
    allow_causal: bool = False
    ignore_padding_tokens: bool = True
    capacity_formula: CapacityFormula = "scaled"

    @property
    def causality(self) -> Causality:
        """Each expert ranks all tokens of the group, later ones included."""
        return "looks_ahead"

    # Each expert takes a fixed number of tokens: there is no drop-free capacity.
    dispatches = CAPACITY_DISPATCHES

    def experts_per_token(self, group_size: int, num_experts: int) -> float:
        """Slots are cf times the tokens, so a token reaches cf experts on average."""
        del group_size, num_experts
        return float(self.capacity_factor)

    def validate(self, num_experts: int) -> None:
        del num_experts
        check_capacity_settings(self)

    def capacity(self, num_tokens: int, num_experts: int, deterministic: bool) -> int:
        return spec_capacity(self, num_tokens, num_experts, deterministic)

    def route(
        self,
        logits: jax.Array,
        padding_mask: jax.Array | None,
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
        capacity: int | None = None,
    ) -> RoutingPlan:
        del rng
        capacity = self.group_capacity(logits, capacity, deterministic)
        return self._route_with_capacity(logits, padding_mask, capacity)

    def _route_with_capacity(
        self, logits: jax.Array, padding_mask: jax.Array | None, capacity: int
    ) -> RoutingPlan:
        return route_experts_choose(logits, padding_mask, capacity=capacity)
