"""Expert choice and capped expert choice (EC-CAP): invariants on random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import routing
from moe.routing import CappedExpertChoice, ExpertChoice, capped_assignment, expert_capacity
from moe.routing.metrics import experts_per_token

# One compilation per configuration instead of one per eager op.
route_experts_choose = jax.jit(routing.route_experts_choose, static_argnames=("capacity",))
route_capped_experts_choose = jax.jit(
    routing.route_capped_experts_choose,
    static_argnames=("capacity", "max_experts_per_token", "entropy_weight", "num_iterations"),
)

CASES = [(0, 2, 32, 4, 1.0), (1, 1, 64, 8, 2.0), (2, 3, 48, 16, 2.0), (3, 2, 40, 8, 0.5)]


def _logits(seed, groups, tokens, experts, scale=2.0):
    return scale * jax.random.normal(jax.random.key(seed), (groups, tokens, experts))


@pytest.mark.parametrize("seed,groups,tokens,experts,cf", CASES)
def test_each_expert_takes_exactly_its_top_k_e_tokens(seed, groups, tokens, experts, cf):
    logits = _logits(seed, groups, tokens, experts)
    k_e = expert_capacity(tokens, experts, cf, 1, min_capacity=1)
    assert k_e == max(1, int(np.ceil(cf * tokens / experts)))
    plan = route_experts_choose(logits, None, capacity=k_e)
    probs = np.asarray(jax.nn.softmax(logits, -1))
    slot_token = np.asarray(plan.slot_token)
    assert np.all(slot_token < tokens), "every slot filled"
    for g in range(groups):
        for e in range(experts):
            chosen = slot_token[g, e]
            assert len(set(chosen.tolist())) == k_e
            best = np.sort(probs[g, :, e])[::-1][:k_e]
            np.testing.assert_allclose(np.sort(probs[g, chosen, e])[::-1], best, rtol=1e-6)
            np.testing.assert_allclose(plan.slot_weight[g, e], probs[g, chosen, e], rtol=1e-6)
    assert float(plan.auxiliary_loss) == 0.0


def test_expert_choice_never_routes_padding():
    logits = _logits(0, 2, 16, 4)
    real = jnp.arange(16)[None, :] < jnp.array([[10], [3]])
    plan = route_experts_choose(logits, real, capacity=8)
    slot_token = np.asarray(plan.slot_token)
    for g, n_real in enumerate([10, 3]):
        used = slot_token[g][slot_token[g] < 16]
        assert np.all(used < n_real)
        # Fewer real tokens than k_e: the remaining slots stay empty with weight 0.
        assert np.sum(slot_token[g] < 16) == 4 * min(8, n_real)
    assert np.all(np.asarray(plan.slot_weight)[slot_token == 16] == 0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("experts,cf,cap", [(8, 2.0, 2), (8, 2.0, 3), (16, 1.0, 1), (4, 2.0, 2)])
def test_capped_expert_choice_respects_both_caps(seed, experts, cf, cap):
    tokens = 64
    logits = _logits(seed, 2, tokens, experts)
    k_e = expert_capacity(tokens, experts, cf, 1, min_capacity=1)
    plan = route_capped_experts_choose(
        logits, None, capacity=k_e, max_experts_per_token=cap
    )
    count = np.asarray(experts_per_token(plan))
    assert count.max() <= cap, "a token got more experts than the cap"
    slot_token = np.asarray(plan.slot_token)
    # Feasible here (cap * T >= E * k_e): every expert gets exactly k_e distinct tokens.
    assert cap * tokens >= experts * k_e
    assert np.all(slot_token < tokens)
    for g in range(2):
        for e in range(experts):
            assert len(set(slot_token[g, e].tolist())) == k_e


def _greedy_objective(probs, k_e, cap):
    """Experts in order, each takes its best k_e tokens among those still under the cap."""
    total = 0.0
    for g in range(probs.shape[0]):
        used = np.zeros(probs.shape[1], int)
        for e in range(probs.shape[2]):
            score = np.where(used < cap, probs[g, :, e], -np.inf)
            pick = np.argsort(-score, kind="stable")[:k_e]
            pick = pick[np.isfinite(score[pick])]
            used[pick] += 1
            total += probs[g, pick, e].sum()
    return total


@pytest.mark.parametrize("seed", range(5))
def test_capped_expert_choice_beats_greedy_lp_objective(seed):
    tokens, experts, cap = 64, 8, 2
    logits = _logits(seed, 2, tokens, experts)
    k_e = expert_capacity(tokens, experts, 2.0, 1, min_capacity=1)
    plan = route_capped_experts_choose(logits, None, capacity=k_e, max_experts_per_token=cap)
    probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    ours = float(np.sum(np.asarray(plan.slot_weight, np.float64)))
    assert ours >= _greedy_objective(probs, k_e, cap) - 1e-4


def test_dykstra_solution_is_feasible_fractional_assignment():
    tokens, experts, k_e, cap = 48, 8, 12, 3
    scores = jnp.swapaxes(jax.nn.softmax(_logits(0, 2, tokens, experts), -1), 1, 2)
    real = jnp.ones((2, tokens), bool)
    solve = lambda iterations: np.exp(
        np.asarray(
            capped_assignment.solve_capped_assignment(scores, real, k_e, cap, 1e-3, iterations)
        )
    )
    # Alternating projections converge slowly at lambda = 1e-3: the paper's 100 iterations
    # leave the expert sums off (rounding repairs that); 1000 reach the feasible point.
    rough, a = solve(100), solve(1000)
    assert np.abs(a.sum(-1) - k_e).max() < np.abs(rough.sum(-1) - k_e).max()
    assert np.all(a >= 0) and np.all(a <= 1 + 1e-3)
    np.testing.assert_allclose(a.sum(-1), k_e, rtol=0.01)  # each expert takes k_e tokens
    assert np.all(a.sum(1) <= cap + 0.05)  # no token over the cap
    # With a small lambda the solution is nearly integral (the LP has integral vertices).
    assert np.mean((a > 0.05) & (a < 0.95)) < 0.1


def test_experts_per_token_is_uncapped_for_plain_expert_choice():
    # The quantity EC-CAP bounds: plain EC can give a token many experts. Tokens 1..31 each
    # prefer one expert strongly (p ~ 0.9); token 0 is uniform (p = 1/8), so every expert
    # takes its 4 fans and then token 0.
    t = jnp.arange(32)
    logits = 5.0 * jax.nn.one_hot(t % 8, 8)
    logits = logits.at[0].set(0.0)[None]
    plan = route_experts_choose(logits, None, capacity=5)
    assert int(experts_per_token(plan)[0, 0]) == 8
    capped = route_capped_experts_choose(logits, None, capacity=5, max_experts_per_token=2)
    assert int(experts_per_token(capped)[0, 0]) <= 2


@pytest.mark.parametrize(
    "spec,match",
    [
        (ExpertChoice(capacity_factor=0.0), "capacity_factor"),
        (ExpertChoice(capacity_factor=-2.0), "capacity_factor"),
        (CappedExpertChoice(max_experts_per_token=0), "max_experts_per_token"),
        (CappedExpertChoice(max_experts_per_token=9), "max_experts_per_token"),
        (CappedExpertChoice(entropy_weight=0.0), "entropy_weight"),
    ],
)
def test_bad_expert_choice_configs_raise(spec, match):
    with pytest.raises(ValueError, match=match):
        spec.validate(num_experts=8)
