"""Token choice top-k routing: each token picks its k most probable experts.

k=1 is Switch, k=2 GShard.

Expert buffers fill rank-major (every rank-1 choice before any rank-2 choice), within a rank in
token order or, with batch-prioritized routing (BPR), most confident tokens first; choices past
an expert's capacity are dropped. Second-expert policies: GShard's random keep, sampling.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from moe.errors import ConfigurationError
from moe.routing import losses
from moe.routing.interface import DISPATCHES, NO_NOISE, Causality, RouterDefaults, RouterNoise
from moe.routing.plan import (
    CapacityFormula,
    RoutingPlan,
    TokenChoices,
    check_capacity_settings,
    check_logits,
    real_mask,
    spec_capacity,
)
from moe.routing.registry import register_router

SecondExpertPolicy = Literal["all", "random", "sampling"]
FillOrder = Literal["rank", "token"]
JitterTarget = Literal["inputs", "logits"]
SECOND_EXPERT_POLICIES = ("all", "random", "sampling")


def check_num_selected_experts(spec, num_experts: int) -> None:
    """Refuse a k outside [1, E]."""
    if not 1 <= spec.num_selected_experts <= num_experts:
        raise ConfigurationError(
            f"{type(spec).__name__}.num_selected_experts={spec.num_selected_experts} must be "
            f"between 1 and num_experts={num_experts}."
        )


def check_fill_order(spec) -> None:
    """Refuse an unknown fill order."""
    if spec.fill_order not in ("rank", "token"):
        raise ConfigurationError(
            f"Unknown {type(spec).__name__}.fill_order {spec.fill_order!r}; use 'rank' or "
            "'token'."
        )


def slots_from_choices(
    experts: jax.Array,  # [G, T, k]
    gates: jax.Array,  # [G, T, k]
    selected: jax.Array,  # [G, T, k]
    priority_order: jax.Array | None,  # [G, T] token permutation, or None for token order
    num_experts: int,
    capacity: int,
    fill_order: FillOrder = "rank",
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Fill expert buffers in priority order.

    'rank' (GShard, flaxformer): every rank-1 choice before any rank-2 choice, so a later
    token's first choice can take the slot an earlier token's second choice needed. 'token':
    all of a token's choices before the next token's, so a token's slots depend on earlier
    tokens only. Tokens are taken in `priority_order` (BPR) or in token order. Returns
    (slot_token [G,E,C], slot_weight [G,E,C], kept [G,T,k], slot [G,T,k]): `slot` is the
    inverse of `slot_token`, each kept choice's flat slot e * C + c (E * C where not kept).
    """
    num_groups, num_tokens, k = experts.shape
    token_ids = jnp.broadcast_to(jnp.arange(num_tokens)[None, :], (num_groups, num_tokens))
    if priority_order is not None:
        take = lambda a: jnp.take_along_axis(a, priority_order[..., None], axis=1)
        experts, gates, selected = take(experts), take(gates), take(selected)
        token_ids = jnp.take_along_axis(token_ids, priority_order, axis=1)
    if fill_order == "rank":  # [G, k, T] -> [G, k*T]
        flatten = lambda a: jnp.swapaxes(a, 1, 2).reshape(num_groups, k * num_tokens)
    else:  # [G, T, k] -> [G, T*k]
        flatten = lambda a: a.reshape(num_groups, num_tokens * k)
    flat_experts, flat_gates, flat_selected = map(flatten, (experts, gates, selected))
    flat_tokens = flatten(jnp.broadcast_to(token_ids[..., None], experts.shape))
    one_hot = jax.nn.one_hot(flat_experts, num_experts, dtype=jnp.int32) * flat_selected[..., None]
    # Position of each assignment inside its expert's buffer.  # [G, k*T]
    position = jnp.sum((jnp.cumsum(one_hot, axis=1) - 1) * one_hot, axis=-1)
    flat_kept = flat_selected & (position < capacity)
    # Scatter kept assignments into [G, E, C]; dropped ones go out of bounds and vanish.
    slot_pos = jnp.where(flat_kept, position, capacity)
    groups = jnp.broadcast_to(jnp.arange(num_groups)[:, None], slot_pos.shape)
    empty = jnp.full((num_groups, num_experts, capacity), num_tokens, jnp.int32)
    slot_token = empty.at[groups, flat_experts, slot_pos].set(flat_tokens, mode="drop")
    slot_weight = (
        jnp.zeros((num_groups, num_experts, capacity), jnp.float32)
        .at[groups, flat_experts, slot_pos]
        .set(flat_gates, mode="drop")
    )
    flat_slot = jnp.where(flat_kept, flat_experts * capacity + position, num_experts * capacity)
    if fill_order == "rank":  # [G, k*T] -> [G, T, k]
        unflatten = lambda a: jnp.swapaxes(a.reshape(num_groups, k, num_tokens), 1, 2)
    else:
        unflatten = lambda a: a.reshape(num_groups, num_tokens, k)
    kept, slot = unflatten(flat_kept), unflatten(flat_slot)
    if priority_order is not None:
        inverse = jnp.argsort(priority_order, axis=1)
        untake = lambda a: jnp.take_along_axis(a, inverse[..., None], axis=1)
        kept, slot = untake(kept), untake(slot)
    return slot_token, slot_weight, kept, slot


