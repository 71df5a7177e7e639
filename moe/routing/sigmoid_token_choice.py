"""DeepSeek-V3 gating: sigmoid affinities, top-k on affinity + bias, normalized scaled gates.

Each token scores every expert with s = sigmoid(logit) (independent per expert, unlike a
softmax). The k experts are chosen on s + b, where b is a per-expert selection bias (the
auxiliary-loss-free balancer's state; zero without one), optionally only among the best expert
groups (group-limited routing: experts form `num_expert_groups` groups, a group scores the sum
of its two best biased affinities, and only the `num_selected_groups` best groups compete). The
gates use the unbiased affinities of the chosen experts, normalized to sum 1 and multiplied by
`routed_scaling_factor`: the bias changes who is chosen, never how much they weigh.

Auxiliary-loss-free balancing (Wang et al. 2024, DeepSeek-V3): with `bias_update_rate` u > 0
the router keeps b as state, and after each train step `b += u * sign(mean_load - load)` from
that step's global expert loads (tokens choosing each expert, all devices and microbatches).
The bias is fixed within a step, so it keeps the router causal.

Capacity, drops and the fill order are those of `TokenChoice`. The optional sequence-wise
balance loss is DeepSeek-V3's `sum_e f_e P_e` with f_e = E/(k T) * (tokens choosing e) and
P_e the mean normalized affinity, per routing group (a sequence when GROUP_SIZE = length).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe.errors import ConfigurationError
from moe.routing import losses
from moe.routing.plan import (
    CapacityFormula,
    RoutingPlan,
    TokenChoices,
    check_capacity_settings,
    check_logits,
    real_mask,
)
from moe.routing.registry import register_router
from moe.routing.token_choice import (
    FillOrder,
    TopKRouter,
    check_fill_order,
    check_num_selected_experts,
    pre_capacity_mask,
    slots_from_choices,
)


def group_limited_scores(
    scores: jax.Array, num_expert_groups: int, num_selected_groups: int
) -> jax.Array:
    """[G, T, E] selection scores with the experts outside each token's best groups at -inf."""
    *lead, num_experts = scores.shape
    grouped = scores.reshape(*lead, num_expert_groups, num_experts // num_expert_groups)
    best_two = jax.lax.top_k(grouped, min(2, grouped.shape[-1]))[0]
    group_score = jnp.sum(best_two, axis=-1)  # [G, T, groups]
    _, best_groups = jax.lax.top_k(group_score, num_selected_groups)
    keep = jnp.sum(jax.nn.one_hot(best_groups, num_expert_groups, dtype=jnp.int32), axis=-2) > 0
    return jnp.where(keep[..., None], grouped, -jnp.inf).reshape(scores.shape)


def sequence_balance_loss(
    normalized_affinities: jax.Array, experts: jax.Array, real: jax.Array
) -> jax.Array:
    """DeepSeek-V3's balance loss sum_e f_e P_e per group, averaged over groups with tokens.

    f_e = E / (k T') * (real tokens choosing e), P_e = mean over real tokens of s_e / sum_j s_j
    (T' real tokens): 1 when the load and the affinity are uniform. That is the Switch loss
    (`losses.load_balancing_loss`, E^2 mean_e f'_e P_e with f' the fraction choosing e) / k.
    """
    num_experts, k = normalized_affinities.shape[-1], experts.shape[-1]
    top_k_mask = pre_capacity_mask(experts, num_experts)
    return losses.load_balancing_loss(normalized_affinities, top_k_mask, real) / k


def route_sigmoid_tokens_choose(
    logits: jax.Array,
    padding_mask: jax.Array | None,
    *,
    num_selected_experts: int,
    capacity: int,
    routed_scaling_factor: float = 1.0,
    selection_bias: jax.Array | None = None,
    num_expert_groups: int = 1,
    num_selected_groups: int = 1,
    balance_loss: bool = False,
    fill_order: FillOrder = "rank",
) -> RoutingPlan:
    """Route [G, T, E] logits with sigmoid affinities; `selection_bias` [E] only selects."""
    check_logits(logits)
    logits = logits.astype(jnp.float32)
    num_groups, num_tokens, num_experts = logits.shape
    real = real_mask(padding_mask, (num_groups, num_tokens))
    affinities = jax.nn.sigmoid(logits)  # [G, T, E]
    scores = jax.lax.stop_gradient(affinities)
    if selection_bias is not None:
        scores = scores + selection_bias.astype(jnp.float32)
    if num_expert_groups > 1:
        scores = group_limited_scores(scores, num_expert_groups, num_selected_groups)
    _, experts = jax.lax.top_k(scores, num_selected_experts)  # [G, T, k]
    chosen = jnp.take_along_axis(affinities, experts, axis=-1)
    gates = chosen / jnp.sum(chosen, axis=-1, keepdims=True) * routed_scaling_factor
    selected = jnp.broadcast_to(real[..., None], experts.shape)
    slot_token, slot_weight, kept, slot = slots_from_choices(
        experts, gates, selected, None, num_experts, capacity, fill_order
    )
    # The diagnostics and the balance loss read a distribution over experts.
    normalized = affinities / jnp.sum(affinities, axis=-1, keepdims=True)
    aux = (
        sequence_balance_loss(normalized, experts, real)
        if balance_loss
        else jnp.zeros((), jnp.float32)
    )
    return RoutingPlan(
        slot_token=slot_token,
        slot_weight=slot_weight,
        probs=normalized,
        logits=logits,
        padding_mask=real,
        auxiliary_loss=aux,
        router_z_loss=losses.router_z_loss(logits, real),
        choices=TokenChoices(experts=experts, gates=gates, selected=selected, kept=kept,
                             slot=slot),
    )


@register_router
@dataclasses.dataclass(frozen=True)
class SigmoidTokenChoice(TopKRouter):
    """DeepSeek-V3's router (see the module docstring).

    Attributes:
      num_selected_experts: k (DeepSeek-V3: 8 of 256 routed experts).
      routed_scaling_factor: the gates of a token sum to this (DeepSeek-V3: 2.5).
      num_expert_groups / num_selected_groups: group-limited routing (DeepSeek-V3: 8 / 4);
        1 / 1 is plain top-k.
      balance_loss: report the sequence-wise balance loss as the auxiliary loss (weighted by
        the model's aux loss factor, DeepSeek-V3 uses 1e-4); False: no auxiliary loss.
      bias_update_rate: u of auxiliary-loss-free balancing (DeepSeek-V3: 1e-3); 0 keeps no
        selection bias.
      capacity_factor, eval_capacity_factor, capacity_formula, min_capacity, fill_order,
        ignore_padding_tokens, allow_causal: as for `TokenChoice`.
    """

    num_selected_experts: int = 2
    routed_scaling_factor: float = 1.0
    num_expert_groups: int = 1
    num_selected_groups: int = 1
    balance_loss: bool = False
    bias_update_rate: float = 0.0
    capacity_factor: float = 1.25
    eval_capacity_factor: float | None = None
    capacity_formula: CapacityFormula = "scaled"
    min_capacity: int = 4
    fill_order: FillOrder = "rank"
    ignore_padding_tokens: bool = True
    allow_causal: bool = False

    def initial_state(self, num_experts: int) -> dict[str, jax.Array]:
        if self.bias_update_rate == 0:
            return {}
        return {"selection_bias": jnp.zeros((num_experts,), jnp.float32)}

    def update_state(
        self, state: dict[str, jax.Array], expert_load: jax.Array
    ) -> dict[str, jax.Array]:
        if not state:
            return state
        load = expert_load.astype(jnp.float32)
        step = jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
        return {"selection_bias": state["selection_bias"] + self.bias_update_rate * step}

    def validate(self, num_experts: int) -> None:
        name = type(self).__name__
        if self.bias_update_rate < 0:
            raise ConfigurationError(
                f"{name}.bias_update_rate must be >= 0, got {self.bias_update_rate}."
            )
        check_num_selected_experts(self, num_experts)
        if self.routed_scaling_factor <= 0:
            raise ConfigurationError(
                f"{name}.routed_scaling_factor must be > 0, got {self.routed_scaling_factor}."
            )
        groups, selected = self.num_expert_groups, self.num_selected_groups
        if groups < 1 or num_experts % groups or not 1 <= selected <= groups:
            raise ConfigurationError(
                f"{name}: num_expert_groups={groups} must divide num_experts={num_experts} and "
                f"num_selected_groups={selected} must be between 1 and num_expert_groups."
            )
        if self.num_selected_experts > selected * (num_experts // groups):
            raise ConfigurationError(
                f"{name}: the {selected} selected groups hold {selected * (num_experts // groups)}"
                f" experts, fewer than num_selected_experts={self.num_selected_experts}."
            )
        check_capacity_settings(self)
        check_fill_order(self)

    def route(
        self,
        logits: jax.Array,
        padding_mask: jax.Array | None,
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
        capacity: int | None = None,
        state: dict[str, jax.Array] | None = None,
    ) -> RoutingPlan:
        del rng
        return route_sigmoid_tokens_choose(
            logits,
            padding_mask,
            num_selected_experts=self.num_selected_experts,
            capacity=self.group_capacity(logits, capacity, deterministic),
            routed_scaling_factor=self.routed_scaling_factor,
            selection_bias=(state or {}).get("selection_bias"),
            num_expert_groups=self.num_expert_groups,
            num_selected_groups=self.num_selected_groups,
            balance_loss=self.balance_loss,
            fill_order=self.fill_order,
        )
