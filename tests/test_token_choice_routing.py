"""Token choice routing (Switch top-1, GShard top-2, top-k): invariants on random inputs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import routing
from moe.routing import TokenChoice, expert_capacity

# One compilation per configuration instead of one per eager op.
route_tokens_choose = jax.jit(
    routing.route_tokens_choose,
    static_argnames=(
        "num_selected_experts", "capacity", "batch_prioritized", "second_expert_policy",
        "normalize_gates",
    ),
)

CASES = [  # (seed, groups, tokens, experts, k, capacity factor)
    (0, 2, 32, 4, 1, 1.0),
    (1, 3, 48, 8, 2, 0.5),
    (2, 1, 64, 8, 2, 1.25),
    (3, 2, 40, 16, 3, 0.75),
    (4, 2, 24, 4, 4, 1.0),
]


def _random_logits(seed, groups, tokens, experts, scale=2.0):
    return scale * jax.random.normal(jax.random.key(seed), (groups, tokens, experts))


def _kept_assignments(plan):
    """Set of (group, expert, token) from the slots."""
    slot_token = np.asarray(plan.slot_token)
    num_tokens = plan.padding_mask.shape[1]
    return {
        (g, e, int(t))
        for g, e, c in itertools.product(*map(range, slot_token.shape))
        if (t := slot_token[g, e, c]) < num_tokens
    }


def _route(logits, k, cf, formula="scaled", **kw):
    _, t, e = logits.shape
    capacity = expert_capacity(t, e, cf, k, formula, min_capacity=1)
    return route_tokens_choose(logits, None, num_selected_experts=k, capacity=capacity, **kw)


@pytest.mark.parametrize("seed,groups,tokens,experts,k,cf", CASES)
@pytest.mark.parametrize("bpr", [False, True])
def test_capacity_priority_and_slots_consistent(seed, groups, tokens, experts, k, cf, bpr):
    logits = _random_logits(seed, groups, tokens, experts)
    plan = _route(logits, k, cf, batch_prioritized=bpr)
    capacity = plan.capacity
    experts_np = np.asarray(plan.choices.experts)
    kept = np.asarray(plan.choices.kept)
    slots = _kept_assignments(plan)

    # Slots hold exactly the kept choices, each once, and no expert over capacity.
    from_choices = {
        (g, int(experts_np[g, t, r]), t)
        for g, t, r in zip(*np.nonzero(kept))
    }
    assert slots == from_choices
    assert int(kept.sum()) == len(slots)  # no (token, expert) pair twice
    for g, e in itertools.product(range(groups), range(experts)):
        assert sum(1 for s in slots if s[:2] == (g, e)) <= capacity

    top1 = np.asarray(jax.nn.softmax(logits, -1)).max(-1)
    for g, e in itertools.product(range(groups), range(experts)):
        wanted = [(r, t) for t in range(tokens) for r in range(k) if experts_np[g, t, r] == e]
        # Every rank-r choice of an expert is placed before any rank-(r+1) choice.
        for (r1, t1), (r2, t2) in itertools.product(wanted, wanted):
            if r1 < r2 and kept[g, t2, r2]:
                assert kept[g, t1, r1], "a later-rank choice took a slot before an earlier rank"
        # Within a rank: token order, or descending top-1 probability with BPR.
        for (r1, t1), (r2, t2) in itertools.product(wanted, wanted):
            if r1 != r2 or t1 == t2:
                continue
            first = (top1[g, t1] > top1[g, t2]) if bpr else (t1 < t2)
            if first and kept[g, t2, r2]:
                assert kept[g, t1, r1], "priority order inside a rank violated"


@pytest.mark.parametrize("seed,groups,tokens,experts,k,cf", CASES)
@pytest.mark.parametrize("normalize", [False, True])
def test_kept_combine_weights_equal_policy_gates(seed, groups, tokens, experts, k, cf, normalize):
    logits = _random_logits(seed, groups, tokens, experts)
    plan = _route(logits, k, cf, normalize_gates=normalize)
    probs = np.asarray(jax.nn.softmax(logits, -1))
    top_idx = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    top_p = np.take_along_axis(probs, top_idx, -1)
    expected = top_p / top_p.sum(-1, keepdims=True) if normalize else top_p
    slot_token = np.asarray(plan.slot_token)
    slot_weight = np.asarray(plan.slot_weight)
    for g, e, c in zip(*np.nonzero(slot_token < tokens)):
        t = slot_token[g, e, c]
        (r,) = np.nonzero(top_idx[g, t] == e)[0]
        np.testing.assert_allclose(slot_weight[g, e, c], expected[g, t, r], rtol=1e-5)
    assert np.all(slot_weight[slot_token == tokens] == 0.0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_aux_loss_is_k_when_balanced(k):
    experts = 8
    # Exactly uniform probabilities: aux = E^2 * mean(f/E) = k whatever the ties pick.
    plan = _route(jnp.zeros((2, 64, experts)), k, 1.0)
    np.testing.assert_allclose(plan.auxiliary_loss, k, rtol=1e-6)
    # Near-uniform random logits: within a few percent of k.
    plan = _route(_random_logits(k, 4, 512, experts, scale=1e-2), k, 1.0)
    np.testing.assert_allclose(plan.auxiliary_loss, k, rtol=0.03)


def test_aux_loss_formula_on_full_softmax():
    logits = _random_logits(7, 3, 20, 5)
    k = 2
    plan = _route(logits, k, 1.0)
    probs = np.asarray(jax.nn.softmax(logits, -1))
    top = np.argsort(-probs, -1, kind="stable")[..., :k]
    f = np.zeros_like(probs)
    np.put_along_axis(f, top, 1.0, -1)
    expected = 5**2 * np.mean(f.mean(1) * probs.mean(1))
    np.testing.assert_allclose(plan.auxiliary_loss, expected, rtol=1e-5)


def test_z_loss_equals_formula():
    logits = _random_logits(3, 2, 16, 6, scale=5.0)
    plan = _route(logits, 1, 1.0)
    lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
    np.testing.assert_allclose(plan.router_z_loss, np.mean(lse**2), rtol=1e-5)


def test_router_math_is_float32_for_bfloat16_logits():
    plan = _route(_random_logits(0, 1, 8, 4).astype(jnp.bfloat16), 2, 1.0)
    assert plan.probs.dtype == jnp.float32 and plan.slot_weight.dtype == jnp.float32


def test_padding_is_never_routed_nor_counted():
    groups, tokens, experts = 2, 32, 4
    logits = _random_logits(11, groups, tokens, experts)
    real = jnp.arange(tokens)[None, :] < jnp.array([[20], [9]])
    cap = expert_capacity(tokens, experts, 2.0, 2)
    plan = route_tokens_choose(logits, real, num_selected_experts=2, capacity=cap)
    slot_token = np.asarray(plan.slot_token)
    for g in range(groups):
        routed = set(slot_token[g][slot_token[g] < tokens].tolist())
        assert routed and all(bool(real[g, t]) for t in routed)
    # Changing the logits of padding changes neither the plan nor the losses.
    noisy = jnp.where(real[..., None], logits, 100.0 * _random_logits(5, groups, tokens, experts))
    plan2 = route_tokens_choose(noisy, real, num_selected_experts=2, capacity=cap)
    np.testing.assert_array_equal(plan.slot_token, plan2.slot_token)
    np.testing.assert_allclose(plan.auxiliary_loss, plan2.auxiliary_loss, rtol=1e-6)
    np.testing.assert_allclose(plan.router_z_loss, plan2.router_z_loss, rtol=1e-6)


def test_random_second_expert_policy_matches_gshard_rule():
    logits = _random_logits(0, 4, 4096, 8, scale=1.0)
    plan = _route(logits, 2, 4.0, second_expert_policy="random", rng=jax.random.key(42))
    probs = np.asarray(jax.nn.softmax(logits, -1))
    top2 = -np.sort(-probs, -1)[..., :2]
    g2 = top2[..., 1] / top2.sum(-1)
    expected = np.minimum(1.0, 2 * g2)
    kept_second = np.asarray(plan.choices.selected[..., 1], np.float64)
    assert np.all(np.asarray(plan.choices.selected[..., 0]))
    np.testing.assert_allclose(kept_second.mean(), expected.mean(), atol=0.01)
    # Also per bin of g2: the frequency follows min(1, 2 * g2).
    bins = np.digitize(g2, [0.1, 0.2, 0.3, 0.4])
    for b in np.unique(bins):
        sel = bins == b
        if sel.sum() > 500:
            np.testing.assert_allclose(kept_second[sel].mean(), expected[sel].mean(), atol=0.04)


def test_random_policy_without_rng_is_top_k():
    logits = _random_logits(1, 1, 32, 4)
    a = _route(logits, 2, 2.0, second_expert_policy="random", rng=None)
    b = _route(logits, 2, 2.0)
    np.testing.assert_array_equal(a.slot_token, b.slot_token)


def test_sampling_policy_draws_second_expert_from_remaining_probs():
    probs = jnp.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.broadcast_to(jnp.log(probs), (1, 20000, 4))
    plan = _route(logits, 2, 4.0, second_expert_policy="sampling", rng=jax.random.key(0))
    experts = np.asarray(plan.choices.experts)
    assert np.all(experts[..., 0] == 0)
    freq = np.bincount(experts[0, :, 1], minlength=4) / experts.shape[1]
    np.testing.assert_allclose(freq, [0.0, 0.6, 0.3, 0.1], atol=0.015)


def test_capacity_formulas():
    # Default scales with k: top-2 at cf 1.0 has room for every assignment of a balanced router.
    assert expert_capacity(512, 8, 1.0, 2, "scaled") == 128
    assert expert_capacity(512, 8, 1.25, 1, "scaled") == 80
    # flaxformer: max(min_capacity, round(cf * T / E)), independent of k.
    assert expert_capacity(512, 8, 1.25, 2, "flaxformer") == 80
    assert expert_capacity(16, 8, 1.0, 1, "flaxformer", min_capacity=4) == 4
    assert expert_capacity(4, 2, 8.0, 2) == 4  # never more than T
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(16, 4, 0.0)
    with pytest.raises(ValueError, match="capacity_formula"):
        expert_capacity(16, 4, 1.0, formula="bogus")


def test_top2_at_cf_1_under_balance_drops_nothing_with_default_formula():
    # Perfect balance: token t picks experts (t mod E, t+1 mod E).
    tokens, experts = 64, 8
    t = jnp.arange(tokens)
    logits = 5.0 * jax.nn.one_hot(t % experts, experts) + 4.0 * jax.nn.one_hot(
        (t + 1) % experts, experts
    )
    spec = TokenChoice(num_selected_experts=2, capacity_factor=1.0, min_capacity=1)
    plan = spec.route(logits[None], None)
    assert bool(jnp.all(plan.choices.kept))
    flax_spec = TokenChoice(2, 1.0, capacity_formula="flaxformer", min_capacity=1)
    assert not bool(jnp.all(flax_spec.route(logits[None], None).choices.kept))


@pytest.mark.parametrize(
    "spec,match",
    [
        (TokenChoice(num_selected_experts=5), "num_selected_experts"),
        (TokenChoice(num_selected_experts=0), "num_selected_experts"),
        (TokenChoice(capacity_factor=0.0), "capacity_factor"),
        (TokenChoice(capacity_factor=-1.0), "capacity_factor"),
        (TokenChoice(eval_capacity_factor=0.0), "eval_capacity_factor"),
        (TokenChoice(second_expert_policy="nope"), "second_expert_policy"),
        (TokenChoice(capacity_formula="nope"), "capacity_formula"),
        (TokenChoice(jitter_on="weights"), "jitter_on"),
    ],
)
def test_bad_token_choice_configs_raise(spec, match):
    with pytest.raises(ValueError, match=match):
        spec.validate(num_experts=4)


def test_wrong_logit_shapes_raise():
    with pytest.raises(ValueError, match=r"\[groups, tokens, experts\]"):
        routing.route_tokens_choose(jnp.zeros((4, 8)), None, num_selected_experts=1, capacity=2)


def test_global_batch_balance_loss_lets_groups_specialize():
    # Group 0's tokens all prefer expert 0, group 1's expert 1: each group is imbalanced,
    # the batch as a whole is balanced.
    logits = jnp.stack([jnp.tile(jnp.array([[8.0, 0.0]]), (16, 1)),
                        jnp.tile(jnp.array([[0.0, 8.0]]), (16, 1))])  # [G=2, T=16, E=2]
    per_group = TokenChoice(1, balance_scope="group").route(logits, None).auxiliary_loss
    global_batch = TokenChoice(1, balance_scope="batch").route(logits, None).auxiliary_loss
    assert float(per_group) == pytest.approx(2.0, abs=1e-3)  # E * f.P with f = P = one-hot
    assert float(global_batch) == pytest.approx(1.0, abs=1e-3)  # perfectly balanced: k
    # With one group both scopes count the same tokens.
    one = logits[:1]
    assert float(TokenChoice(1, balance_scope="batch").route(one, None).auxiliary_loss) == (
        pytest.approx(float(TokenChoice(1).route(one, None).auxiliary_loss), rel=1e-6))
    with pytest.raises(ValueError, match="balance_scope"):
        TokenChoice(1, balance_scope="sequence").validate(2)


def test_calls_given_the_batch_counts_average_to_the_whole_batch_balance_loss():
    """A batch split into calls (microbatches) of unequal real tokens: given the batch's
    counts per call, the mean of the calls' losses and of their gradients is the whole
    batch's; counting each call alone is not."""
    spec = TokenChoice(2, balance_scope="batch")
    logits = _random_logits(7, 4, 16, 8)  # [G=4, T=16, E=8]; each call takes 2 groups
    real = jnp.arange(16)[None, :] < jnp.array([16, 3, 9, 12])[:, None]
    calls = [(logits[:2], real[:2]), (logits[2:], real[2:])]

    def whole(x):
        return spec.route(x, real).auxiliary_loss

    counts = [spec.batch_counts(spec.route(x, r)) for x, r in calls]
    batch_counts = jax.tree.map(lambda *c: sum(c) / len(calls), *counts)
    # Counts are sums: the calls' add up to the batch's.
    np.testing.assert_array_equal(counts[0]["selected"] + counts[1]["selected"],
                                  spec.batch_counts(spec.route(logits, real))["selected"])

    def split(x):
        parts = [x[:2], x[2:]]
        return sum(spec.route(p, r, batch_counts=batch_counts).auxiliary_loss
                   for p, (_, r) in zip(parts, calls)) / len(calls)

    np.testing.assert_allclose(split(logits), whole(logits), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(split)(logits), jax.grad(whole)(logits),
                               rtol=1e-5, atol=1e-8)
    alone = sum(spec.route(x, r).auxiliary_loss for x, r in calls) / len(calls)
    assert abs(float(alone) - float(whole(logits))) > 1e-3
    # A call that is the whole batch, given its own counts, is unchanged.
    own = spec.batch_counts(spec.route(logits, real))
    np.testing.assert_allclose(spec.route(logits, real, batch_counts=own).auxiliary_loss,
                               whole(logits), rtol=1e-6)


def test_batch_counts_are_counted_for_the_batch_scope_only():
    logits = _random_logits(8, 2, 8, 4)
    assert TokenChoice(2).batch_counts(TokenChoice(2).route(logits, None)) == {}
    counts = TokenChoice(2, balance_scope="batch").batch_counts(
        TokenChoice(2, balance_scope="batch").route(logits, None))
    assert float(counts["tokens"]) == 16 and float(jnp.sum(counts["selected"])) == 32
    with pytest.raises(ValueError, match="scope='batch'"):
        TokenChoice(2).route(logits, None, batch_counts=counts)
