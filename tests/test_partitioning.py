"""The partitioner: mesh shapes, shardings from logical axes, jit over the mesh, data layout."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from moe.partitioning import Partitioner, data_layout, expert_axis_size


class _Boxed(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param(
            "experts",
            nn.with_logical_partitioning(nn.initializers.normal(), ("expert", "embed", "mlp")),
            (8, x.shape[-1], 16),
        )
        v = self.param(
            "vocab_proj",
            nn.with_logical_partitioning(nn.initializers.normal(), ("embed", "vocab")),
            (x.shape[-1], 32),
        )
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return jnp.einsum("bd,edf->bf", x * scale, w).sum() + (x @ v).sum()


@pytest.mark.parametrize(
    "experts,model,shape",
    [
        (1, 1, (8, 1, 1)),
        (4, 1, (2, 4, 1)),
        (4, 2, (1, 4, 2)),
        (3, 1, (4, 2, 1)),
        (16, 1, (1, 8, 1)),
    ],
)
def test_mesh_shape_follows_t5x_rule(experts, model, shape):
    partitioner = Partitioner(num_expert_partitions=experts, num_model_partitions=model)
    assert tuple(partitioner.mesh.shape.values()) == shape
    assert partitioner.mesh.axis_names == ("data", "expert", "model")
    assert expert_axis_size(8 // model, experts) == shape[1]


def test_single_device_partitioner():
    partitioner = Partitioner(devices=jax.devices()[:1])
    assert partitioner.num_batch_shards == 1
    assert partitioner.get_data_layout(3) == data_layout(partitioner.mesh.devices, 3, 0)


def test_bad_mesh_and_rules_raise_clear_errors():
    with pytest.raises(ValueError, match="NUM_MODEL_PARTITIONS=3 must divide"):
        Partitioner(num_model_partitions=3)
    with pytest.raises(ValueError, match="names mesh axis 'tensor'"):
        Partitioner(logical_axis_rules=[("batch", "tensor")])
    with pytest.raises(ValueError, match="BATCH_SIZE=6 is not divisible by the 8"):
        Partitioner().get_data_layout(6)


def test_param_and_optimizer_shardings_follow_logical_axes():
    partitioner = Partitioner(num_expert_partitions=4, num_model_partitions=2)
    module = _Boxed()
    boxed = jax.eval_shape(module.init, jax.random.key(0), jnp.ones((2, 4)))
    shardings = partitioner.get_shardings(boxed)["params"]
    assert shardings["experts"].spec == P("expert", None, "model")
    assert shardings["vocab_proj"].spec == P(None, "model")
    assert shardings["scale"].spec == P()

    params = nn.meta.unbox(boxed)["params"]
    tx = optax.adam(1e-3)
    opt_state = jax.eval_shape(tx.init, params)
    opt_shardings = partitioner.optimizer_state_shardings(opt_state, params, shardings)
    adam_state = opt_shardings[0]
    assert adam_state.mu["experts"].spec == P("expert", None, "model")
    assert adam_state.nu["vocab_proj"].spec == P(None, "model")
    assert adam_state.count.spec == P()

    # optax's factored second moments have other shapes: replicated (or, where a leaf keeps
    # the parameter's rank, unsharded on the axes it reduced), never mis-sharded.
    factored = jax.eval_shape(optax.adafactor(1e-3).init, params)
    for leaf_sharding, leaf in zip(
        jax.tree.leaves(partitioner.optimizer_state_shardings(factored, params, shardings)),
        jax.tree.leaves(factored),
    ):
        if all(axis is None for axis in leaf_sharding.spec):
            continue
        assert leaf_sharding.spec in (P("expert", None, "model"), P(None, "model"))
        assert leaf.ndim == len(leaf_sharding.spec)


def test_partitioned_function_matches_unsharded():
    partitioner = Partitioner(num_expert_partitions=4, num_model_partitions=2)
    module = _Boxed()
    x = jax.random.normal(jax.random.key(1), (8, 4))
    boxed = jax.eval_shape(module.init, jax.random.key(0), x)
    param_shardings = partitioner.get_shardings(boxed)
    init = partitioner.partition(
        lambda key: nn.meta.unbox(module.init(key, x)), (None,), param_shardings
    )
    variables = init(jax.random.key(0))
    assert variables["params"]["experts"].sharding.spec == P("expert", None, "model")
    loss = partitioner.partition(
        lambda v, x: module.apply(v, x),
        (param_shardings, partitioner.batch_sharding),
        partitioner.replicated_sharding,
    )
    host = jax.device_get(variables)
    expected = module.apply(host, x)
    sharded_x = partitioner.shard_batch({"x": x})["x"]
    np.testing.assert_allclose(loss(variables, sharded_x), expected, rtol=1e-5, atol=1e-6)


def test_batch_is_split_over_expert_then_data():
    partitioner = Partitioner(num_expert_partitions=4)
    batch = partitioner.shard_batch({"tokens": np.arange(16).reshape(8, 2)})
    tokens = batch["tokens"]
    assert tokens.sharding.spec == P(("expert", "data"))
    # Device (data d, expert e) holds row e * data_size + d.
    for d in range(2):
        for e in range(4):
            device = partitioner.mesh.devices[d, e, 0]
            shard = next(s for s in tokens.addressable_shards if s.device == device)
            np.testing.assert_array_equal(np.asarray(shard.data)[:, 0], [2 * (e * 2 + d)])


def test_multi_host_data_layout():
    # 4 hosts with 2 devices each, emulated by their process indices.
    fake = np.array([types.SimpleNamespace(process_index=i // 2) for i in range(8)])
    # Pure data parallel: each host loads its own quarter.
    layouts = [data_layout(fake.reshape(8, 1, 1), 64, p) for p in range(4)]
    assert [(x.shard_id, x.num_shards) for x in layouts] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    # Model axis across the two devices of a host: still one shard per host.
    layouts = [data_layout(fake.reshape(4, 1, 2), 64, p) for p in range(4)]
    assert [(x.shard_id, x.num_shards) for x in layouts] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    # Model axis spanning two hosts: those hosts are replicas and read the same shard.
    grid = np.array([types.SimpleNamespace(process_index=p) for p in (0, 1, 0, 1, 2, 3, 2, 3)])
    layouts = [data_layout(grid.reshape(4, 1, 2), 64, p) for p in range(4)]
    assert [x.shard_id for x in layouts] == [0, 0, 1, 1]
    assert {x.num_shards for x in layouts} == {2}


def test_indivisible_parameter_dimension_raises_clearly():
    class ThreeHeads(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.normal(), ("embed", "heads"))
            return x @ self.param("query", init, (x.shape[-1], 3))

    boxed = jax.eval_shape(ThreeHeads().init, jax.random.key(0), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"'query'\]? has size 3 in dimension 1.*model"):
        Partitioner(num_model_partitions=2).get_shardings(boxed)


def test_adafactor_expert_statistics_are_split_along_the_expert_axis():
    """Our Adafactor keeps `v_row` [E, d, 1] and `v_col` [E, 1, f] per expert: they take the
    expert kernel's sharding on the axes they keep (T5X), instead of being replicated."""
    from moe import optimizers

    partitioner = Partitioner(num_expert_partitions=4, num_model_partitions=2)
    boxed = jax.eval_shape(_Boxed().init, jax.random.key(0), jnp.ones((2, 32)))
    shardings = partitioner.get_shardings(boxed)["params"]
    params = nn.meta.unbox(boxed)["params"]
    tx = optimizers.adafactor(
        1e-3, factor_specs=optimizers.factor_specs_from_boxed(boxed["params"]),
        min_dim_size_to_factor=8)
    state = jax.eval_shape(tx.init, params)
    opt = partitioner.optimizer_state_shardings(state, params, shardings)
    second_moments = next(s for s in opt if hasattr(s, "v_row"))
    abstract = next(s for s in state if hasattr(s, "v_row"))
    assert abstract.v_row["experts"].shape == (8, 32, 1)
    assert abstract.v_col["experts"].shape == (8, 1, 16)
    assert second_moments.v_row["experts"].spec == P("expert", None, None)
    assert second_moments.v_col["experts"].spec == P("expert", None, "model")
    # The vocabulary projection [d, V] is sharded ('embed' -> None, 'vocab' -> 'model').
    assert second_moments.v_col["vocab_proj"].spec == P(None, "model")
    assert second_moments.v_row["vocab_proj"].spec == P(None, None)
    # Per device, an expert statistic holds only its experts: 8 experts / 4 shards.
    shard_shape = second_moments.v_row["experts"].shard_shape((8, 32, 1))
    assert shard_shape == (2, 32, 1)


def test_partitioner_is_gin_configurable():
    """T5X users bind the partitioner's rules in gin: `Partitioner.logical_axis_rules`."""
    import gin

    try:
        gin.parse_config("import moe.partitioning\n"
                         "Partitioner.logical_axis_rules = [('batch', 'data')]")
        assert Partitioner().logical_axis_rules[0] == ("batch", "data")
    finally:
        gin.clear_config()
