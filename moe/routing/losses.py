"""Router auxiliary losses: load balancing (Switch eq. 4) and z-loss (ST-MoE eq. 5).

Both skip padding tokens: a padded position is neither a token to balance nor a logit to shrink.

The balance loss counts f (the fraction of tokens routed to each expert) and P (the mean router
probability) per routing group ('group', Switch and flaxformer), or over every group of the
layer call ('batch': the global-batch balance loss of Qiu et al. 2025, all data shards at once,
since the groups of a global array span every device). A global count lets single sequences
specialize while the batch stays balanced. With microbatching, 'batch' counts the microbatch.
"""

from typing import Literal

import jax
import jax.numpy as jnp


def _masked_group_mean(values: jax.Array, real: jax.Array) -> jax.Array:
    """Mean over the tokens axis (1) of [G, T, ...] values, counting real tokens only."""
    weights = real.astype(values.dtype).reshape(real.shape + (1,) * (values.ndim - 2))
    count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    return jnp.sum(values * weights, axis=1) / count


BalanceScope = Literal["group", "batch"]
BALANCE_SCOPES = ("group", "batch")


def load_balancing_loss(
    probs: jax.Array, top_k_mask: jax.Array, real: jax.Array, scope: BalanceScope = "group"
) -> jax.Array:
    """`E^2 * mean_{groups, experts}(f * P)`, ~k for a balanced top-k router.

    Args:
      probs: [G, T, E] full softmax router probabilities (not the top-k weights).
      top_k_mask: [G, T, E] 1 where e is among the token's top-k choices, before capacity.
      real: [G, T] True for real tokens.
      scope: count f and P per group ('group') or over all groups together ('batch').
    """
    num_experts = probs.shape[-1]
    if scope == "batch":  # one group holding every token
        flat = lambda a: a.reshape(1, -1, *a.shape[2:])
        probs, top_k_mask, real = flat(probs), flat(top_k_mask), flat(real)
    fraction_routed = _masked_group_mean(top_k_mask.astype(jnp.float32), real)  # f [G, E]
    mean_prob = _masked_group_mean(probs, real)  # P [G, E]
    per_group = jnp.mean(fraction_routed * mean_prob, axis=-1) * num_experts**2  # [G]
    has_tokens = jnp.any(real, axis=1)
    return jnp.sum(jnp.where(has_tokens, per_group, 0.0)) / jnp.maximum(jnp.sum(has_tokens), 1)


def router_z_loss(logits: jax.Array, real: jax.Array) -> jax.Array:
    """Mean over real tokens of `logsumexp(logits)^2`, which keeps router logits small."""
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2  # [G, T]
    mask = real.astype(jnp.float32)
    return jnp.sum(z * mask) / jnp.maximum(jnp.sum(mask), 1.0)
