"""Routers as pure functions: router logits for groups of tokens -> a routing plan.

Notation (the Switch, GShard and Expert Choice papers): a group holds T tokens, E experts,
k experts per token, capacity factor cf, C slots per expert. Every router returns the same
`RoutingPlan`, whose core is slot-major: for each expert slot, which token sits in it and with
which combine weight. The layer's dispatch implementations (mask/einsum, index, dropless) all
read that one plan, so they cannot disagree about who goes where.

The router *specs* (`TokenChoice`, `ExpertChoice`, `CappedExpertChoice`) are frozen dataclasses:
gin-configurable, hashable (usable as static jit arguments) and testable without Flax.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

from moe import capped_routing, router_losses

CapacityFormula = Literal["scaled", "flaxformer"]
SecondExpertPolicy = Literal["all", "random", "sampling"]
JitterTarget = Literal["inputs", "logits"]


@struct.dataclass
class TokenChoices:
    """Token-major view of a token-choice routing (shapes [G, T, k], rank-major priority)."""

    experts: jax.Array  # [G, T, k] int32 expert chosen at each rank (pre-capacity)
    gates: jax.Array  # [G, T, k] float32 combine weight the policy defines for that choice
    selected: jax.Array  # [G, T, k] bool: real token and kept by the second-expert policy
    kept: jax.Array  # [G, T, k] bool: selected and within the expert's capacity


@struct.dataclass
class RoutingPlan:
    """Which token goes to which expert slot, with which weight, and what the router costs.

    `slot_token[g, e, c] == T` marks an empty slot (its weight is 0). A token that appears in no
    slot is dropped: the MoE branch gives it exactly zero and it passes through the residual.
    """

    slot_token: jax.Array  # [G, E, C] int32 in [0, T]
    slot_weight: jax.Array  # [G, E, C] float32
    probs: jax.Array  # [G, T, E] float32 router probabilities (full softmax)
    logits: jax.Array  # [G, T, E] float32 router logits
    padding_mask: jax.Array  # [G, T] bool, True for real tokens
    auxiliary_loss: jax.Array  # scalar
    router_z_loss: jax.Array  # scalar
    choices: TokenChoices | None = None  # token choice only

    @property
    def capacity(self) -> int:
        return self.slot_token.shape[-1]


def expert_capacity(
    num_tokens: int,
    num_experts: int,
    capacity_factor: float,
    num_selected_experts: int = 1,
    formula: CapacityFormula = "scaled",
    min_capacity: int = 4,
) -> int:
    """Slots per expert per group.

    - 'scaled' (default): `ceil(cf * k * T / E)`. Total slots are cf times the k*T assignments,
      so cf = 1 fits a perfectly balanced top-k router without drops (GShard's paper sizes top-2
      as 2N/(G*E)).
    - 'flaxformer': `round(cf * T / E)`, which does not grow with k: top-2 at cf 1.25 then drops
      >= 37.5% of assignments even under perfect balance.
    Both are floored at `min_capacity` and capped at T (an expert never holds a token twice).
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}.")
    if formula == "scaled":
        capacity = math.ceil(capacity_factor * num_selected_experts * num_tokens / num_experts)
    elif formula == "flaxformer":
        capacity = round(capacity_factor * num_tokens / num_experts)
    else:
        raise ValueError(f"Unknown capacity_formula {formula!r}; use 'scaled' or 'flaxformer'.")
    return max(1, min(max(min_capacity, capacity), num_tokens))


