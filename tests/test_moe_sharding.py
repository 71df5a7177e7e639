"""The MoE layer sharded over emulated devices equals the layer on one device, and the expert
axis really is split: XLA inserts the all-to-all between group-sharded and expert-sharded data."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.moe_layer import MoeLayer
from moe.partitioning import Partitioner
from moe.routing import ExpertChoice, SigmoidTokenChoice, TokenChoice

ROUTERS = {
    "top1": TokenChoice(1, capacity_factor=1.0),
    "top2": TokenChoice(2, capacity_factor=1.25, batch_prioritized=True),
    "expert_choice": ExpertChoice(2.0),
    "sigmoid_grouped": SigmoidTokenChoice(
        4, routed_scaling_factor=2.5, num_expert_groups=4, num_selected_groups=2,
        balance_loss=True,
    ),
}
MESHES = {"data2_expert4": 4, "expert8": 8}


def _layer(router, dispatch="index"):
    # Grouping depends only on the configuration, so every mesh routes the same groups.
    return MoeLayer(8, 32, router=ROUTERS[router], dispatch=dispatch, max_group_size=32,
                    num_expert_partitions=8)


def _objective(layer):
    def loss(params, x):
        y, state = layer.apply({"params": params}, x, mutable=["moe"])
        d = state["moe"]["diagnostics"][0]
        return jnp.sum(y) + 0.01 * d["auxiliary_loss"] + 0.001 * d["router_z_loss"], y

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def _run(layer, partitioner, x):
    with partitioner.context():
        boxed = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
    param_shardings = partitioner.get_shardings(boxed)
    params = jax.jit(lambda: nn.meta.unbox(layer.init(jax.random.key(0), x)["params"]),
                     out_shardings=param_shardings)
    with partitioner.context():
        params = params()
    step = partitioner.partition(
        _objective(layer),
        in_shardings=(param_shardings, partitioner.batch_sharding),
        out_shardings=None,
    )
    x = jax.device_put(x, partitioner.batch_sharding)
    (value, y), grads = step(params, x)
    return value, y, grads, params


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("mesh", list(MESHES))
def test_eight_devices_equal_one_device(router, mesh):
    x = jax.random.normal(jax.random.key(1), (8, 32, 16))
    layer = _layer(router)
    single = _run(layer, Partitioner(devices=jax.devices()[:1]), x)
    sharded_partitioner = Partitioner(num_expert_partitions=MESHES[mesh])
    assert sharded_partitioner.mesh.shape["expert"] == MESHES[mesh]
    sharded = _run(layer, sharded_partitioner, x)
    # The expert weights really are split over the expert axis.
    wi = sharded[3]["expert"]["wi_0"]
    assert wi.sharding.shard_shape(wi.shape)[0] == 8 // MESHES[mesh]
    np.testing.assert_allclose(sharded[0], single[0], rtol=1e-5)
    np.testing.assert_allclose(sharded[1], single[1], atol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded[2]), jax.tree.leaves(single[2])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _compiled_hlo(layer, partitioner, x):
    with partitioner.context():
        boxed = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
    shardings = partitioner.get_shardings(boxed)
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.meta.unbox(boxed),
        shardings,
    )
    x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=partitioner.batch_sharding)
    with partitioner.context():
        hlo = (
            jax.jit(lambda p, x: layer.apply({"params": p}, x),
                    in_shardings=(shardings, partitioner.batch_sharding))
            .lower(params, x)
            .compile()
            .as_text()
        )
    return hlo


@pytest.mark.parametrize("dispatch", ["index", "mask"])
def test_expert_parallel_layer_compiles_to_all_to_all(dispatch):
    x = jax.random.normal(jax.random.key(1), (8, 32, 16))
    layer = _layer("top2", dispatch)
    hlo = _compiled_hlo(layer, Partitioner(num_expert_partitions=8), x)
    assert "all-to-all" in hlo, "expected XLA to exchange expert buffers with an all-to-all"
    # Control: with pure data parallelism (no expert axis) there is nothing to exchange.
    assert "all-to-all" not in _compiled_hlo(layer, Partitioner(num_expert_partitions=1), x)


def test_groups_the_batch_shards_cannot_split_are_reported_once(caplog):
    """8 x 32 tokens in groups of 128 make 2 groups (rounded up to the 2 expert partitions):
    the 8 batch shards cannot split them, so XLA gathers tokens; the layer says how to fix it.
    The same layer with groups of 32 (8 groups) says nothing."""
    from moe import moe_layer

    x = jax.random.normal(jax.random.key(1), (8, 32, 16))
    partitioner = Partitioner(num_expert_partitions=2)
    moe_layer._warn_groups_do_not_split.cache_clear()
    fine = MoeLayer(8, 32, router=ROUTERS["top1"], max_group_size=32, num_expert_partitions=2)
    _compiled_hlo(fine, partitioner, x)
    assert "cannot split" not in caplog.text
    coarse = fine.clone(max_group_size=128)
    _compiled_hlo(coarse, partitioner, x)
    _compiled_hlo(coarse, partitioner, x)
    warnings = [r.getMessage() for r in caplog.records if "cannot split" in r.getMessage()]
    assert len(warnings) == 1
    assert "routes 2 groups" in warnings[0] and "8 batch shards" in warnings[0]
