"""Index dispatch moves rows by gathers only when the router gives each choice's slot: the
slots are the exact inverse of the plan's slot tokens, the gather's hand-written gradient equals
autodiff's scatter-add, and the compiled layer holds no scatter of d-wide rows."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.dispatch import gather_rows
from moe.moe_layer import MoeLayer
from moe.routing import ExpertChoice, SigmoidTokenChoice, TokenChoice

D_MODEL = 24


@pytest.mark.parametrize("spec", [
    TokenChoice(1, capacity_factor=0.5, min_capacity=1),
    TokenChoice(2, capacity_factor=1.0, batch_prioritized=True),
    TokenChoice(2, capacity_factor=0.75, fill_order="token", min_capacity=1),
    SigmoidTokenChoice(2, capacity_factor=1.0),
], ids=["top1_drops", "top2_bpr", "top2_token_order", "sigmoid_top2"])
def test_choice_slots_are_the_inverse_of_slot_tokens(spec):
    logits = jax.random.normal(jax.random.key(0), (3, 32, 8))
    real = jnp.arange(32)[None, :] < jnp.array([[32], [20], [9]])
    plan = spec.route(logits, real, deterministic=True)
    slot_token = np.asarray(plan.slot_token).reshape(3, -1)  # [G, E*C]
    slot, kept = np.asarray(plan.choices.slot), np.asarray(plan.choices.kept)
    num_slots = slot_token.shape[1]
    assert np.all((slot < num_slots) == kept)  # a slot exactly for the kept choices
    for g in range(3):
        tokens, ranks = np.nonzero(kept[g])
        # Each kept choice's slot holds its token, and every filled slot is some choice's.
        assert np.array_equal(slot_token[g, slot[g, tokens, ranks]], tokens)
        assert sorted(slot[g, tokens, ranks]) == sorted(np.nonzero(slot_token[g] < 32)[0])
    if spec.capacity_factor < 1:  # the inverse holds with dropped choices too
        assert 0 < kept.sum() < np.asarray(plan.choices.selected).sum()


def test_gather_gradient_sums_the_readers_rows_as_autodiff_would():
    """Rows read by several positions (and by none), 'none' indices on both sides."""
    rows = jax.random.normal(jax.random.key(1), (2, 5, 3))
    index = jnp.array([[[0, 5], [2, 0], [5, 5], [3, 0]],
                       [[4, 4], [1, 5], [0, 2], [5, 1]]])  # [G, M=4, K=2]; 5 = none
    inverse = np.full((2, 5, 4), 8)  # [G, N, J]: flat positions m * K + k; 8 = none
    for g in range(2):
        for n in range(5):
            readers = [m * 2 + k for m in range(4) for k in range(2) if index[g, m, k] == n]
            inverse[g, n, :len(readers)] = readers
    weights = jax.random.normal(jax.random.key(2), (2, 4, 2, 3))

    def loss(gather, r):
        return jnp.sum(jnp.sin(gather(r)) * weights)

    plain = jax.grad(lambda r: loss(lambda a: jnp.take_along_axis(
        jnp.pad(a, ((0, 0), (0, 1), (0, 0))), index.reshape(2, 8, 1), axis=1
    ).reshape(2, 4, 2, 3), r))(rows)
    ours = jax.grad(lambda r: loss(lambda a: gather_rows(a, index, jnp.asarray(inverse)), r))(
        rows)
    np.testing.assert_allclose(ours, plain, rtol=1e-6, atol=1e-7)


def _wide_scatters(layer: MoeLayer) -> list[str]:
    """The scatters with d_model-wide rows in the layer's lowered forward + backward."""
    x = jax.random.normal(jax.random.key(0), (2, 32, D_MODEL))
    params = nn.meta.unbox(layer.init(jax.random.key(1), x))["params"]

    def loss(p, x):
        return jnp.sum(layer.apply({"params": p}, x, mutable=["moe"])[0] ** 2)

    lines = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).as_text().splitlines()
    results = []
    for i, line in enumerate(lines):
        if '"stablehlo.scatter"' in line:  # its types follow its update region: "}) : (...)"
            signature = next(s for s in lines[i:] if s.strip().startswith("}) : ("))
            results.append(signature.split("->")[-1].strip())
    return [r for r in results if re.search(rf"x{D_MODEL}x(f32|bf16)>$", r)]


@pytest.mark.parametrize("dispatch", ["index", "dropless"])
@pytest.mark.parametrize("k", [1, 2])
def test_token_choice_dispatch_has_no_row_scatter(k, dispatch):
    """Index dispatch and dropless move rows by gathers only, forward and backward."""
    layer = MoeLayer(4, 16, router=TokenChoice(k), dispatch=dispatch, activation="relu",
                     max_group_size=32)
    assert _wide_scatters(layer) == []


def test_expert_choice_index_dispatch_still_scatters_rows():
    """The control: a token may sit in any number of expert-choice slots, so its combine
    scatter-adds (and the check above sees such a scatter)."""
    layer = MoeLayer(4, 16, router=ExpertChoice(1.0), dispatch="index", activation="relu",
                     max_group_size=32)
    assert _wide_scatters(layer)

