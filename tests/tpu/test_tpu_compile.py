"""What the TPU compiler makes of our programs, compiled for v4 slices without a TPU.

A tiny sparse T5 train step on (data, expert) and (data, expert, model) meshes: the experts'
tokens move by all-to-all and no expert weight is all-gathered; the mask dispatch's one-hot
dots keep precision HIGHEST on TPU; the dropless grouped matmul is not dense over experts.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from moe import gin_cli, hlo_collectives, plan, tpu_topology
from moe.grouped_matmul import grouped_matmul
from moe.moe_layer import MoeLayer
from moe.partitioning import Partitioner
from moe.routing import TokenChoice
from tests.tpu.conftest import compile_layer_grad, requires_libtpu

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
    return trainer.lower_train_step().compile().as_text()


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


def _one_chip() -> Partitioner:
    return Partitioner(devices=tpu_topology.slice_devices("v4-8")[:1])


def _compile_layer_grad(layer: MoeLayer, x_shape, dtype=jnp.float32):
    return compile_layer_grad(layer, x_shape, _one_chip(), dtype)[1]


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
    replicated = _one_chip().replicated_sharding
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


def test_expert_parallel_dropless_on_v4_32_exchanges_rows_ragged():
    """Dropless under a (data 2, expert 8) mesh: rows move by ragged all-to-all, each chip's
    experts run the grouped kernel, no token or expert weight is gathered, and the FLOPs per
    chip are its share of the grouped computation, not dense over the experts."""
    experts, d_model, d_ff, batch, length = 16, 256, 512, 32, 128
    partitioner = Partitioner(8, devices=tpu_topology.slice_devices("v4-32"))
    layer = MoeLayer(num_experts=experts, d_ff=d_ff, activation="relu", dispatch="dropless",
                     router=TokenChoice(num_selected_experts=2), max_group_size=length,
                     num_expert_partitions=8, dtype=jnp.bfloat16)
    _, compiled = compile_layer_grad(layer, (batch, length, d_model), partitioner)
    ops = hlo_collectives.collective_ops(compiled.as_text())
    summary = hlo_collectives.summarize(ops)
    assert summary["ragged-all-to-all"]["count"] >= 2, summary
    wide = [op for op in ops if op.kind == "all-gather"
            and any(dims and dims[-1] in (d_model, d_ff) for _, dims in op.shapes)]
    assert wide == []
    chip_rows = 2 * batch * length // 16  # top-2 choices of the chip's tokens, if balanced
    per_chip = 3 * 2 * chip_rows * d_model * d_ff * 2
    flops = float(compiled.cost_analysis()["flops"])
    # The kernel's static cost counts its receive buffer, the worst case of all 8 peers' rows
    # (at run time it visits only the rows that came); dense over the chip's 2 experts would
    # be 2 x 8 = 16 times the balanced share.
    assert flops < 8 * per_chip, (flops, per_chip)