def pre_capacity_mask(experts: jax.Array, num_experts: int) -> jax.Array:
    """[G, T, k] chosen experts (every rank, before capacity and policy) -> [G, T, E] 0/1."""
    return jnp.sum(jax.nn.one_hot(experts, num_experts), axis=2)


def route_tokens_choose(
    logits: jax.Array,
    padding_mask: jax.Array | None,
    *,
    num_selected_experts: int,
    capacity: int,
    batch_prioritized: bool = False,
    second_expert_policy: SecondExpertPolicy = "all",
    normalize_gates: bool = False,
    rng: jax.Array | None = None,
    fill_order: FillOrder = "rank",
    balance_scope: losses.BalanceScope = "group",
    batch_counts: dict[str, jax.Array] | None = None,
) -> RoutingPlan:
    """Token choice top-k routing (k=1 Switch, k=2 GShard) with per-group expert capacity.

    `rng` drives the 'random' and 'sampling' second-expert policies; without it (evaluation)
    both fall back to 'all', i.e. deterministic top-k. `batch_counts` ('batch' scope): the
    whole batch's balance counts per call (see `losses.load_balancing_loss`).
    """
    check_logits(logits)
    logits = logits.astype(jnp.float32)
    num_groups, num_tokens, num_experts = logits.shape
    k = num_selected_experts
    if not 1 <= k <= num_experts:
        raise ValueError(f"num_selected_experts={k} must be in [1, num_experts={num_experts}].")
    real = real_mask(padding_mask, (num_groups, num_tokens))
    probs = jax.nn.softmax(logits, axis=-1)

    policy = second_expert_policy if (rng is not None and k > 1) else "all"
    if policy == "sampling":
        # Rank 1 is the argmax; later ranks are drawn without replacement (Gumbel-max).
        sample_rng, rng = jax.random.split(rng)
        top1 = jnp.argmax(probs, axis=-1)
        perturbed = jnp.log(jnp.maximum(probs, 1e-30)) + jax.random.gumbel(sample_rng, probs.shape)
        perturbed = jnp.where(jax.nn.one_hot(top1, num_experts, dtype=bool), -jnp.inf, perturbed)
        _, rest = jax.lax.top_k(perturbed, k - 1)
        experts = jnp.concatenate([top1[..., None], rest], axis=-1)
    else:
        _, experts = jax.lax.top_k(probs, k)
    raw_gates = jnp.take_along_axis(probs, experts, axis=-1)  # [G, T, k]
    renormalized = raw_gates / jnp.sum(raw_gates, axis=-1, keepdims=True)
    gates = renormalized if normalize_gates else raw_gates

    selected = jnp.broadcast_to(real[..., None], experts.shape)
    if policy == "random":
        # GShard Algorithm 1: keep rank r >= 2 only if k * g_r > u, g renormalized over the k
        # (for k = 2 exactly the paper's `2 * g2 > u`).
        u = jax.random.uniform(rng, experts.shape)
        keep = (k * renormalized > u) | (jnp.arange(k) == 0)
        selected = selected & keep
    elif policy not in ("all", "sampling"):
        raise ValueError(
            f"Unknown second_expert_policy {second_expert_policy!r}; "
            "use 'all', 'random' or 'sampling'."
        )

    priority_order = None
    if batch_prioritized:
        # Tokens with the most confident top-1 choice claim buffer slots first (BPR).
        top1_prob = jnp.where(real, raw_gates[..., 0], -1.0)
        priority_order = jnp.argsort(-top1_prob, axis=1, stable=True)
    slot_token, slot_weight, kept, slot = slots_from_choices(
        experts, gates, selected, priority_order, num_experts, capacity, fill_order
    )
    top_k_mask = pre_capacity_mask(experts, num_experts)
    return RoutingPlan(
        slot_token=slot_token,
        slot_weight=slot_weight,
        probs=probs,
        logits=logits,
        padding_mask=real,
        auxiliary_loss=losses.load_balancing_loss(
            probs, top_k_mask, real, balance_scope, batch_counts
        ),
        router_z_loss=losses.router_z_loss(logits, real),
        choices=TokenChoices(experts=experts, gates=gates, selected=selected, kept=kept,
                             slot=slot),
    )


