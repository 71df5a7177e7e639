"""The one interface every router implements, so that a new router is one new file.

A router is a frozen dataclass (gin-configurable, hashable, so usable as a static `jax.jit`
argument) that turns router logits [G, T, E] into a `RoutingPlan`. The MoE layer, the Flax
router shell, the parameter counter and the diagnostics read only what `RouterSpec` declares;
none of them branches on the router's type. Register a new router with
`moe.routing.registry.register_router` so gin files can name it as `moe.routing.<Name>`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Protocol, runtime_checkable

import jax

from moe.routing.plan import RoutingPlan


@dataclasses.dataclass(frozen=True)
class RouterNoise:
    """The randomness a router asks of the Flax shell (RNG stream 'router') in one step.

    Attributes:
      input_jitter: eps of multiplicative U(1-eps, 1+eps) noise on the router inputs.
      logit_jitter: eps of the same noise on the router logits.
      needs_rng: whether `route` needs a PRNG key (e.g. a sampled second expert).
    """

    input_jitter: float = 0.0
    logit_jitter: float = 0.0
    needs_rng: bool = False


NO_NOISE = RouterNoise()


# Every dispatch the MoE layer knows (see `moe.dispatch`), and those of routers with a capacity.
DISPATCHES = ("mask", "index", "dropless")
CAPACITY_DISPATCHES = ("mask", "index")


class RouterDefaults:
    """What most routers share, as defaults of the interface: one router logit per expert, no
    randomness, no state (nothing to initialize or update). A router overrides what it does
    differently."""

    logits_per_expert = 1

    def noise(self, deterministic: bool) -> RouterNoise:
        del deterministic
        return NO_NOISE

    def initial_state(self, num_experts: int) -> dict[str, jax.Array]:
        del num_experts
        return {}

    def update_state(
        self, state: dict[str, jax.Array], expert_load: jax.Array
    ) -> dict[str, jax.Array]:
        del expert_load
        return state

    def batch_counts(self, plan: RoutingPlan) -> dict[str, jax.Array]:
        del plan
        return {}

    def group_capacity(self, logits: jax.Array, capacity: int | None,
                       deterministic: bool) -> int:
        """`route`'s capacity: the one given (dropless: T), else `capacity` for the group of
        [G, T, E] `logits`."""
        _, num_tokens, num_experts = logits.shape
        return capacity or self.capacity(num_tokens, num_experts, deterministic)

# How a token's routing can depend on later tokens of its routing group:
#   'causal'                  never: the router may run in a causal decoder.
#   'leaks_through_capacity'  only through capacity: a later token can take a slot an earlier
#                             token's lower-ranked choice would have had (rank-major top-k, as
#                             GShard and flaxformer run their decoders). Warned in causal stacks.
#   'looks_ahead'             the routing compares tokens across the group (expert choice,
#                             batch-prioritized routing). Refused in causal stacks.
# Dropless dispatch has no capacity, so 'leaks_through_capacity' is causal there. Groups cut the
# flattened batch, so with several sequences per group a sequence's capacity is shared with the
# sequences before it (as in T5X); group size = sequence length keeps sequences apart.
Causality = Literal["causal", "leaks_through_capacity", "looks_ahead"]
CAUSALITIES = ("causal", "leaks_through_capacity", "looks_ahead")


@runtime_checkable
class RouterSpec(Protocol):
    """What the MoE layer needs to know about a router.

    Attributes:
      ignore_padding_tokens: padding is never routed (True), or routed like a real token so it
        can take capacity (False: flaxformer's default, for parity with its checkpoints).
      allow_causal: accept the router in a causal stack although it is not causal (and do not
        warn about it).
    """

    ignore_padding_tokens: bool
    allow_causal: bool
    logits_per_expert: int  # router outputs per expert: 1, or Soft MoE's slots per expert

    @property
    def causality(self) -> Causality:
        """Whether and how a token's routing depends on later tokens of its group (above).

        Checked by a property test that perturbs later tokens inside a causal decoder.
        """
        ...

    @property
    def dispatches(self) -> tuple[str, ...]:
        """The dispatches that can compute this router's plan (of `DISPATCHES`): 'dropless'
        needs token-major choices routable with capacity T, 'index' slots holding one token
        each; the layer refuses the others."""
        ...

    def experts_per_token(self, group_size: int, num_experts: int) -> float:
        """Experts an average token is processed by in groups of `group_size` tokens, without
        drops: what a token's expert compute costs, in experts (activated parameters)."""
        ...

    def noise(self, deterministic: bool) -> RouterNoise:
        """The randomness this router uses in this mode (`NO_NOISE` when deterministic)."""
        ...

    def initial_state(self, num_experts: int) -> dict[str, jax.Array]:
        """The router's state at initialization (`{}`: stateless).

        State is not a parameter: it lives in the 'router_state' collection, gets no gradient
        and no optimizer, is checkpointed with the train state and changes only through
        `update_state`. A router with state receives it as `route(..., state=...)`.
        """
        ...

    def update_state(
        self, state: dict[str, jax.Array], expert_load: jax.Array
    ) -> dict[str, jax.Array]:
        """The state after a train step whose global routing demand was `expert_load`.

        `expert_load` [..., E]: tokens that chose each expert in the step (all devices and
        microbatches; leading axes for scanned layers), before capacity.
        """
        ...

    def batch_counts(self, plan: RoutingPlan) -> dict[str, jax.Array]:
        """What this router's loss counts over the whole batch, measured on `plan` (sums over
        its groups; `{}`: the loss needs nothing beyond the call).

        When a batch is split into calls (the trainer's microbatches), a forward pass first
        sums these over the calls; each call's `route` then gets them as `batch_counts=`
        (divided by the number of calls), so its loss can count over the whole batch.
        """
        ...

    def validate(self, num_experts: int) -> None:
        """Raise a `ConfigurationError` naming the setting and the fix if it cannot work."""
        ...

    def capacity(self, num_tokens: int, num_experts: int, deterministic: bool) -> int:
        """Slots per expert per group of `num_tokens` tokens."""
        ...

    def route(
        self,
        logits: jax.Array,
        padding_mask: jax.Array | None,
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
        capacity: int | None = None,
    ) -> RoutingPlan:
        """Route [G, T, E] float32 logits; `capacity` overrides `self.capacity` (dropless: T).

        `rng` is a key exactly when `noise(deterministic).needs_rng`. Routers with an
        `initial_state` also take `state=` (the current state, a dict like it); routers with
        `batch_counts` take `batch_counts=` (the whole batch's, per call) when the batch is
        split into calls.
        """
        ...
