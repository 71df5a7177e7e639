"""Expert-parallel dropless dispatch (`moe.expert_parallel`): on (data, expert[, model]) meshes
of the 8 emulated devices it equals the one-device dispatch (outputs and gradients), with
uneven and worst-case loads, and compiles to all-to-alls instead of gathering the tokens.

Tolerance: float32 throughout, compared at rtol 1e-5 (atol 1e-5 times the array's largest
value). The sharded program multiplies the same rows by the same kernels, but XLA blocks the
grouped matmuls over other row counts, the kernel gradients are summed over the data shards
and, with a 'model' axis, the output matmul's d_ff slices are added by a psum: the results
differ by float32 rounding (measured: outputs ~2e-7, gradients ~5e-6 abs. on values up to a
few hundred), whereas one misrouted or dropped row changes values by O(1) of their size.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from moe import expert_parallel
from moe.moe_layer import MoeLayer
from moe.partitioning import Partitioner
from moe.routing import TokenChoice
from tests.test_moe_sharding import _compiled_hlo

NUM_EXPERTS, D_MODEL, D_FF = 8, 16, 32
SHAPE = (8, 32, D_MODEL)  # batch 8 x length 32: G = 8 groups of T = 32 tokens
ROUTERS = {"top1": TokenChoice(1), "top2": TokenChoice(2)}
# (expert partitions, model partitions) of the 8 devices -> mesh (data, expert, model).
MESHES = {"data2_expert4": (4, 1), "expert8": (8, 1), "data2_expert2_model2": (2, 2)}
# Router logit offsets per expert (added to a token's logits through a shifted input): skewed
# loads, and the worst case where every choice goes to the experts of one device.
SKEWED = (2.0, 1.0, 0.5, 0.0, -0.5, 0.0, 0.2, -1.0)
ONE_DEVICE = (50.0, 40.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # experts 0 and 1: expert device 0


def _layer(router: str, dropout: float = 0.0) -> MoeLayer:
    return MoeLayer(NUM_EXPERTS, D_FF, router=ROUTERS[router], dispatch="dropless",
                    max_group_size=32, num_expert_partitions=8, expert_dropout_rate=dropout)


def _inputs() -> jax.Array:
    # Every token has a component along the all-ones direction, which the router bias reads.
    return jax.random.normal(jax.random.key(1), SHAPE) + 1.0


def _params(layer: MoeLayer, x: jax.Array, offsets) -> dict:
    """Initial parameters with the router kernel biased: expert e's logit grows by about
    offsets[e] for every token (the inputs' mean is 1 per feature)."""
    params = nn.meta.unbox(layer.init(jax.random.key(0), x)["params"])
    w = params["router"]["router_weights"]["w"]
    bias = jnp.asarray(offsets, jnp.float32) / D_MODEL
    params["router"]["router_weights"]["w"] = w + bias[None, :]
    return params


def _loads(params: dict, x: jax.Array, k: int) -> np.ndarray:
    """How many (token, expert) choices each expert gets (top-k of the router logits)."""
    logits = x.reshape(-1, D_MODEL) @ params["router"]["router_weights"]["w"]
    top = jax.lax.top_k(logits, k)[1]
    return np.bincount(np.asarray(top).reshape(-1), minlength=NUM_EXPERTS)


def _objective(layer: MoeLayer):
    # A random cotangent: with sum(y), rows exchanged in the backward pass could cancel out.
    weights = jax.random.normal(jax.random.key(2), SHAPE)

    def loss(params, x):
        y, state = layer.apply({"params": params}, x, mutable=["moe"])
        d = state["moe"]["diagnostics"][0]
        return jnp.sum(y * weights) + 0.01 * d["auxiliary_loss"], y

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def _run(layer: MoeLayer, partitioner: Partitioner, params: dict, x: jax.Array):
    with partitioner.context():
        boxed = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
    shardings = partitioner.get_shardings(boxed)
    params = jax.device_put(params, shardings)
    step = partitioner.partition(
        _objective(layer), in_shardings=(shardings, partitioner.batch_sharding),
        out_shardings=None,
    )
    # The loss itself is left out of the comparison: a sum of 4096 products that nearly cancel,
    # added in another order per shard; its parts (y, and through the gradients the router's
    # auxiliary loss) are compared.
    (_, y), grads = step(params, jax.device_put(x, partitioner.batch_sharding))
    wi = params["expert"]["wi_0"]
    experts_per_device = wi.sharding.shard_shape(wi.shape)[0]
    return jax.device_get((y, grads)), experts_per_device


def _assert_close(sharded, single):
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@functools.cache
def _one_device(router: str, offsets: tuple[float, ...]):
    """The reference (shared by the meshes compared with it)."""
    layer, x = _layer(router), _inputs()
    return _run(layer, Partitioner(devices=jax.devices()[:1]), _params(layer, x, offsets), x)[0]


def _check_equal_to_one_device(router: str, mesh: str, offsets) -> np.ndarray:
    layer, x = _layer(router), _inputs()
    params = _params(layer, x, offsets)
    single = _one_device(router, offsets)
    experts, model = MESHES[mesh]
    partitioner = Partitioner(num_expert_partitions=experts, num_model_partitions=model)
    assert partitioner.mesh.shape["expert"] == experts
    sharded, experts_per_device = _run(layer, partitioner, params, x)
    assert experts_per_device == NUM_EXPERTS // experts  # the kernels really are split
    _assert_close(sharded, single)
    return _loads(params, x, ROUTERS[router].num_selected_experts)


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("mesh", ["data2_expert4", "expert8"])
def test_uneven_loads_equal_one_device(router, mesh):
    loads = _check_equal_to_one_device(router, mesh, SKEWED)
    assert loads.max() >= 3 * loads.mean(), f"loads are not uneven: {loads}"
    assert loads.min() <= loads.mean() / 3, f"loads are not uneven: {loads}"


def test_model_axis_equals_one_device():
    """d_ff split over 'model' inside the shard_map: partial outputs added by a psum."""
    loads = _check_equal_to_one_device("top2", "data2_expert2_model2", SKEWED)
    assert loads.max() >= 3 * loads.mean()


@pytest.mark.parametrize("router,mesh", [
    ("top1", "expert8"),
    pytest.param("top2", "data2_expert4", marks=pytest.mark.slow),
])
def test_every_choice_on_one_device_drops_nothing(router, mesh):
    """All rows go to the experts of expert-device 0 (top-1: expert 0 of 8 devices; top-2:
    experts 0 and 1, both on the first of 4): the worst-case buffer holds them all."""
    loads = _check_equal_to_one_device(router, mesh, ONE_DEVICE)
    experts_on_device_0 = NUM_EXPERTS // MESHES[mesh][0]
    assert loads[:experts_on_device_0].sum() == loads.sum() == np.prod(SHAPE[:2]) * (
        ROUTERS[router].num_selected_experts
    )


def _collectives(hlo: str) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(op, result shapes) of every collective in compiled HLO text."""
    found = []
    for line in hlo.splitlines():
        match = re.search(
            r"= (.*?) (all-gather|all-reduce|all-to-all|ragged-all-to-all|collective-permute|"
            r"reduce-scatter)(-start)?\(", line)
        if match:
            shapes = [tuple(int(n) for n in dims.split(",") if n)
                      for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", match.group(1))]
            found.append((match.group(2), shapes))
    return found


def _moves_tokens(shapes: list[tuple[int, ...]]) -> bool:
    """Token rows are d_model wide (d_model = 16 differs from E = 8, T = 32, k, G)."""
    return any(shape and shape[-1] == D_MODEL for shape in shapes)


@pytest.mark.parametrize("mesh", ["expert8", "data2_expert4"])
def test_compiles_to_all_to_all_without_gathering_tokens(mesh, monkeypatch):
    layer, x = _layer("top2"), _inputs()
    partitioner = Partitioner(num_expert_partitions=MESHES[mesh][0])
    collectives = _collectives(_compiled_hlo(layer, partitioner, x))
    ops = {op for op, _ in collectives}
    assert {"all-to-all", "ragged-all-to-all"} & ops, collectives
    # Token rows travel only by all-to-all. XLA's all-gather of the router's [G, T, E]
    # probabilities (its partitioning of top_k, in every dispatch) is allowed: E wide.
    for op, shapes in collectives:
        if op != "all-to-all":
            assert not _moves_tokens(shapes), (op, shapes)
    assert any(op == "all-to-all" and _moves_tokens(s) for op, s in collectives)
    # Control: the same layer without the expert-parallel form gathers the token rows (XLA
    # writes that gather as an all-reduce of [M, d_model] or an all-gather).
    monkeypatch.setattr(expert_parallel, "expert_parallel", lambda mesh=None: False)
    plain = _collectives(_compiled_hlo(layer, partitioner, x))
    assert any(op != "all-to-all" and _moves_tokens(s) for op, s in plain), plain


def test_ragged_all_to_all_lowers_with_gradients(monkeypatch):
    """Where the platform runs `ragged-all-to-all` (not XLA:CPU at jax 0.10.2), the layer uses
    it, forward and backward (its transpose is another ragged all-to-all); lowered, not run."""
    monkeypatch.setattr(expert_parallel, "ragged_all_to_all_runs_on", lambda platform: True)
    layer, x = _layer("top2"), _inputs()
    partitioner = Partitioner(num_expert_partitions=8)
    params = _params(layer, x, SKEWED)
    with partitioner.context():
        text = jax.jit(_objective(layer)).lower(params, x).as_text()
    assert text.count("ragged_all_to_all") >= 4  # tokens out and back, and their transposes


def _ragged_all_to_all_reference(operands, outputs, input_offsets, send_sizes,
                                 output_offsets, recv_sizes):
    """`jax.lax.ragged_all_to_all`'s documented semantics, per device, in numpy."""
    outputs = [o.copy() for o in outputs]
    n = len(operands)
    for src in range(n):
        for dst in range(n):
            size = send_sizes[src][dst]
            assert size == recv_sizes[dst][src]
            rows = operands[src][input_offsets[src][dst]:input_offsets[src][dst] + size]
            start = output_offsets[src][dst]
            outputs[dst][start:start + size] = rows
    return outputs


@pytest.mark.parametrize("send", [
    [[0, 0, 0, 6], [0, 0, 6, 0], [2, 1, 0, 3], [1, 1, 1, 1]],  # mixed; device 3 keeps 2 rows
    [[0, 0, 6, 0]] * 4,  # every sender's every row to peer 2: the worst case
])
def test_padded_exchange_is_ragged_all_to_all(send):
    """The fixed-size emulation moves rows exactly as `ragged_all_to_all` would."""
    n, rows, out_rows = 4, 6, 24
    mesh = Mesh(np.array(jax.devices()[:n]), ("expert",))
    send = np.asarray(send, np.int32)  # [src, dst]
    input_offsets = (np.cumsum(send, axis=1) - send).astype(np.int32)
    output_offsets = (np.cumsum(send, axis=0) - send).astype(np.int32)  # stacked by sender
    recv = send.T.copy()
    rng = np.random.default_rng(0)
    operands = rng.normal(size=(n, rows, 3)).astype(np.float32)
    outputs = np.full((n, out_rows, 3), -1.0, np.float32)  # unwritten rows keep their values

    def exchange(operand, output, in_off, sizes, out_off, recv_sizes):
        return expert_parallel.padded_ragged_all_to_all(
            operand[0], output[0], in_off[0], sizes[0], out_off[0], recv_sizes[0],
            axis_name="expert", max_rows_per_peer=rows)[None]

    spec = PartitionSpec("expert")
    got = jax.jit(jax.shard_map(exchange, mesh=mesh, in_specs=spec, out_specs=spec))(
        operands, outputs, input_offsets, send, output_offsets, recv)
    want = _ragged_all_to_all_reference(list(operands), list(outputs), input_offsets, send,
                                        output_offsets, recv)
    np.testing.assert_array_equal(np.asarray(got), np.stack(want))


def test_expert_dropout_runs_sharded():
    """Expert dropout inside the shard_map: the key drawn outside, folded with each device's
    index inside; training output differs from evaluation and repeats for the same key."""
    layer, x = _layer("top2", dropout=0.5), _inputs()
    params = _params(layer, x, SKEWED)
    partitioner = Partitioner(num_expert_partitions=8)
    train = partitioner.partition(
        lambda p, x, key: layer.apply({"params": p}, x, deterministic=False,
                                      rngs={"dropout": key}),
        in_shardings=None, out_shardings=None)
    evaluate = partitioner.partition(lambda p, x: layer.apply({"params": p}, x),
                                     in_shardings=None, out_shardings=None)
    first = np.asarray(train(params, x, jax.random.key(3)))
    again = np.asarray(train(params, x, jax.random.key(3)))
    other = np.asarray(train(params, x, jax.random.key(4)))
    np.testing.assert_array_equal(first, again)
    assert np.isfinite(first).all()
    assert not np.allclose(first, np.asarray(evaluate(params, x)))
    assert not np.allclose(first, other)


def test_groups_that_do_not_split_over_the_devices_are_padded():
    """G = 2 groups on 8 (expert x data) shards: empty groups pad the shard_map's input."""
    layer = MoeLayer(NUM_EXPERTS, D_FF, router=ROUTERS["top2"], dispatch="dropless",
                     max_group_size=96)
    x = jax.random.normal(jax.random.key(1), (3, 40, D_MODEL))  # 120 tokens: G=2, T=60
    params = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(0), x)["params"])
    single = jax.jit(layer.apply)({"params": params}, x)
    partitioner = Partitioner(num_expert_partitions=4)
    sharded = partitioner.partition(lambda p, x: layer.apply({"params": p}, x),
                                    in_shardings=None, out_shardings=None)(params, x)
    _assert_close(sharded, single)
