"""Per-layer routing diagnostics, computed from a `RoutingPlan`.

Everything is measured over real tokens only. The keys are what a model reports per layer under
`experts/<key>/<layer>` and averaged under `experts/<key>`.
"""

import jax
import jax.numpy as jnp

from moe.routing.plan import RoutingPlan

SCALAR_KEYS = (
    "auxiliary_loss",
    "router_z_loss",
    "fraction_tokens_left_behind",
    "expert_usage",
    "router_confidence",
    "router_entropy",
)


def per_token_sum(plan: RoutingPlan, slot_values: jax.Array) -> jax.Array:
    """Sum [G, E, C] slot values onto the tokens sitting in those slots: [G, T]."""
    num_groups, num_tokens = plan.padding_mask.shape
    totals = jnp.zeros((num_groups, num_tokens + 1), slot_values.dtype)  # +1: the empty slot
    totals = totals.at[jnp.arange(num_groups)[:, None], plan.slot_token.reshape(num_groups, -1)]
    return totals.add(slot_values.reshape(num_groups, -1))[:, :num_tokens]


def experts_per_token(plan: RoutingPlan) -> jax.Array:
    """[G, T] int32: how many experts each token was dispatched to."""
    return per_token_sum(plan, jnp.ones_like(plan.slot_token))


def expert_demand(plan: RoutingPlan) -> jax.Array:
    """[E] float32: the real tokens that chose each expert, before capacity (token choice), or
    the slots each expert filled (routers where experts choose)."""
    num_experts = plan.probs.shape[-1]
    if plan.choices is not None:
        selected = plan.choices.selected.astype(jnp.float32)
        one_hot = jax.nn.one_hot(plan.choices.experts, num_experts) * selected[..., None]
        return jnp.sum(one_hot, axis=(0, 1, 2))
    filled = plan.slot_token < plan.padding_mask.shape[1]
    return jnp.sum(filled.astype(jnp.float32), axis=(0, 2))


def routing_diagnostics(plan: RoutingPlan) -> dict[str, jax.Array]:
    """Scalars and small vectors describing one layer's routing for one step."""
    real = plan.padding_mask
    real_f = real.astype(jnp.float32)
    num_real = jnp.maximum(jnp.sum(real_f), 1.0)
    num_experts = plan.probs.shape[-1]
    real_mean = lambda v: jnp.sum(v * real_f) / num_real

    count = experts_per_token(plan)  # [G, T]
    filled = plan.slot_token < plan.padding_mask.shape[1]
    token_weight = per_token_sum(plan, plan.slot_weight)  # [G, T] total combine weight
    entropy = -jnp.sum(plan.probs * jnp.log(jnp.maximum(plan.probs, 1e-30)), axis=-1)
    histogram = jnp.sum(jax.nn.one_hot(count, num_experts + 1) * real_f[..., None], axis=(0, 1))

    if plan.choices is not None:
        choices = plan.choices
        selected = choices.selected.astype(jnp.float32)
        dropped = (choices.selected & ~choices.kept).astype(jnp.float32)
        drop_by_rank = jnp.sum(dropped, axis=(0, 1)) / jnp.maximum(jnp.sum(selected, (0, 1)), 1.0)
    else:
        drop_by_rank = real_mean((count == 0).astype(jnp.float32))[None]
    demand = expert_demand(plan)
    return {
        "auxiliary_loss": plan.auxiliary_loss,
        "router_z_loss": plan.router_z_loss,
        "fraction_tokens_left_behind": real_mean((count == 0).astype(jnp.float32)),
        "expert_usage": jnp.mean(filled.astype(jnp.float32)),
        "router_confidence": real_mean(token_weight),
        "router_entropy": real_mean(entropy),
        "drop_fraction_by_rank": drop_by_rank,
        # Share of routing demand per expert (pre-capacity for token choice); 1/E is balanced.
        "expert_load": demand / jnp.maximum(jnp.sum(demand), 1.0),
        "experts_per_token": histogram / num_real,
    }
