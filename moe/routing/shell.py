"""The Flax shell around the routing functions: router weights, float32 logits, jitter.

All routing math lives in the router specs (`moe.routing.RouterSpec`); this module only owns
the parameters and the randomness each spec asks for (RNG stream 'router'), so routers can be
tested as plain functions.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe.errors import ConfigurationError
from moe.routing.interface import RouterSpec
from moe.routing.metrics import expert_demand
from moe.routing.plan import RoutingPlan

# Non-parameter collections of routers with state: the state itself, and the routing demand a
# training step measured (from which the state is updated after the step).
ROUTER_STATE, ROUTER_LOADS = "router_state", "router_loads"
# The counts a router's loss takes over the whole batch (`RouterSpec.batch_counts`): sown by a
# forward pass over a step's microbatches, then given back to each gradient pass.
BATCH_COUNTS = "batch_counts"


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
        outputs = self.num_experts * self.spec.logits_per_expert
        w = RouterWeights(outputs, self.kernel_init, name="router_weights")(x.shape[-1])
        logits = jnp.einsum("gtd,de->gte", x, w)  # [G, T, E * logits_per_expert]
        if noise.logit_jitter > 0:
            logits = logits * self._jitter(logits.shape, noise.logit_jitter)
        rng = self.make_rng("router") if noise.needs_rng else None
        state = self._current_state()
        # Given only to the gradient passes of a microbatched step (see `BATCH_COUNTS`).
        given = dict(self.variables.get(BATCH_COUNTS, {}))
        plan = self.spec.route(
            logits, padding_mask, deterministic=deterministic, rng=rng, capacity=capacity,
            **({"state": state} if state else {}),
            **({"batch_counts": given} if given else {}),
        )
        # Only in the trainer's counting pass (not at init, which makes every collection
        # mutable).
        if self.is_mutable_collection(BATCH_COUNTS) and not self.is_initializing():
            for name, count in self.spec.batch_counts(plan).items():
                self.sow(BATCH_COUNTS, name, count,
                         init_fn=lambda c=count: jnp.zeros_like(c), reduce_fn=jnp.add)
        if state and not deterministic:
            # Summed over the step's microbatches by the trainer, then `spec.update_state`.
            demand = expert_demand(plan)
            self.sow(ROUTER_LOADS, "expert_load", demand,
                     init_fn=lambda: jnp.zeros_like(demand), reduce_fn=jnp.add)
        return plan

    def _current_state(self) -> dict[str, jax.Array]:
        """The spec's state, from the 'router_state' collection (created at initialization)."""
        initial = self.spec.initial_state(self.num_experts)
        for name in initial:
            if not self.is_initializing() and not self.has_variable(ROUTER_STATE, name):
                raise ConfigurationError(
                    f"{type(self.spec).__name__} keeps state ({name!r}) in the "
                    f"'{ROUTER_STATE}' collection, which this call did not pass: give the "
                    "model the router state restored with the parameters (the train state's "
                    "'router_state')."
                )
        return {
            name: self.variable(ROUTER_STATE, name, lambda v=value: v).value
            for name, value in initial.items()
        }

    def _jitter(self, shape: tuple[int, ...], eps: float) -> jax.Array:
        """Multiplicative noise U(1 - eps, 1 + eps), training only."""
        return jax.random.uniform(self.make_rng("router"), shape, jnp.float32, 1 - eps, 1 + eps)