def _real_mask(padding_mask: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
    if padding_mask is None:
        return jnp.ones(shape, bool)
    return padding_mask.astype(bool)


def _check_logits(logits: jax.Array, num_experts: int | None = None) -> None:
    if logits.ndim != 3:
        raise ValueError(
            f"Router logits must be [groups, tokens, experts], got shape {logits.shape}."
        )
    if num_experts is not None and logits.shape[-1] != num_experts:
        raise ValueError(f"Router logits have {logits.shape[-1]} experts, expected {num_experts}.")


def _slots_from_choices(
    experts: jax.Array,  # [G, T, k]
    gates: jax.Array,  # [G, T, k]
    selected: jax.Array,  # [G, T, k]
    priority_order: jax.Array | None,  # [G, T] token permutation, or None for token order
    num_experts: int,
    capacity: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fill expert buffers in priority order: every rank-1 choice before any rank-2 choice.

    Within a rank, tokens are taken in `priority_order` (BPR) or in token order. Returns
    (slot_token [G,E,C], slot_weight [G,E,C], kept [G,T,k]).
    """
    num_groups, num_tokens, k = experts.shape
    token_ids = jnp.broadcast_to(jnp.arange(num_tokens)[None, :], (num_groups, num_tokens))
    if priority_order is not None:
        take = lambda a: jnp.take_along_axis(a, priority_order[..., None], axis=1)
        experts, gates, selected = take(experts), take(gates), take(selected)
        token_ids = jnp.take_along_axis(token_ids, priority_order, axis=1)
    # Rank-major order: [G, k, T] -> [G, k*T].
    rank_major = lambda a: jnp.swapaxes(a, 1, 2).reshape(num_groups, k * num_tokens)
    flat_experts, flat_gates, flat_selected = map(rank_major, (experts, gates, selected))
    flat_tokens = jnp.tile(token_ids, (1, k))
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
    kept = jnp.swapaxes(flat_kept.reshape(num_groups, k, num_tokens), 1, 2)
    if priority_order is not None:
        inverse = jnp.argsort(priority_order, axis=1)
        kept = jnp.take_along_axis(kept, inverse[..., None], axis=1)
    return slot_token, slot_weight, kept


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
) -> RoutingPlan:
    """Token choice top-k routing (k=1 Switch, k=2 GShard) with per-group expert capacity.

    `rng` drives the 'random' and 'sampling' second-expert policies; without it (evaluation)
    both fall back to 'all', i.e. deterministic top-k.
    """
    _check_logits(logits)
    logits = logits.astype(jnp.float32)
    num_groups, num_tokens, num_experts = logits.shape
    k = num_selected_experts
    if not 1 <= k <= num_experts:
        raise ValueError(f"num_selected_experts={k} must be in [1, num_experts={num_experts}].")
    real = _real_mask(padding_mask, (num_groups, num_tokens))
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
    slot_token, slot_weight, kept = _slots_from_choices(
        experts, gates, selected, priority_order, num_experts, capacity
    )
    top_k_mask = jnp.sum(jax.nn.one_hot(experts, num_experts), axis=2)  # [G, T, E] pre-capacity
    return RoutingPlan(
        slot_token=slot_token,
        slot_weight=slot_weight,
        probs=probs,
        logits=logits,
        padding_mask=real,
        auxiliary_loss=router_losses.load_balancing_loss(probs, top_k_mask, real),
        router_z_loss=router_losses.router_z_loss(logits, real),
        choices=TokenChoices(experts=experts, gates=gates, selected=selected, kept=kept),
    )


def _plan_from_expert_scores(
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
        router_z_loss=router_losses.router_z_loss(logits, real),
    )


def route_experts_choose(
    logits: jax.Array, padding_mask: jax.Array | None, *, capacity: int
) -> RoutingPlan:
    """Expert choice (Zhou et al. 2022): each expert takes its top-`capacity` tokens by S^T."""
    _check_logits(logits)
    logits = logits.astype(jnp.float32)
    real = _real_mask(padding_mask, logits.shape[:2])
    probs = jax.nn.softmax(logits, axis=-1)
    return _plan_from_expert_scores(logits, probs, real, jnp.swapaxes(probs, 1, 2), capacity)


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
    _check_logits(logits)
    logits = logits.astype(jnp.float32)
    real = _real_mask(padding_mask, logits.shape[:2])
    probs = jax.nn.softmax(logits, axis=-1)
    scores = jnp.swapaxes(probs, 1, 2)  # [G, E, T]
    # The assignment is discrete: gradients reach the router through the gates only.
    log_assignment = capped_routing.solve_capped_assignment(
        jax.lax.stop_gradient(scores),
        real,
        capacity,
        max_experts_per_token,
        entropy_weight,
        num_iterations,
    )
    assigned = capped_routing.round_assignment(
        log_assignment, real, capacity, max_experts_per_token
    )
    # Only assigned tokens can fill a slot; among them, the router's preference orders slots.
    priority = jnp.where(assigned, jax.lax.stop_gradient(scores), -jnp.inf)
    return _plan_from_expert_scores(logits, probs, real, priority, capacity)


@dataclasses.dataclass(frozen=True)
class TokenChoice:
    """Token choice top-k routing: k=1 is Switch, k=2 is GShard.

    Attributes:
      num_selected_experts: k.
      capacity_factor / eval_capacity_factor: cf for training / for `deterministic=True`
        (None: the training value).
      capacity_formula: 'scaled' (cf*k*T/E, default) or 'flaxformer' (cf*T/E); see
        `expert_capacity`.
      batch_prioritized: BPR, most confident tokens first. Looks at the whole group, so it is
        refused in causal stacks unless `allow_causal`.
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

    @property
    def num_choices(self) -> int:
        return self.num_selected_experts

    @property
    def uses_whole_group(self) -> bool:
        """Whether a token's routing depends on later tokens of its group."""
        return self.batch_prioritized

    def validate(self, num_experts: int) -> None:
        if not 1 <= self.num_selected_experts <= num_experts:
            raise ValueError(
                f"TokenChoice.num_selected_experts={self.num_selected_experts} must be between 1 "
                f"and num_experts={num_experts}."
            )
        _check_capacity_factors(self)
        if self.capacity_formula not in ("scaled", "flaxformer"):
            raise ValueError(
                f"Unknown capacity_formula {self.capacity_formula!r}; use 'scaled' or 'flaxformer'."
            )
        if self.second_expert_policy not in ("all", "random", "sampling"):
            raise ValueError(
                f"Unknown second_expert_policy {self.second_expert_policy!r}; "
                "use 'all', 'random' or 'sampling'."
            )
        if self.jitter_on not in ("inputs", "logits"):
            raise ValueError(f"jitter_on must be 'inputs' or 'logits', got {self.jitter_on!r}.")
        if not 0.0 <= self.jitter_noise < 1.0:
            raise ValueError(f"jitter_noise must be in [0, 1), got {self.jitter_noise}.")

    def capacity(self, num_tokens: int, num_experts: int, deterministic: bool) -> int:
        return expert_capacity(
            num_tokens,
            num_experts,
            _capacity_factor(self, deterministic),
            self.num_selected_experts,
            self.capacity_formula,
            self.min_capacity,
        )

    def route(
        self,
        logits: jax.Array,
        padding_mask: jax.Array | None,
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
        capacity: int | None = None,
    ) -> RoutingPlan:
        """Route [G, T, E] logits; `capacity` overrides the cf-derived one (dropless: T)."""
        _, num_tokens, num_experts = logits.shape
        return route_tokens_choose(
            logits,
            padding_mask,
            num_selected_experts=self.num_selected_experts,
            capacity=capacity or self.capacity(num_tokens, num_experts, deterministic),
            batch_prioritized=self.batch_prioritized,
            second_expert_policy=self.second_expert_policy,
            normalize_gates=self.normalize_gates,
            rng=None if deterministic else rng,
        )


@dataclasses.dataclass(frozen=True)
class ExpertChoice:
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

    num_choices = 1
    uses_whole_group = True
    jitter_noise = 0.0
    jitter_on = "inputs"

    def validate(self, num_experts: int) -> None:
        del num_experts
        _check_capacity_factors(self)

    def capacity(self, num_tokens: int, num_experts: int, deterministic: bool) -> int:
        return expert_capacity(
            num_tokens,
            num_experts,
            _capacity_factor(self, deterministic),
            1,
            self.capacity_formula,
            self.min_capacity,
        )

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
        _, num_tokens, num_experts = logits.shape
        capacity = capacity or self.capacity(num_tokens, num_experts, deterministic)
        return self._route_with_capacity(logits, padding_mask, capacity)

    def _route_with_capacity(
        self, logits: jax.Array, padding_mask: jax.Array | None, capacity: int
    ) -> RoutingPlan:
        return route_experts_choose(logits, padding_mask, capacity=capacity)


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
            raise ValueError(
                f"CappedExpertChoice.max_experts_per_token={self.max_experts_per_token} must be "
                f"between 1 and num_experts={num_experts}."
            )
        if self.entropy_weight <= 0 or self.num_iterations < 1:
            raise ValueError("CappedExpertChoice needs entropy_weight > 0 and num_iterations >= 1.")

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


RouterSpec = TokenChoice | ExpertChoice | CappedExpertChoice


def _capacity_factor(spec: RouterSpec, deterministic: bool) -> float:
    if deterministic and spec.eval_capacity_factor is not None:
        return spec.eval_capacity_factor
    return spec.capacity_factor


def _check_capacity_factors(spec: RouterSpec) -> None:
    name = type(spec).__name__
    for field in ("capacity_factor", "eval_capacity_factor"):
        value = getattr(spec, field)
        if value is not None and value <= 0:
            raise ValueError(f"{name}.{field} must be > 0, got {value}.")
    if spec.min_capacity < 1:
        raise ValueError(f"{name}.min_capacity must be >= 1, got {spec.min_capacity}.")
