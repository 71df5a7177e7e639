"""The Flax shell around the routing functions: router weights, float32 logits, jitter.

All routing math lives in the router specs (`moe.routing.RouterSpec`); this module only owns
the parameters and the randomness each spec asks for (RNG stream 'router'), so routers can be
tested as plain functions.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe.routing.interface import RouterSpec
from moe.routing.plan import RoutingPlan


class RouterWeights(nn.Module):
    """The router kernel W_r [d_model, E], float32, no bias."""

    num_experts: int
    kernel_init: nn.initializers.Initializer

    @nn.compact
    def __call__(self, d_model: int) -> jax.Array:
        return self.param(
            "w",
            nn.with_logical_partitioning(self.kernel_init, ("embed", "unmodeled")),
            (d_model, self.num_experts),
            jnp.float32,
        )


class Router(nn.Module):
    """Computes router logits `h = x W_r` (no bias, float32) and routes them with `spec`."""

    num_experts: int
    spec: RouterSpec
    # flaxformer's router init: small logits, so routing starts near uniform.
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(stddev=2e-2)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        padding_mask: jax.Array | None,
        *,
        deterministic: bool,
        capacity: int | None = None,
    ) -> RoutingPlan:
        """x: [G, T, d_model] -> a routing plan for each group."""
        # Selective precision (Switch Transformer, section 2.4): the router always runs in
        # float32.
        x = x.astype(jnp.float32)
        noise = self.spec.noise(deterministic)
        if noise.input_jitter > 0:
            x = x * self._jitter(x.shape, noise.input_jitter)
        # Parameter path router/router_weights/w, as in flaxformer checkpoints.
        w = RouterWeights(self.num_experts, self.kernel_init, name="router_weights")(x.shape[-1])
        logits = jnp.einsum("gtd,de->gte", x, w)  # [G, T, E]
        if noise.logit_jitter > 0:
            logits = logits * self._jitter(logits.shape, noise.logit_jitter)
        rng = self.make_rng("router") if noise.needs_rng else None
        return self.spec.route(
            logits, padding_mask, deterministic=deterministic, rng=rng, capacity=capacity
        )

    def _jitter(self, shape: tuple[int, ...], eps: float) -> jax.Array:
        """Multiplicative noise U(1 - eps, 1 + eps), training only."""
        return jax.random.uniform(self.make_rng("router"), shape, jnp.float32, 1 - eps, 1 + eps)