class TopKRouter(RouterDefaults):
    """What every router where each token picks k experts shares (fields
    `num_selected_experts`, `fill_order` and the capacity settings): k experts per token, every
    dispatch, capacity from k, and causality from the fill order."""

    dispatches = DISPATCHES

    @property
    def causality(self) -> Causality:
        if self.num_selected_experts > 1 and self.fill_order == "rank":
            return "leaks_through_capacity"
        return "causal"

    def experts_per_token(self, group_size: int, num_experts: int) -> float:
        del group_size, num_experts
        return float(self.num_selected_experts)

    def capacity(self, num_tokens: int, num_experts: int, deterministic: bool) -> int:
        return spec_capacity(
            self, num_tokens, num_experts, deterministic, self.num_selected_experts
        )


@register_router
@dataclasses.dataclass(frozen=True)
class TokenChoice(TopKRouter):
    """Token choice top-k routing: k=1 is Switch, k=2 is GShard.

    Attributes:
      num_selected_experts: k.
      capacity_factor / eval_capacity_factor: cf for training / for `deterministic=True`
        (None: the training value).
      capacity_formula: 'scaled' (cf*k*T/E, default) or 'flaxformer' (cf*T/E); see
        `expert_capacity`.
      batch_prioritized: BPR, most confident tokens first. Looks at the whole group, so it is
        refused in causal stacks unless `allow_causal`.
      fill_order: 'rank' (GShard, flaxformer: every token's first choice before any second
        choice) or 'token' (each token's k choices before the next token's). With k > 1 and a
        capacity, 'rank' lets a later token's first choice displace an earlier token's second
        choice: a causal decoder then leaks the future through capacity (warned); 'token' is
        causal within a routing group.
      balance_scope: count the balance loss's f and P per routing group ('group', Switch)
        or over the whole batch ('batch', the global-batch balance loss; with microbatching
        over every microbatch of the step, through `batch_counts`); see `losses`.
      second_expert_policy: 'all', 'random' (GShard: keep rank 2 iff 2*g2 > u) or 'sampling'.
      normalize_gates: renormalize the combine weights over the chosen k (GShard) instead of the
        raw softmax probabilities (Switch, flaxformer).
      jitter_noise: multiplicative U(1-eps, 1+eps) noise in training, on the router 'inputs'
        (flaxformer) or 'logits' (Switch paper pseudo-code).
      ignore_padding_tokens: padding is never routed (ours). False routes padding positions
        like real tokens, so they can take expert capacity: flaxformer's default
        (`ignore_padding_tokens=False`), needed for parity with its checkpoints.
    """

    num_selected_experts: int = 1
    capacity_factor: float = 1.25
    eval_capacity_factor: float | None = None
    capacity_formula: CapacityFormula = "scaled"
    min_capacity: int = 4
    batch_prioritized: bool = False
    second_expert_policy: SecondExpertPolicy = "all"
    normalize_gates: bool = False
    jitter_noise: float = 0.0
    jitter_on: JitterTarget = "inputs"
    allow_causal: bool = False
    ignore_padding_tokens: bool = True
    fill_order: FillOrder = "rank"
    balance_scope: losses.BalanceScope = "group"

    @property
    def causality(self) -> Causality:
        if self.batch_prioritized:  # orders the group's tokens by confidence: looks ahead
            return "looks_ahead"
        return super().causality

    def noise(self, deterministic: bool) -> RouterNoise:
        if deterministic:
            return NO_NOISE
        return RouterNoise(
            input_jitter=self.jitter_noise if self.jitter_on == "inputs" else 0.0,
            logit_jitter=self.jitter_noise if self.jitter_on == "logits" else 0.0,
            needs_rng=self.num_selected_experts > 1 and self.second_expert_policy != "all",
        )

    def validate(self, num_experts: int) -> None:
        check_num_selected_experts(self, num_experts)
        check_capacity_settings(self)
        check_fill_order(self)
        if self.second_expert_policy not in SECOND_EXPERT_POLICIES:
            raise ConfigurationError(
                f"Unknown second_expert_policy {self.second_expert_policy!r}; "
                "use 'all', 'random' or 'sampling'."
            )
        if self.balance_scope not in losses.BALANCE_SCOPES:
            raise ConfigurationError(
                f"Unknown TokenChoice.balance_scope {self.balance_scope!r}; use 'group' or "
                "'batch'."
            )
        if self.jitter_on not in ("inputs", "logits"):
            raise ConfigurationError(
                f"jitter_on must be 'inputs' or 'logits', got {self.jitter_on!r}."
            )
        if not 0.0 <= self.jitter_noise < 1.0:
            raise ConfigurationError(f"jitter_noise must be in [0, 1), got {self.jitter_noise}.")

    def batch_counts(self, plan: RoutingPlan) -> dict[str, jax.Array]:
        """The 'batch' scope's f counts (`losses.balance_counts`); {} for 'group'."""
        if self.balance_scope != "batch":
            return {}
        mask = pre_capacity_mask(plan.choices.experts, plan.probs.shape[-1])
        return losses.balance_counts(mask, plan.padding_mask)

    def route(
        self,
        logits: jax.Array,
        padding_mask: jax.Array | None,
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
        capacity: int | None = None,
        batch_counts: dict[str, jax.Array] | None = None,
    ) -> RoutingPlan:
        """Route [G, T, E] logits; `capacity` overrides the cf-derived one (dropless: T);
        `batch_counts` are the whole batch's (`batch_counts`, per call) when the batch is split
        into calls."""
        return route_tokens_choose(
            logits,
            padding_mask,
            num_selected_experts=self.num_selected_experts,
            capacity=self.group_capacity(logits, capacity, deterministic),
            batch_prioritized=self.batch_prioritized,
            second_expert_policy=self.second_expert_policy,
            normalize_gates=self.normalize_gates,
            rng=None if deterministic else rng,
            fill_order=self.fill_order,
            balance_scope=self.balance_scope,
            batch_counts=batch_counts,
        )
