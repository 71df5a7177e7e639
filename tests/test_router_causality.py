"""The causality contract: a router that declares itself causal is causal inside a decoder.

For every router (each registered one and the variants that change causality), a tiny causal
decoder runs in training mode (dropout, jitter, sampled second experts, capacity small enough
to drop tokens) on a batch and on the same batch with every token after position t replaced.
A router declaring 'causal' must leave every output at positions <= t bit-identical; a router
declaring a leak must show one somewhere in the sweep (so the declaration is not just caution).
One routing group per sequence (GROUP_SIZE = length): the contract is per group.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.models.config import SparseConfig
from moe.routing import (
    ROUTERS,
    CappedExpertChoice,
    ExpertChoice,
    SigmoidTokenChoice,
    TokenChoice,
)
from tests.models.helpers import decoder_model, init_params, tiny_config

LENGTH, BATCH, VOCAB = 16, 2, 40
TIGHT = dict(capacity_factor=0.5, min_capacity=1)  # top-k drops tokens at this capacity

ROUTER_VARIANTS = {
    **{f"{name}()": cls() for name, cls in ROUTERS.items()},
    "top1": TokenChoice(1, **TIGHT),
    "top2 rank-major": TokenChoice(2, **TIGHT),
    "top2 token-major": TokenChoice(2, fill_order="token", **TIGHT),
    "top2 token-major random 2nd": TokenChoice(
        2, fill_order="token", second_expert_policy="random", jitter_noise=0.1, **TIGHT
    ),
    "top3 token-major sampled": TokenChoice(
        3, fill_order="token", second_expert_policy="sampling", **TIGHT
    ),
    "top1 bpr": TokenChoice(1, batch_prioritized=True, **TIGHT),
    "expert choice cf 1": ExpertChoice(1.0),
    "capped expert choice": CappedExpertChoice(1.0, max_experts_per_token=2, num_iterations=10),
    "sigmoid top2 rank-major": SigmoidTokenChoice(2, **TIGHT),
    "sigmoid top2 token-major grouped": SigmoidTokenChoice(
        2, fill_order="token", num_expert_groups=2, num_selected_groups=1, **TIGHT
    ),
}
# Registered routers with their defaults: a 'causal' declaration must hold, and so must a
# declared look-ahead; a declared capacity leak needs a capacity that binds to show, which the
# variants above give.
DEFAULTS = {f"{name}()" for name in ROUTERS}


def _logits_fn(spec):
    router = dataclasses.replace(spec, allow_causal=True)
    sparse = SparseConfig(num_sparse_layers=1, num_experts=4, router=router, group_size=LENGTH,
                          dispatch="mask")  # the one dispatch every router supports
    config = tiny_config(num_encoder_layers=0, encoder_sparse=SparseConfig(),
                         decoder_sparse=sparse, num_decoder_layers=2, dropout_rate=0.1)
    model = decoder_model(config)
    targets = jnp.ones((BATCH, LENGTH), jnp.int32)  # every position real
    params = init_params(model, {"decoder_input_tokens": targets, "decoder_target_tokens": targets})

    @jax.jit
    def logits(tokens, rng):
        dropout, routing = jax.random.split(rng)
        out, _ = model.module.apply(
            {"params": params}, tokens, targets, deterministic=False,
            rngs={"dropout": dropout, "router": routing}, mutable=["moe"],
        )
        return out

    return logits


# The default run covers each causality class once; the rest run with `-m slow`.
DEFAULT_RUN = {
    "top2 rank-major", "top2 token-major random 2nd", "expert choice cf 1",
    "sigmoid top2 token-major grouped",
}


@pytest.mark.parametrize("name", [
    name if name in DEFAULT_RUN else pytest.param(name, marks=pytest.mark.slow)
    for name in sorted(ROUTER_VARIANTS)
])
def test_routers_keep_their_causality_declaration(name):
    spec = ROUTER_VARIANTS[name]
    logits = _logits_fn(spec)
    leaked = []
    for seed in range(3):
        keys = jax.random.split(jax.random.key(seed), 3)
        tokens = jax.random.randint(keys[0], (BATCH, LENGTH), 2, VOCAB)
        noise = jax.random.randint(keys[1], (BATCH, LENGTH), 2, VOCAB)
        reference = np.asarray(logits(tokens, keys[2]))
        for t in range(0, LENGTH - 1, 3):
            perturbed = jnp.where(jnp.arange(LENGTH) > t, noise, tokens)
            out = np.asarray(logits(perturbed, keys[2]))
            if not np.array_equal(out[:, : t + 1], reference[:, : t + 1]):
                leaked.append((seed, t))
    if spec.causality == "causal":
        assert not leaked, f"{name} declares 'causal' but leaks at (seed, t) = {leaked[:5]}"
    elif spec.causality == "looks_ahead" or name not in DEFAULTS:
        # Looking ahead needs no binding capacity to show; a capacity leak does.
        assert leaked, f"{name} declares {spec.causality!r} but no leak was found"
