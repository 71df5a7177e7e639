"""What the TPU compiler makes of our programs, compiled for v4 slices without a TPU.

A tiny sparse T5 train step on (data, expert) and (data, expert, model) meshes: the experts'
tokens move by all-to-all and no expert weight is all-gathered; the mask dispatch's one-hot
dots keep precision HIGHEST on TPU; the dropless grouped matmul is not dense over experts.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moe import gin_cli, hlo_collectives, plan, tpu_topology
from moe.grouped_matmul import grouped_matmul
from moe.moe_layer import MoeLayer
from moe.routing import TokenChoice
from tests.tpu.conftest import requires_libtpu

pytestmark = [requires_libtpu, pytest.mark.usefixtures("clean_gin")]

D_MODEL, D_FF, NUM_EXPERTS = 32, 64, 8  # tokens_choose_tiny


def _tiny_trainer(slice_name: str, expert_partitions: int, model_partitions: int):
    # GROUP_SIZE 32: 64 encoder and 16 decoder groups, multiples of the 16 batch shards, so
    # groups split evenly and nothing but the expert buffers has to move.
    argv = ["--gin_file=models/tokens_choose_tiny.gin", "--gin_file=runs/pretrain.gin",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.BATCH_SIZE=32",
            "--gin.GROUP_SIZE=32", f"--gin.NUM_EXPERT_PARTITIONS={expert_partitions}",
            f"--gin.NUM_MODEL_PARTITIONS={model_partitions}"]
    argv += [f"--gin.{m}={v!r}" for m, v in plan.UNUSED_MACROS.items()]
    gin_cli.parse_command_line(argv, gin_cli.make_parser("test"))
    trainer, _ = plan.build_trainer(slice_name)
    return trainer


def _train_step_hlo(trainer) -> str:
    batch = plan._abstract_batch(trainer)
    with trainer.partitioner.context():
        lowered = trainer.train_step.lower(trainer.abstract_state, batch)
    return lowered.compile().as_text()


def _expert_weight_gathers(ops):
    """All-gathers whose result is shaped like an expert kernel [E', d, f] / [E', f, d]."""
    kernel_tails = {(D_MODEL, D_FF), (D_FF, D_MODEL)}
    return [op for op in ops if op.kind == "all-gather"
            and any(len(dims) == 3 and dims[1:] in kernel_tails for _, dims in op.shapes)]


@pytest.mark.parametrize("expert_partitions,model_partitions,mesh", [
    (8, 1, {"data": 2, "expert": 8, "model": 1}),
    (4, 2, {"data": 2, "expert": 4, "model": 2}),
])
def test_sparse_t5_train_step_on_v4_32_moves_tokens_not_experts(
    expert_partitions, model_partitions, mesh
):
    trainer = _tiny_trainer("v4-32", expert_partitions, model_partitions)
    assert dict(trainer.partitioner.mesh.shape) == mesh
    assert trainer.partitioner.mesh.devices.flat[0].platform == "tpu"
    ops = hlo_collectives.collective_ops(_train_step_hlo(trainer))
    summary = hlo_collectives.summarize(ops)
    # Dispatch and combine of the encoder and the decoder MoE layer, forward and backward.
    assert summary["all-to-all"]["count"] >= 4, summary
    assert _expert_weight_gathers(ops) == []
    # Gradients of the replicated (dense) parameters are summed across the batch shards.
    assert summary["all-reduce"]["count"] >= 1


def test_expert_weight_gathers_are_recognized():
    """The check above can fail: an all-gather of an expert kernel is caught."""
    text = ("  %all-gather.3 = f32[8,32,64]{2,1,0} all-gather(f32[1,32,64]{2,1,0} %p), "
            "dimensions={0}\n"
            "  %all-gather.4 = f32[16,1,32,32]{3,2,1,0} all-gather(%q), dimensions={0}\n")
    ops = hlo_collectives.collective_ops(text)
    assert [op.shapes for op in _expert_weight_gathers(ops)] == [(("f32", (8, 32, 64)),)]


def _one_chip_mesh() -> Mesh:
    devices = tpu_topology.slice_devices("v4-8")
    return Mesh(np.asarray(devices[:1]).reshape(1, 1, 1), ("data", "expert", "model"))


def _compile_layer_grad(layer: MoeLayer, x_shape, dtype=jnp.float32):
    mesh = _one_chip_mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    x = jax.ShapeDtypeStruct(x_shape, dtype, sharding=replicated)
    params = jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros(x_shape, dtype))
    params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), params)

    def loss(p, x):
        return jnp.sum(layer.apply(p, x).astype(jnp.float32) ** 2)

    with jax.set_mesh(mesh):
        return jax.jit(jax.grad(loss)).lower(params, x).compile()


def test_mask_dispatch_one_hot_dots_are_highest_precision_on_tpu():
    layer = MoeLayer(num_experts=NUM_EXPERTS, d_ff=D_FF, activation="relu", dispatch="mask",
                     router=TokenChoice(num_selected_experts=2))
    text = _compile_layer_grad(layer, (2, 64, D_MODEL)).as_text()
    # TPU lowers dots to convolutions (fused or not); their op_name says which einsum.
    dots = [line for line in text.splitlines()
            if re.search(r"=\s*\S+\s+convolution\(", line) and "dot_general" in line]
    one_hot = [line for line in dots if ",gst->" in line]
    others = [line for line in dots if line not in one_hot]
    assert one_hot and others
    assert all("operand_precision={highest,highest}" in line for line in one_hot), one_hot
    # The router and expert matmuls keep the default precision: the check tells them apart.
    assert not any("operand_precision={highest,highest}" in line for line in others)


def _grad_flops(fn, *shapes) -> float:
    mesh = _one_chip_mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    args = [jax.ShapeDtypeStruct(s, d, sharding=replicated) for s, d in shapes]

    def loss(x, w, sizes):
        return jnp.sum(fn(x, w, sizes).astype(jnp.float32) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    return float(compiled.cost_analysis()["flops"])


def test_grouped_matmul_on_tpu_is_not_dense_over_experts():
    rows, k, n, experts = 4096, 512, 1024, 16
    shapes = [((rows, k), jnp.bfloat16), ((experts, k, n), jnp.bfloat16),
              ((experts,), jnp.int32)]
    grouped = 3 * 2 * rows * k * n  # forward, dx and dw of one grouped matmul
    ours = _grad_flops(grouped_matmul, *shapes)
    assert ours < 1.2 * grouped, (ours, grouped)
    # XLA's own ragged_dot is what the TPU path replaces: its weight gradient is dense over
    # the experts, several times the grouped FLOPs.
    xla = _grad_flops(lambda x, w, s: jax.lax.ragged_dot(x, w, s), *shapes)
    assert xla > 3 * grouped, (xla, grouped)


def test_dropless_layer_compiles_for_tpu_grouped():
    experts, d_model, d_ff, tokens = 16, 256, 512, 2048
    dropless = MoeLayer(num_experts=experts, d_ff=d_ff, activation="relu", dispatch="dropless",
                        router=TokenChoice(num_selected_experts=2), dtype=jnp.bfloat16)
    flops = float(_compile_layer_grad(dropless, (1, tokens, d_model)).cost_analysis()["flops"])
    expert_flops = 3 * 2 * (2 * tokens) * d_model * d_ff * 2  # fwd+bwd, 2 matmuls, top-2
    dense_over_experts = expert_flops * experts / 2
    assert flops < 1.5 * expert_flops < dense_over_experts, (flops, expert_flops)
