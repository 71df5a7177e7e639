"""DeepSeek-V3 sigmoid gating: its defining invariants on random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.errors import ConfigurationError
from moe.routing import SigmoidTokenChoice, route_sigmoid_tokens_choose
from moe.routing.metrics import expert_demand, experts_per_token
from moe.routing.sigmoid_token_choice import sequence_balance_loss

G, T, E = 3, 32, 8


def _logits(seed=0):
    return jax.random.normal(jax.random.key(seed), (G, T, E))


def _route(logits, **kw):
    kw.setdefault("num_selected_experts", 2)
    kw.setdefault("capacity", T)  # no drops
    return route_sigmoid_tokens_choose(logits, None, **kw)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_gates_are_normalized_selected_affinities_times_the_scaling_factor(scale):
    logits = _logits()
    plan = _route(logits, num_selected_experts=3, routed_scaling_factor=scale)
    gates = np.asarray(plan.choices.gates)
    np.testing.assert_allclose(gates.sum(-1), scale, rtol=1e-6)
    # The chosen experts are the top-3 affinities, weighted in proportion to them.
    s = np.asarray(jax.nn.sigmoid(logits))
    top = np.argsort(-s, axis=-1)[..., :3]
    np.testing.assert_array_equal(np.sort(plan.choices.experts, -1), np.sort(top, -1))
    chosen = np.take_along_axis(s, np.asarray(plan.choices.experts), -1)
    np.testing.assert_allclose(gates, chosen / chosen.sum(-1, keepdims=True) * scale, rtol=1e-6)
    # Every kept choice sits in exactly one slot with its gate.
    assert int(jnp.sum(experts_per_token(plan))) == G * T * 3
    np.testing.assert_allclose(np.asarray(plan.slot_weight).sum(), gates.sum(), rtol=1e-5)


def test_bias_changes_the_selection_but_not_the_gates():
    logits = _logits(1)
    plain = _route(logits)
    bias = jnp.zeros(E).at[5].set(10.0)  # expert 5 wins every token's selection
    biased = _route(logits, selection_bias=bias)
    assert np.all(np.asarray(biased.choices.experts)[..., 0] == 5)
    assert not np.array_equal(biased.choices.experts, plain.choices.experts)
    s = np.asarray(jax.nn.sigmoid(logits))
    chosen = np.take_along_axis(s, np.asarray(biased.choices.experts), -1)
    np.testing.assert_allclose(biased.choices.gates, chosen / chosen.sum(-1, keepdims=True),
                               rtol=1e-6)
    # No gradient flows through the selection: only through the gates' affinities.
    grad = jax.grad(lambda b: jnp.sum(_route(logits, selection_bias=b).slot_weight))(bias)
    assert np.all(np.asarray(grad) == 0)


def test_group_limited_routing_keeps_each_token_within_its_best_groups():
    logits = _logits(2)
    plan = _route(logits, num_selected_experts=3, num_expert_groups=4, num_selected_groups=2)
    groups = np.asarray(plan.choices.experts) // (E // 4)
    assert max(len(set(row)) for row in groups.reshape(-1, 3)) <= 2
    # The groups kept are those with the best sum of their two best affinities.
    s = np.asarray(jax.nn.sigmoid(logits)).reshape(G, T, 4, 2)
    best = np.argsort(-s.sum(-1), axis=-1)[..., :2]
    for g, t in [(0, 0), (1, 7), (2, 31)]:
        assert set(groups[g, t]) <= set(best[g, t])


def test_sequence_balance_loss_formula():
    affinities = jax.nn.sigmoid(_logits(3))
    experts = jax.lax.top_k(affinities, 2)[1]
    real = jnp.arange(T)[None, :] < jnp.array([[T], [T - 5], [1]])
    normalized = affinities / jnp.sum(affinities, axis=-1, keepdims=True)
    loss = float(sequence_balance_loss(normalized, experts, real))
    expected = []
    for g in range(G):
        n = int(real[g].sum())
        counts = np.bincount(np.asarray(experts[g, :n]).ravel(), minlength=E)
        f = E / (2 * n) * counts
        a = np.asarray(affinities[g, :n])
        p = (a / a.sum(-1, keepdims=True)).mean(0)
        expected.append((f * p).sum())
    assert loss == pytest.approx(np.mean(expected), rel=1e-5)
    # Uniform affinities and a uniform load give exactly 1.
    uniform = jnp.full((1, E, E), 1.0 / E)
    experts = jnp.stack([jnp.arange(E), (jnp.arange(E) + 1) % E], -1)[None]
    assert float(sequence_balance_loss(uniform, experts, jnp.ones((1, E), bool))) == (
        pytest.approx(1.0)
    )


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(num_selected_experts=9), "num_selected_experts"),
        (dict(num_expert_groups=3), "num_expert_groups"),
        (dict(num_expert_groups=4, num_selected_groups=1, num_selected_experts=3),
         "num_selected_experts"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(fill_order="expert"), "fill_order"),
    ],
)
def test_bad_settings_are_configuration_errors(kwargs, field):
    with pytest.raises(ConfigurationError, match=field):
        SigmoidTokenChoice(**kwargs).validate(E)


def test_bias_updates_balance_a_skewed_router_without_any_loss():
    # Every token prefers the low-numbered experts: without a bias, expert 0 takes most tokens.
    skew = jnp.linspace(3.0, 0.0, E)
    logits = jax.random.normal(jax.random.key(5), (4, 64, E)) + skew
    spec = SigmoidTokenChoice(2, bias_update_rate=0.005)
    state = spec.initial_state(E)

    def imbalance(plan):
        load = np.asarray(expert_demand(plan))
        return load.max() / load.mean()

    route = jax.jit(lambda s: spec.route(logits, None, capacity=64, state=s))
    start = imbalance(route(state))
    for _ in range(100):
        state = spec.update_state(state, expert_demand(route(state)))
    assert start > 2.5
    assert imbalance(route(state)) < 1.15
    # The bias moved against the skew: the favoured experts were pushed down.
    assert float(state["selection_bias"][0]) < 0 < float(state["selection_bias"][-1])


def test_the_update_rule_is_a_signed_step_toward_the_mean_load():
    spec = SigmoidTokenChoice(2, bias_update_rate=0.1)
    load = jnp.array([[10.0, 2.0, 4.0, 4.0], [1.0, 1.0, 1.0, 1.0]])  # scanned layers: [L, E]
    new = spec.update_state({"selection_bias": jnp.zeros((2, 4))}, load)["selection_bias"]
    np.testing.assert_allclose(new, [[-0.1, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0]])
    assert spec.initial_state(4).keys() == {"selection_bias"}
    assert SigmoidTokenChoice(2).initial_state(4) == {}
    assert SigmoidTokenChoice(2).update_state({}, load) == {}
