"""Routers: router logits for groups of tokens -> a `RoutingPlan` that every dispatch reads.

One module per router, each implementing the `RouterSpec` interface and registered for gin as
`moe.routing.<Name>`; adding a router is adding a module like these and importing it below.

    interface.py             RouterSpec (what the layer needs to know), RouterNoise
    plan.py                  RoutingPlan, TokenChoices, expert_capacity
    registry.py              register_router, ROUTERS (every router by name)
    token_choice.py          TokenChoice: top-k (Switch k=1, GShard k=2), BPR, 2nd-expert policies
    expert_choice.py         ExpertChoice: each expert takes its top cf*T/E tokens
    capped_expert_choice.py  CappedExpertChoice (EC-CAP): at most b experts per token
    sigmoid_token_choice.py  SigmoidTokenChoice: DeepSeek-V3 sigmoid gating, group-limited
    soft_moe.py              SoftMoe: slots that mix all tokens (encoders only)
    capped_assignment.py     EC-CAP's assignment LP (Dykstra) and its rounding
    losses.py                load-balancing loss and router z-loss
    metrics.py               per-layer routing diagnostics of a plan
    shell.py                 Router: the Flax module owning the router weights and randomness
"""

from moe.routing.capped_expert_choice import CappedExpertChoice, route_capped_experts_choose
from moe.routing.expert_choice import ExpertChoice, route_experts_choose
from moe.routing.interface import CAUSALITIES, NO_NOISE, Causality, RouterNoise, RouterSpec
from moe.routing.plan import RoutingPlan, SoftWeights, TokenChoices, expert_capacity
from moe.routing.registry import ROUTERS, register_router
from moe.routing.sigmoid_token_choice import SigmoidTokenChoice, route_sigmoid_tokens_choose
from moe.routing.soft_moe import SoftMoe, route_soft
from moe.routing.token_choice import TokenChoice, route_tokens_choose

__all__ = [
    "CAUSALITIES",
    "NO_NOISE",
    "ROUTERS",
    "CappedExpertChoice",
    "Causality",
    "ExpertChoice",
    "RouterNoise",
    "RouterSpec",
    "RoutingPlan",
    "SigmoidTokenChoice",
    "SoftMoe",
    "SoftWeights",
    "TokenChoice",
    "TokenChoices",
    "expert_capacity",
    "register_router",
    "route_capped_experts_choose",
    "route_experts_choose",
    "route_sigmoid_tokens_choose",
    "route_soft",
    "route_tokens_choose",
]
