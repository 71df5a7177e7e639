"""Router auxiliary losses: load balancing (Switch eq. 4) and z-loss (ST-MoE eq. 5).

Both skip padding tokens: a padded position is neither a token to balance nor a logit to shrink.

The balance loss counts f (the fraction of tokens routed to each expert) and P (the mean router
probability) per routing group ('group', Switch and flaxformer), or over every group of the
layer call ('batch': the global-batch balance loss of Qiu et al. 2025, all data shards at once,
since the groups of a global array span every device). A global count lets single sequences
specialize while the batch stays balanced.

A batch split into calls (the trainer's microbatches) is balanced over the whole batch by giving
each call the whole batch's counts (`balance_counts`, summed over the calls and divided by their
number): f is then the batch's, and each call's P sums its own tokens' probabilities over the
batch's tokens per call, so the mean of the calls' losses is the whole batch's loss. f is
counted by a forward pass before any gradient pass (P is linear in the tokens, f is not).
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


def balance_counts(top_k_mask: jax.Array, real: jax.Array) -> dict[str, jax.Array]:
    """What the 'batch' scope counts over every group of a call: `selected` [E], the real
    tokens whose pre-capacity top-k includes each expert, and `tokens` [], the real tokens.

    Sums, so the counts of a batch split into calls are the sum of the calls' counts.
    """
    weights = real.astype(jnp.float32)
    return {
        "selected": jnp.sum(top_k_mask.astype(jnp.float32) * weights[..., None], axis=(0, 1)),
        "tokens": jnp.sum(weights),
    }


def load_balancing_loss(
    probs: jax.Array,
    top_k_mask: jax.Array,
    real: jax.Array,
    scope: BalanceScope = "group",
    batch_counts: dict[str, jax.Array] | None = None,
) -> jax.Array:
    """`E^2 * mean_{groups, experts}(f * P)`, ~k for a balanced top-k router.

    Args:
      probs: [G, T, E] full softmax router probabilities (not the top-k weights).
      top_k_mask: [G, T, E] 1 where e is among the token's top-k choices, before capacity.
      real: [G, T] True for real tokens.
      scope: count f and P per group ('group') or over all groups together ('batch').
      batch_counts: 'batch' only: the counts (`balance_counts`) of the whole batch this call
        is part of, summed over the calls and divided by their number. f is
        `selected / tokens` and P this call's probabilities summed over real tokens, divided by
        `tokens`, so the mean over the calls is the loss of the whole batch in one call.
        None: the call's own counts (the call is the batch).
    """
    num_experts = probs.shape[-1]
    if batch_counts is not None and scope != "batch":
        raise ValueError(
            f"batch_counts are counts of the 'batch' balance scope; scope={scope!r} counts each "
            "group on its own. Pass batch_counts only with scope='batch'."
        )
    if scope == "batch":
        counts = balance_counts(top_k_mask, real) if batch_counts is None else batch_counts
        tokens = jnp.maximum(counts["tokens"], 1.0)
        fraction_routed = counts["selected"] / tokens  # f [E]
        # Elementwise, not a matmul: exact float32 sums on every backend.
        prob_sum = jnp.sum(probs * real[..., None].astype(probs.dtype), axis=(0, 1))
        mean_prob = prob_sum / tokens  # P [E]
        return jnp.mean(fraction_routed * mean_prob) * num_experts**2
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
