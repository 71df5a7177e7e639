"""The MoE layer: dispatch equivalence, dropped tokens, padding, grouping, errors, diagnostics."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.moe_layer import MoeLayer, group_shape
from moe.routing import CappedExpertChoice, ExpertChoice, SigmoidTokenChoice, TokenChoice
from moe.routing.metrics import SCALAR_KEYS
from moe.routing.shell import Router

ROUTERS = {
    "top1": TokenChoice(1, capacity_factor=8.0),
    "top2": TokenChoice(2, capacity_factor=4.0, normalize_gates=True),
    "top2_bpr": TokenChoice(2, capacity_factor=4.0, batch_prioritized=True),
    "expert_choice": ExpertChoice(2.0),
    "capped_ec": CappedExpertChoice(2.0, max_experts_per_token=3),
    "sigmoid_top2_grouped": SigmoidTokenChoice(
        2, capacity_factor=4.0, routed_scaling_factor=2.5, num_expert_groups=4,
        num_selected_groups=2, balance_loss=True,
    ),
    # Capacity too small: tokens are dropped, and mask and index must drop the same ones.
    "top2_with_drops": TokenChoice(2, capacity_factor=0.5, min_capacity=1),
}


def jitted(layer, **kwargs):
    """`layer.apply` compiled once (eager Flax ops compile one by one and dominate test time)."""
    return jax.jit(functools.partial(layer.apply, mutable=["moe"], **kwargs))


def init(layer, x, mask=None):
    return jax.jit(layer.init)(jax.random.key(0), x, mask)["params"]


def _inputs(seed=0, shape=(4, 24, 16)):
    return jax.random.normal(jax.random.key(seed), shape)


def _loss_and_grads(layer, params, x, mask=None):
    def loss(p, x):
        y, state = layer.apply({"params": p}, x, mask, mutable=["moe"])
        d = state["moe"]["diagnostics"][0]
        # The benchmark's objective: sum(out) + 0.01 * aux + 0.001 * z.
        return jnp.sum(y) + 0.01 * d["auxiliary_loss"] + 0.001 * d["router_z_loss"], y

    (value, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return value, y, grads


@pytest.mark.parametrize(
    "router,activation",
    [(name, "gated-gelu") for name in ROUTERS] + [("top2", "relu"), ("top1", "gelu")],
)
def test_mask_index_dropless_agree_forward_and_grads(router, activation):
    spec = ROUTERS[router]
    x = _inputs()
    drops = router.endswith("with_drops")
    dropless_ok = "dropless" in spec.dispatches and not drops
    dispatches = ["mask", "index"] + (["dropless"] if dropless_ok else [])
    results = {}
    for dispatch in dispatches:
        layer = MoeLayer(8, 32, router=spec, dispatch=dispatch, activation=activation,
                         max_group_size=48)
        params = init(layer, x)
        results[dispatch] = _loss_and_grads(layer, params, x)
    ref = results["index"]
    if "dropless" in spec.dispatches:  # dropless equals capacity modes only without drops
        layer = MoeLayer(8, 32, router=spec, activation=activation, max_group_size=48)
        _, state = jitted(layer)({"params": params}, x)
        dropped = state["moe"]["diagnostics"][0]["drop_fraction_by_rank"]
        assert bool(jnp.any(dropped > 0)) == drops
    for dispatch, (value, y, grads) in results.items():
        np.testing.assert_allclose(y, ref[1], atol=1e-5, err_msg=dispatch)
        np.testing.assert_allclose(value, ref[0], rtol=1e-5, err_msg=dispatch)
        for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref[2])):
            np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5, err_msg=dispatch)


@pytest.mark.parametrize("dispatch", ["mask", "index"])
@pytest.mark.parametrize("k", [1, 2])
def test_dropped_tokens_get_exactly_zero(dispatch, k):
    x = _inputs(3, (2, 32, 8))
    layer = MoeLayer(4, 16, router=TokenChoice(k, capacity_factor=0.25, min_capacity=1),
                     dispatch=dispatch, max_group_size=64)
    params = init(layer, x)
    y, state = jitted(layer)({"params": params}, x)
    # Recompute the plan to know which tokens were left behind.
    grouped = x.reshape(1, 64, 8)
    plan = Router(4, layer.router).apply({"params": params["router"]}, grouped, None,
                                         deterministic=True)
    routed = np.zeros(64, bool)
    routed[np.asarray(plan.slot_token)[0][np.asarray(plan.slot_token)[0] < 64]] = True
    assert 0 < routed.sum() < 64
    y = np.asarray(y).reshape(64, 8)
    assert np.all(y[~routed] == 0.0)
    assert np.all(np.any(y[routed] != 0.0, axis=-1))
    left = float(state["moe"]["diagnostics"][0]["fraction_tokens_left_behind"])
    np.testing.assert_allclose(left, 1 - routed.mean(), rtol=1e-6)


@pytest.mark.parametrize("router", ["top1", "top2", "expert_choice", "capped_ec"])
def test_padding_is_not_routed_and_does_not_change_real_tokens(router):
    spec = ROUTERS[router]
    x = _inputs(5, (2, 16, 8))
    mask = jnp.arange(16)[None, :] < jnp.array([[11], [6]])
    layer = MoeLayer(4, 16, router=spec, max_group_size=32)
    params = init(layer, x)
    y1, s1 = jitted(layer)({"params": params}, x, mask)
    junk = jnp.where(mask[..., None], x, 50.0 * _inputs(6, x.shape))
    y2, s2 = jitted(layer)({"params": params}, junk, mask)
    assert np.all(np.asarray(y1)[~np.asarray(mask)] == 0.0)
    np.testing.assert_allclose(np.asarray(y1)[np.asarray(mask)], np.asarray(y2)[np.asarray(mask)],
                               atol=1e-6)
    for key in SCALAR_KEYS:
        np.testing.assert_allclose(s1["moe"]["diagnostics"][0][key],
                                   s2["moe"]["diagnostics"][0][key], rtol=1e-5, err_msg=key)


def test_grouping_pads_and_unpads_tokens():
    assert group_shape(96, 48, 1) == (2, 48)
    assert group_shape(96, 40, 1) == (3, 32)
    assert group_shape(100, 48, 4) == (4, 25)
    assert group_shape(10, 4096, 4) == (4, 3)  # 12 slots for 10 tokens: 2 padding
    # Without drops, token choice routing is per token, so the grouping cannot change outputs.
    x = _inputs(2, (3, 7, 8))  # 21 tokens: no group size divides it evenly below
    outs = []
    for max_group_size in (4, 5, 21, 4096):
        spec = TokenChoice(2, capacity_factor=4.0)
        layer = MoeLayer(4, 16, router=spec, max_group_size=max_group_size)
        params = init(layer, x)
        outs.append(jitted(layer)({"params": params}, x)[0])
    for y in outs[1:]:
        np.testing.assert_allclose(y, outs[0], atol=1e-6)


def test_diagnostics_shapes_and_meaning():
    x = _inputs(1, (2, 32, 8))
    for name, spec in ROUTERS.items():
        layer = MoeLayer(8, 16, router=spec, max_group_size=64)
        params = init(layer, x)
        _, state = jitted(layer)({"params": params}, x)
        d = state["moe"]["diagnostics"][0]
        for key in SCALAR_KEYS:
            assert d[key].shape == (), (name, key)
        assert d["expert_load"].shape == (8,)
        np.testing.assert_allclose(d["expert_load"].sum(), 1.0, rtol=1e-5)
        hist = np.asarray(d["experts_per_token"])
        assert hist.shape == (9,)
        np.testing.assert_allclose(hist.sum(), 1.0, rtol=1e-5)
        assert 0.0 <= float(d["expert_usage"]) <= 1.0
        assert 0.0 <= float(d["router_entropy"]) <= np.log(8) + 1e-5
        k = getattr(spec, "num_selected_experts", 1)
        assert d["drop_fraction_by_rank"].shape == (k,)
        if isinstance(spec, TokenChoice):
            assert np.all(hist[k + 1:] == 0)
        if isinstance(spec, CappedExpertChoice):
            assert np.all(hist[spec.max_experts_per_token + 1:] == 0)
        if isinstance(spec, ExpertChoice):
            assert float(d["expert_usage"]) == 1.0
            np.testing.assert_allclose(d["expert_load"], 1 / 8, rtol=1e-6)


def test_drop_fraction_by_rank_drops_second_choices_first():
    x = _inputs(4, (1, 64, 8))
    layer = MoeLayer(4, 16, router=TokenChoice(2, capacity_factor=0.5, min_capacity=1),
                     max_group_size=64)
    params = init(layer, x)
    _, state = jitted(layer)({"params": params}, x)
    by_rank = np.asarray(state["moe"]["diagnostics"][0]["drop_fraction_by_rank"])
    assert by_rank[1] > by_rank[0] and by_rank[1] > 0.5


def test_router_runs_in_float32_for_bfloat16_layer():
    x = _inputs(0, (2, 8, 16)).astype(jnp.bfloat16)
    layer = MoeLayer(4, 16, dtype=jnp.bfloat16, router=TokenChoice(2, capacity_factor=2.0))
    params = init(layer, x)
    assert params["router"]["router_weights"]["w"].value.dtype == jnp.float32
    y, _ = jitted(layer)({"params": params}, x)
    # Experts run in bfloat16; the combine (router probabilities x expert outputs) in float32.
    assert y.dtype == jnp.float32
    plan = Router(4, layer.router).apply({"params": params["router"]}, x, None, deterministic=True)
    assert plan.logits.dtype == jnp.float32 and plan.slot_weight.dtype == jnp.float32


@pytest.mark.parametrize("dispatch", ["index", "dropless"])
def test_bfloat16_expert_kernels_compute_what_their_float32_values_do(dispatch):
    """param_dtype=bfloat16 stores the expert kernels in bfloat16 (the router's stay float32)
    and computes the layer of float32 kernels holding the same values, gradients included."""
    x = _inputs(0, (2, 8, 16)).astype(jnp.bfloat16)
    kwargs = dict(dtype=jnp.bfloat16, router=TokenChoice(2, capacity_factor=2.0),
                  dispatch=dispatch, activation="relu")
    stored = MoeLayer(4, 16, param_dtype=jnp.bfloat16, **kwargs)
    params = init(stored, x)
    kernels = params["expert"]
    assert {k: v.value.dtype for k, v in kernels.items()} == {"wi": jnp.bfloat16,
                                                              "wo": jnp.bfloat16}
    assert params["router"]["router_weights"]["w"].value.dtype == jnp.float32
    widened = jax.tree.map(lambda a: a.astype(jnp.float32), nn.meta.unbox(params))
    value, y, grads = _loss_and_grads(stored, nn.meta.unbox(params), x)
    value32, y32, grads32 = _loss_and_grads(MoeLayer(4, 16, **kwargs), widened, x)
    np.testing.assert_array_equal(y, y32)
    np.testing.assert_array_equal(value, value32)
    assert grads[0]["expert"]["wo"].dtype == jnp.bfloat16
    for ours, reference in zip(jax.tree.leaves(grads), jax.tree.leaves(grads32), strict=True):
        np.testing.assert_array_equal(ours, reference.astype(ours.dtype))


@pytest.mark.parametrize("jitter_on", ["inputs", "logits"])
def test_jitter_only_in_training_and_needs_explicit_rng(jitter_on):
    x = _inputs(0, (2, 16, 8))
    spec = TokenChoice(1, capacity_factor=8.0, jitter_noise=0.5, jitter_on=jitter_on)
    layer = MoeLayer(4, 16, router=spec, max_group_size=32)
    params = init(layer, x)
    clean = MoeLayer(4, 16, router=TokenChoice(1, capacity_factor=8.0), max_group_size=32)
    np.testing.assert_array_equal(jitted(layer)({"params": params}, x)[0],
                                  jitted(clean)({"params": params}, x)[0])
    with pytest.raises(Exception, match="router"):
        layer.apply({"params": params}, x, deterministic=False)
    train = jitted(layer, deterministic=False)
    a = train({"params": params}, x, rngs={"router": jax.random.key(1)})[0]
    b = train({"params": params}, x, rngs={"router": jax.random.key(1)})[0]
    c = train({"params": params}, x, rngs={"router": jax.random.key(2)})[0]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_expert_dropout_only_in_training():
    x = _inputs(0, (2, 16, 8))
    layer = MoeLayer(4, 16, router=TokenChoice(1, capacity_factor=8.0), expert_dropout_rate=0.5)
    params = init(layer, x)
    eval_out = jitted(layer)({"params": params}, x)[0]
    train_out = jitted(layer, deterministic=False)({"params": params}, x,
                                                   rngs={"dropout": jax.random.key(0)})[0]
    assert not np.allclose(eval_out, train_out)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(router=TokenChoice(num_selected_experts=5)), "num_selected_experts"),
        (dict(router=TokenChoice(capacity_factor=0.0)), "capacity_factor"),
        (dict(router=ExpertChoice(capacity_factor=-1.0)), "capacity_factor"),
        (dict(num_expert_partitions=3), "not divisible by num_expert_partitions"),
        (dict(router=ExpertChoice(), causal=True), "allow_causal=True"),
        (dict(router=TokenChoice(batch_prioritized=True), causal=True), "allow_causal=True"),
        (dict(dispatch="scatter"), "Unknown dispatch 'scatter'"),
        (dict(router=ExpertChoice(), dispatch="dropless"), "token choice only"),
    ],
)
def test_bad_configurations_raise_clear_errors(kwargs, match):
    layer = MoeLayer(4, 8, **kwargs)
    with pytest.raises(ValueError, match=match):
        layer.init(jax.random.key(0), jnp.ones((2, 4, 8)))


def test_causal_expert_choice_allowed_explicitly():
    layer = MoeLayer(4, 8, router=ExpertChoice(allow_causal=True), causal=True)
    layer.init(jax.random.key(0), jnp.ones((2, 4, 8)))


def test_bad_input_shapes_raise():
    layer = MoeLayer(4, 8)
    with pytest.raises(ValueError, match=r"\[batch, length, d_model\]"):
        layer.init(jax.random.key(0), jnp.ones((8, 8)))
    with pytest.raises(ValueError, match="padding_mask"):
        layer.init(jax.random.key(0), jnp.ones((2, 4, 8)), jnp.ones((2, 5)))


def test_parameters_carry_logical_axes():
    x = jnp.ones((2, 4, 8))
    params = MoeLayer(4, 16, activation="gated-gelu").init(jax.random.key(0), x)["params"]
    spec = nn.get_partition_spec(params)
    assert tuple(spec["expert"]["wi_0"]) == ("expert", "embed", "mlp")
    assert tuple(spec["expert"]["wo"]) == ("expert", "mlp", "embed")
    assert tuple(spec["router"]["router_weights"]["w"]) == ("embed", "unmodeled")


@pytest.mark.parametrize("dispatch,router,highest", [
    ("mask", TokenChoice(2, capacity_factor=2.0), 2),
    ("mask", ExpertChoice(2.0), 2),
    ("index", TokenChoice(2, capacity_factor=2.0), 0),
])
def test_one_hot_mask_einsums_run_at_highest_precision(dispatch, router, highest):
    """The mask dispatch's two one-hot matmuls (dispatch and combine) carry
    Precision.HIGHEST in the lowered program, so that on GPU (TF32) and TPU (bf16 passes) they
    move float32 values exactly as the index dispatch does; nothing else is forced to it."""
    x = _inputs()
    layer = MoeLayer(8, 32, router=router, dispatch=dispatch, max_group_size=48)
    params = init(layer, x)
    text = jitted(layer).lower({"params": params}, x).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert sum("HIGHEST" in line for line in dots) == highest, "\n".join(dots)
    assert len(dots) > highest  # the router and the experts keep the default precision
