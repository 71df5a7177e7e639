"""Soft MoE (Puigcerver et al. 2023): every expert owns p slots, each a convex mix of the group's
tokens; every token's output a convex mix of all slots. Nothing is dropped, no balance loss.

With slot parameters Phi [d, E*p] (the router kernel, p outputs per expert), logits X Phi
[T, E*p] give the dispatch weights (a softmax over the tokens, per slot) and the combine
weights (a softmax over the slots, per token). Padding never enters a slot and gets no output.
A slot mixes the whole group, so Soft MoE looks ahead: encoders only (refused in causal
stacks). Only the mask dispatch can compute it (`SoftWeights`); expert compute per token is
E*p/T experts (E*p = T: one expert's worth, the paper's setting).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe.errors import ConfigurationError
from moe.routing import losses
from moe.routing.interface import Causality, RouterDefaults
from moe.routing.plan import RoutingPlan, SoftWeights, check_logits, real_mask
from moe.routing.registry import register_router


def route_soft(
    logits: jax.Array, padding_mask: jax.Array | None, *, slots_per_expert: int
) -> RoutingPlan:
    """Soft MoE weights for [G, T, E*p] slot logits."""
    check_logits(logits)
    logits = logits.astype(jnp.float32)
    num_groups, num_tokens, num_slots = logits.shape
    num_experts = num_slots // slots_per_expert
    real = real_mask(padding_mask, (num_groups, num_tokens))
    # Slot-major from the start, [G, E*p, T]: the matmuls of the mask dispatch then contract
    # the last axis. Transposing the softmaxes instead makes XLA:CPU's backward pass ~30x
    # slower at 4096 slots x 2048 tokens.
    slot_logits = jnp.swapaxes(logits, 1, 2)
    real_slots = real[:, None, :]  # [G, 1, T]
    # Dispatch: per slot, a softmax over the real tokens.
    dispatch = jax.nn.softmax(jnp.where(real_slots, slot_logits, -jnp.inf), axis=-1)
    dispatch = jnp.where(jnp.any(real, axis=1)[:, None, None], dispatch, 0.0)
    # Combine: per real token, a softmax over all slots.
    combine = jnp.where(real_slots, jax.nn.softmax(slot_logits, axis=1), 0.0)
    slot_major = lambda a: a.reshape(num_groups, num_experts, slots_per_expert, num_tokens)
    soft = SoftWeights(dispatch=slot_major(dispatch), combine=slot_major(combine))
    # For the diagnostics: each slot's largest contributor and that token's combine weight.
    slot_token = jnp.argmax(soft.dispatch, axis=-1).astype(jnp.int32)
    slot_weight = jnp.take_along_axis(soft.combine, slot_token[..., None], axis=-1)[..., 0]
    probs = jnp.sum(soft.combine, axis=2).transpose(0, 2, 1)  # [G, T, E]
    return RoutingPlan(
        slot_token=slot_token,
        slot_weight=slot_weight,
        probs=jnp.where(real[..., None], probs, 1.0 / num_experts),
        logits=jax.nn.logsumexp(
            logits.reshape(num_groups, num_tokens, num_experts, -1), axis=-1
        ),
        padding_mask=real,
        auxiliary_loss=jnp.zeros((), jnp.float32),
        router_z_loss=losses.router_z_loss(logits, real),
        soft=soft,
    )


@register_router
@dataclasses.dataclass(frozen=True)
class SoftMoe(RouterDefaults):
    """Soft MoE with `slots_per_expert` (p) slots per expert; see the module docstring.

    Use it with dispatch='mask' in encoder stacks; `ignore_padding_tokens` must stay True
    (padding would otherwise leak into every slot).
    """

    slots_per_expert: int = 1
    ignore_padding_tokens: bool = True
    allow_causal: bool = False

    @property
    def logits_per_expert(self) -> int:
        return self.slots_per_expert

    @property
    def causality(self) -> Causality:
        return "looks_ahead"

    # A slot mixes many tokens: only the mask dispatch's dense weights can express it.
    dispatches = ("mask",)

    def experts_per_token(self, group_size: int, num_experts: int) -> float:
        return num_experts * self.slots_per_expert / group_size

    def validate(self, num_experts: int) -> None:
        del num_experts
        if self.slots_per_expert < 1:
            raise ConfigurationError(
                f"SoftMoe.slots_per_expert must be >= 1, got {self.slots_per_expert}."
            )
        if not self.ignore_padding_tokens:
            raise ConfigurationError(
                "SoftMoe mixes every routed token into every slot: padding must be ignored "
                "(ignore_padding_tokens=True)."
            )

    def capacity(self, num_tokens: int, num_experts: int, deterministic: bool) -> int:
        del num_tokens, num_experts, deterministic
        return self.slots_per_expert

    def route(
        self,
        logits: jax.Array,
        padding_mask: jax.Array | None,
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
        capacity: int | None = None,
    ) -> RoutingPlan:
        del deterministic, rng, capacity
        return route_soft(logits, padding_mask, slots_per_expert=self.slots_per_expert)
