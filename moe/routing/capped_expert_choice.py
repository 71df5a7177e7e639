"""EC-CAP: expert choice where no token gets more than b experts (Zhou et al. 2022, section 3).

Solves the entropy-regularized assignment LP (`capped_assignment`), rounds it to an integral
assignment that respects both caps, then lets each expert keep its chosen tokens as slots.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe.errors import ConfigurationError
from moe.routing import capped_assignment
from moe.routing.expert_choice import ExpertChoice, plan_from_expert_scores
from moe.routing.plan import RoutingPlan, check_logits, real_mask
from moe.routing.registry import register_router


def route_capped_experts_choose(
    logits: jax.Array,
    padding_mask: jax.Array | None,
    *,
    capacity: int,
    max_experts_per_token: int,
    entropy_weight: float = 1e-3,
    num_iterations: int = 100,
) -> RoutingPlan:
    """EC-CAP: expert choice where no token gets more than `max_experts_per_token` experts.

    Solves the entropy-regularized assignment LP (Dykstra's alternating projections), rounds it
    to an integral assignment that respects both caps, then lets each expert keep its chosen
    tokens as slots. Gates are the router probabilities, as in plain expert choice.
    """
    check_logits(logits)
    logits = logits.astype(jnp.float32)
    real = real_mask(padding_mask, logits.shape[:2])
    probs = jax.nn.softmax(logits, axis=-1)
    scores = jnp.swapaxes(probs, 1, 2)  # [G, E, T]
    # The assignment is discrete: gradients reach the router through the gates only.
    log_assignment = capped_assignment.solve_capped_assignment(
        jax.lax.stop_gradient(scores),
        real,
        capacity,
        max_experts_per_token,
        entropy_weight,
        num_iterations,
    )
    assigned = capped_assignment.round_assignment(
        log_assignment, real, capacity, max_experts_per_token
    )
    # Only assigned tokens can fill a slot; among them, the router's preference orders slots.
    priority = jnp.where(assigned, jax.lax.stop_gradient(scores), -jnp.inf)
    return plan_from_expert_scores(logits, probs, real, priority, capacity)



@register_router
@dataclasses.dataclass(frozen=True)
class CappedExpertChoice(ExpertChoice):
    """EC-CAP: expert choice with at most `max_experts_per_token` (b) experts per token.

    `entropy_weight` (lambda) and `num_iterations` are the paper's 0.001 and 100.
    """

    max_experts_per_token: int = 2
    entropy_weight: float = 1e-3
    num_iterations: int = 100

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if not 1 <= self.max_experts_per_token <= num_experts:
            raise ConfigurationError(
                f"CappedExpertChoice.max_experts_per_token={self.max_experts_per_token} must be "
                f"between 1 and num_experts={num_experts}."
            )
        if self.entropy_weight <= 0 or self.num_iterations < 1:
            raise ConfigurationError(
                "CappedExpertChoice needs entropy_weight > 0 and num_iterations >= 1."
            )

    def _route_with_capacity(
        self, logits: jax.Array, padding_mask: jax.Array | None, capacity: int
    ) -> RoutingPlan:
        return route_capped_experts_choose(
            logits,
            padding_mask,
            capacity=capacity,
            max_experts_per_token=self.max_experts_per_token,
            entropy_weight=self.entropy_weight,
            num_iterations=self.num_iterations,
        )
