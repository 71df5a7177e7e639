"""Soft MoE: its dispatch and combine weights, the layer against the paper's formula written
out in numpy, its refusals (index dispatch, causal stacks), and 1 device = 8 devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.activations import apply_activation
from moe.errors import ConfigurationError
from moe.moe_layer import MoeLayer
from moe.partitioning import Partitioner
from moe.routing import SoftMoe, route_soft
from tests.test_moe_sharding import _run

E, P, D, F = 4, 2, 8, 16


def _inputs(shape=(2, 12, D), seed=0):
    x = jax.random.normal(jax.random.key(seed), shape)
    mask = jnp.arange(shape[1])[None, :] < jnp.array([[shape[1]], [7]])
    return x, mask


def test_dispatch_mixes_real_tokens_and_combine_mixes_all_slots():
    logits = jax.random.normal(jax.random.key(1), (3, 10, E * P)) * 3
    real = jnp.arange(10)[None, :] < jnp.array([[10], [4], [1]])
    plan = route_soft(logits, real, slots_per_expert=P)
    dispatch, combine = np.asarray(plan.soft.dispatch), np.asarray(plan.soft.combine)
    assert dispatch.shape == combine.shape == (3, E, P, 10)
    np.testing.assert_allclose(dispatch.sum(-1), 1.0, rtol=1e-6)  # each slot: convex mix
    assert np.all(dispatch[1, ..., 4:] == 0) and np.all(dispatch[2, ..., 1:] == 0)
    sums = combine.sum((1, 2))  # each real token: convex mix of the E*P slots
    np.testing.assert_allclose(sums[np.asarray(real)], 1.0, rtol=1e-6)
    assert np.all(sums[~np.asarray(real)] == 0)
    assert float(plan.auxiliary_loss) == 0.0


def _paper_formula(x, mask, params):
    """Soft MoE for one group, as written in the paper (numpy, float64)."""
    x, mask = np.asarray(x, np.float64), np.asarray(mask)
    phi = np.asarray(params["router"]["router_weights"]["w"], np.float64)
    kernels = {k: np.asarray(v, np.float64) for k, v in params["expert"].items()}
    logits = x[mask] @ phi  # [m, E*P]
    d = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
    c = np.exp(logits - logits.max(1, keepdims=True))
    c = c / c.sum(1, keepdims=True)
    slots = (d.T @ x[mask]).reshape(E, P, D)
    hidden = [np.einsum("epd,edf->epf", slots, kernels[k]) for k in ("wi_0", "wi_1")]
    hidden = np.asarray(apply_activation("gated-gelu", [jnp.asarray(h) for h in hidden]),
                        np.float64)
    y = np.einsum("epf,efd->epd", hidden, kernels["wo"]).reshape(E * P, D)
    out = np.zeros_like(x)
    out[mask] = c @ y
    return out


def test_the_layer_computes_the_papers_formula():
    x, mask = _inputs()
    layer = MoeLayer(E, F, router=SoftMoe(P), dispatch="mask", max_group_size=12)
    params = nn.meta.unbox(layer.init(jax.random.key(2), x, mask)["params"])
    assert params["router"]["router_weights"]["w"].shape == (D, E * P)
    out = np.asarray(layer.apply({"params": params}, x, mask))
    for g in range(2):
        np.testing.assert_allclose(out[g], _paper_formula(x[g], mask[g], params), atol=1e-5)
    assert np.all(out[1, 7:] == 0)  # padding gets no output


def test_soft_moe_needs_the_mask_dispatch_and_a_bidirectional_stack():
    x, mask = _inputs()
    with pytest.raises(ConfigurationError, match="dispatch='mask'"):
        MoeLayer(E, F, router=SoftMoe(P), dispatch="index").init(jax.random.key(0), x, mask)
    with pytest.raises(ConfigurationError, match="leaks the future"):
        MoeLayer(E, F, router=SoftMoe(P), dispatch="mask", causal=True).check_config()
    with pytest.raises(ConfigurationError, match="slots_per_expert"):
        SoftMoe(0).validate(E)
    assert SoftMoe(P).experts_per_token(group_size=8, num_experts=E) == 1.0  # E*P slots = T


@pytest.mark.parametrize("expert_partitions", [4, 8])
def test_eight_devices_equal_one_device(expert_partitions):
    x = jax.random.normal(jax.random.key(1), (8, 32, 16))
    layer = MoeLayer(8, 32, router=SoftMoe(2), dispatch="mask", max_group_size=32,
                     num_expert_partitions=8)
    single = _run(layer, Partitioner(devices=jax.devices()[:1]), x)
    sharded = _run(layer, Partitioner(num_expert_partitions=expert_partitions), x)
    np.testing.assert_allclose(sharded[0], single[0], rtol=1e-5)
    np.testing.assert_allclose(sharded[1], single[1], atol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded[2]), jax.tree.leaves(single[2])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
