"""Model invariants: sparse layouts, position buckets, dense MLP = upcycled experts, decoder
causality, the expert-choice guard in causal stacks, padding and packing invariance, and
clear errors on bad inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moe.models.config import SparseConfig, TransformerConfig
from moe.models.layers import MlpBlock, relative_position_bucket
from moe.models.sparse_layout import sparse_layers
from moe.moe_layer import MoeLayer
from moe.partitioning import Partitioner
from moe.routing import ExpertChoice, TokenChoice
from tests.models.helpers import (
    decoder_model,
    encdec_batch,
    encdec_model,
    init_params,
    jit_loss,
    lm_batch,
    tiny_config,
)


def _layers(flags):
    return [i for i, sparse in enumerate(flags) if sparse]


def test_sparse_layouts():
    assert _layers(sparse_layers(12, 6, "MIXED")) == [1, 3, 5, 7, 9, 11]
    assert _layers(sparse_layers(12, 3, "mixed")) == [3, 7, 11]
    assert _layers(sparse_layers(12, 3, "BOTTOM")) == [0, 1, 2]
    assert _layers(sparse_layers(12, 3, "TOP")) == [9, 10, 11]
    assert _layers(sparse_layers(12, 4, "MIDDLE")) == [4, 5, 6, 7]
    assert _layers(sparse_layers(4, 0, "MIXED")) == []
    # Hugging Face SwitchTransformers: i % (L // S) == 1, the second layer of each block.
    assert _layers(sparse_layers(12, 6, "HF_SWITCH")) == _layers(sparse_layers(12, 6, "MIXED"))
    assert _layers(sparse_layers(12, 3, "HF_SWITCH")) == [1, 5, 9]
    assert _layers(sparse_layers(4, 1, "HF_SWITCH")) == [1]
    assert _layers(sparse_layers(6, 4, "HF_SWITCH")) == [0, 1, 2, 3, 4, 5]  # step 1: all
    with pytest.raises(ValueError, match="MIXED layout needs num_sparse_layers"):
        sparse_layers(12, 5, "MIXED")
    with pytest.raises(ValueError, match="between 0 and the number of layers"):
        sparse_layers(2, 3, "TOP")
    with pytest.raises(ValueError, match="Unknown sparse layout"):
        sparse_layers(2, 1, "EVERYWHERE")


def test_relative_position_buckets_follow_t5():
    rel = jnp.array([0, -1, 1, -7, -8, -200, 200])  # key - query
    bi = relative_position_bucket(rel, True, 32, 128)
    # Bidirectional: 16 buckets per direction, exact below 8, keys after the query offset by 16.
    np.testing.assert_array_equal(bi, [0, 1, 17, 7, 8, 15, 31])
    causal = relative_position_bucket(rel, False, 32, 128)
    # Causal: only the past is bucketed (exact below 16); the future shares bucket 0.
    np.testing.assert_array_equal(causal, [0, 1, 0, 7, 8, 31, 0])
    # Buckets never decrease with distance.
    far = relative_position_bucket(-jnp.arange(300), False, 32, 128)
    assert (jnp.diff(far) >= 0).all()


def test_dense_mlp_copied_into_experts_gives_gate_times_dense_output():
    """Upcycling: the dense MLP's parameters, copied into every expert, give the same function."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    dense = MlpBlock(d_ff=32, activation="gated-gelu")
    dense_params = jax.jit(dense.init)(jax.random.key(1), x)["params"]
    layer = MoeLayer(num_experts=4, d_ff=32, router=TokenChoice(1, capacity_factor=8.0))
    params = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(2), x)["params"])
    params["expert"] = {
        name: jnp.broadcast_to(nn.meta.unbox(w), (4, *w.shape))
        for name, w in nn.meta.unbox(dense_params).items()
    }
    out = jax.jit(layer.apply)({"params": params}, x)
    probs = jax.nn.softmax(x @ params["router"]["router_weights"]["w"], axis=-1)
    expected = jnp.max(probs, -1, keepdims=True) * dense.apply({"params": dense_params}, x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def _logits(model, params, batch):
    return jax.jit(lambda p, b: model.module.apply({"params": p}, **b))(params, batch)


@pytest.mark.parametrize("kind", ["encdec", "decoder_only"])
def test_decoders_are_causal(kind):
    if kind == "encdec":
        model = encdec_model()
        batch = encdec_batch(batch=2, targets=8)
        batch = {k: v for k, v in batch.items() if k != "decoder_loss_weights"}
        changed_key = "decoder_input_tokens"
    else:
        model = decoder_model()
        batch = lm_batch(batch=2, length=8)
        changed_key = "decoder_input_tokens"
    batch.pop("decoder_target_tokens")  # every position real: nothing masked as padding
    params = init_params(model, batch)
    base = _logits(model, params, batch)
    t = 3
    tokens = batch[changed_key]
    future = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 7) % 38 + 2)
    changed = _logits(model, params, {**batch, changed_key: future})
    np.testing.assert_allclose(changed[:, : t + 1], base[:, : t + 1], atol=1e-6)
    assert not np.allclose(changed[:, t + 1 :], base[:, t + 1 :])


def test_expert_choice_in_causal_stack_is_refused_unless_allowed_and_then_leaks():
    batch = lm_batch(batch=2, length=8)
    batch.pop("decoder_target_tokens")
    refused = decoder_model(tiny_config(
        num_encoder_layers=0, encoder_sparse=SparseConfig(), router=ExpertChoice(1.0)
    ))
    with pytest.raises(ValueError, match="leaks the future"):
        init_params(refused, batch)
    # Allowed explicitly: the leakage is real (documented in the decoder-only EC gins).
    model = decoder_model(tiny_config(
        num_encoder_layers=0, encoder_sparse=SparseConfig(),
        router=ExpertChoice(capacity_factor=1.0, allow_causal=True),
    ))
    params = init_params(model, batch)
    base = _logits(model, params, batch)
    leaked = []
    for seed in range(4):
        future = batch["decoder_input_tokens"].at[:, 4:].set(
            jax.random.randint(jax.random.key(seed), (2, 4), 2, 40)
        )
        changed = _logits(model, params, {**batch, "decoder_input_tokens": future})
        leaked.append(float(jnp.max(jnp.abs(changed[:, :4] - base[:, :4]))))
    assert max(leaked) > 1e-4


def test_padding_does_not_change_real_outputs():
    model = encdec_model()
    batch = encdec_batch(batch=2, inputs=8, targets=6)
    params = init_params(model, batch)
    module_batch = {k: v for k, v in batch.items() if k != "decoder_loss_weights"}
    base = _logits(model, params, module_batch)
    padded = {k: jnp.pad(v, ((0, 0), (0, 5))) for k, v in module_batch.items()}
    out = _logits(model, params, padded)
    real = np.asarray(batch["decoder_target_tokens"] > 0)
    np.testing.assert_allclose(np.asarray(out[:, :6])[real], np.asarray(base)[real], atol=1e-5)
    # The loss is normalized by real target tokens: padding changes nothing either.
    loss, _ = jit_loss(model)(params, batch)
    padded_loss, _ = jit_loss(model)(
        params, {k: jnp.pad(v, ((0, 0), (0, 5))) for k, v in batch.items()}
    )
    np.testing.assert_allclose(padded_loss, loss, rtol=1e-5)


def test_packed_sequences_equal_separate_ones():
    model = encdec_model()
    a = {"enc": [5, 6, 7, 1], "dec_in": [0, 8, 9], "tgt": [8, 9, 1]}
    b = {"enc": [10, 11, 1], "dec_in": [0, 12], "tgt": [12, 1]}

    def row(*seqs, length):
        flat = [t for s in seqs for t in s]
        return flat + [0] * (length - len(flat))

    def seg(*seqs, length):
        return row(*([i + 1] * len(s) for i, s in enumerate(seqs)), length=length)

    packed = {
        "encoder_input_tokens": jnp.array([row(a["enc"], b["enc"], length=9)]),
        "decoder_input_tokens": jnp.array([row(a["dec_in"], b["dec_in"], length=6)]),
        "decoder_target_tokens": jnp.array([row(a["tgt"], b["tgt"], length=6)]),
        "encoder_segment_ids": jnp.array([seg(a["enc"], b["enc"], length=9)]),
        "decoder_segment_ids": jnp.array([seg(a["tgt"], b["tgt"], length=6)]),
    }
    params = init_params(model, packed)
    packed_logits = _logits(model, params, packed)
    for ex, start in ((a, 0), (b, 3)):
        single = {
            "encoder_input_tokens": jnp.array([ex["enc"]]),
            "decoder_input_tokens": jnp.array([ex["dec_in"]]),
            "decoder_target_tokens": jnp.array([ex["tgt"]]),
        }
        n = len(ex["tgt"])
        np.testing.assert_allclose(
            packed_logits[0, start : start + n], _logits(model, params, single)[0], atol=1e-5
        )


def test_loss_metrics_per_layer_and_averaged():
    config = tiny_config(num_sparse=2, num_encoder_layers=2, num_decoder_layers=2)
    model = encdec_model(config, aux_loss_factor=0.1, router_z_loss_factor=0.01)
    batch = encdec_batch()
    params = init_params(model, batch)
    loss, metrics = jit_loss(model)(params, batch)
    layers = [f"{stack}/layers_{i}/mlp" for stack in ("encoder", "decoder/stack") for i in (0, 1)]
    per_layer = [metrics[f"experts/auxiliary_loss/{path}"] for path in layers]
    np.testing.assert_allclose(metrics["experts/auxiliary_loss"], np.mean(per_layer), rtol=1e-6)
    np.testing.assert_allclose(metrics["aux_loss"], 0.1 * np.mean(per_layer), rtol=1e-6)
    assert metrics["experts/expert_load"].shape == (4,)
    np.testing.assert_allclose(
        loss, metrics["cross_ent_loss"] + metrics["z_loss"] + metrics["aux_loss"]
        + metrics["router_z_loss"], rtol=1e-6,
    )
    assert metrics["num_tokens"] == float(np.sum(batch["decoder_loss_weights"]))
    # score = -(sum of per-token cross-entropy) without z-loss or smoothing.
    scores = model.score_batch(params, batch)
    plain = encdec_model(config, z_loss=0.0)
    _, plain_metrics = jit_loss(plain)(params, batch)
    np.testing.assert_allclose(
        -jnp.sum(scores) / metrics["num_tokens"], plain_metrics["cross_ent_loss"], rtol=1e-5
    )


def test_cross_entropy_with_label_smoothing_and_z_loss_formula():
    from moe.models.losses import cross_entropy_with_logits

    logits = jax.random.normal(jax.random.key(0), (3, 7))
    targets = jnp.array([0, 3, 6])
    loss, z = cross_entropy_with_logits(logits, targets, label_smoothing=0.1, z_loss=1e-2)
    log_p = jax.nn.log_softmax(logits)
    soft = jax.nn.one_hot(targets, 7) * 0.9 + (1 - jax.nn.one_hot(targets, 7)) * 0.1 / 6
    entropy = -jnp.sum(soft * jnp.log(soft), -1)
    log_z = jax.nn.logsumexp(logits, -1)
    np.testing.assert_allclose(z, 1e-2 * log_z**2, rtol=1e-6)
    np.testing.assert_allclose(loss, -jnp.sum(soft * log_p, -1) - entropy + z, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    model = encdec_model()
    batch = encdec_batch()
    params = init_params(model, batch)
    too_long = {**batch, "encoder_input_tokens": jnp.ones((3, 40), jnp.int32)}
    with pytest.raises(ValueError, match="longer than the configured max_length 32"):
        model.loss_fn(params, too_long, None)
    mismatched = {**batch, "decoder_target_tokens": batch["decoder_target_tokens"][:, :4]}
    with pytest.raises(ValueError, match="decoder_target_tokens has shape"):
        model.loss_fn(params, mismatched, None)
    floats = {**batch, "encoder_input_tokens": batch["encoder_input_tokens"].astype(jnp.float32)}
    with pytest.raises(ValueError, match="integer token ids"):
        model.loss_fn(params, floats, None)
    with pytest.raises(ValueError, match="lacks"):
        model.loss_fn(params, {"decoder_target_tokens": batch["decoder_target_tokens"]}, None)
    with pytest.raises(ValueError, match="not divisible by num_expert_partitions=3"):
        tiny_config(decoder_sparse=SparseConfig(num_sparse_layers=1, num_expert_partitions=3))
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        TransformerConfig(vocab_size=8, d_model=8, num_heads=0, d_ff=8, num_decoder_layers=1)


@pytest.mark.slow
def test_remat_gives_the_same_loss_and_gradients():
    batch = encdec_batch()
    plain = encdec_model()
    remat = encdec_model(tiny_config(remat=True))
    params = init_params(plain, batch)
    grad = lambda m: jax.jit(jax.value_and_grad(lambda p: m.loss_fn(p, batch, None)[0]))
    (loss, grads), (remat_loss, remat_grads) = grad(plain)(params), grad(remat)(params)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), remat_grads,
                 grads)


def _unscan(tree):
    """Scanned parameters ([blocks, ...] under scanned_blocks/layers_j) -> per-layer ones."""
    out = {}
    for key, value in tree.items():
        if key == "scanned_blocks":
            period = len(value)
            num_blocks = jax.tree.leaves(value)[0].shape[0]
            for b in range(num_blocks):
                for j in range(period):
                    out[f"layers_{b * period + j}"] = jax.tree.map(
                        lambda x, b=b: x[b], value[f"layers_{j}"]
                    )
        elif isinstance(value, dict):
            out[key] = _unscan(value)
        else:
            out[key] = value
    return out


def test_scanned_layers_equal_unrolled_layers():
    sizes = dict(num_encoder_layers=4, num_decoder_layers=4, num_sparse=2)  # MoE every other
    plain = encdec_model(tiny_config(**sizes))
    scanned = encdec_model(tiny_config(scan_layers=True, remat=True, **sizes))
    batch = encdec_batch()
    scanned_params = init_params(scanned, batch)
    assert jax.tree.leaves(scanned_params["encoder"]["scanned_blocks"])[0].shape[0] == 2
    params = _unscan(scanned_params)
    loss, metrics = jit_loss(scanned)(scanned_params, batch)
    plain_loss, plain_metrics = jit_loss(plain)(params, batch)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
    assert "experts/auxiliary_loss/encoder/scanned_blocks_1/layers_1/mlp" in metrics
    np.testing.assert_allclose(
        metrics["experts/auxiliary_loss"], plain_metrics["experts/auxiliary_loss"], rtol=1e-6
    )
    np.testing.assert_array_equal(
        scanned.predict_batch(scanned_params, batch, decode_method="beam", beam_size=2),
        plain.predict_batch(params, batch, decode_method="beam", beam_size=2),
    )
    # The scanned axis is the logical 'layers' axis: experts stay expert-sharded.
    shapes = {k: v.shape for k, v in batch.items()}
    boxed = jax.eval_shape(lambda: scanned.get_initial_variables(jax.random.key(0), shapes))
    shardings = Partitioner(num_expert_partitions=4).get_shardings(boxed["params"])
    expert = shardings["encoder"]["scanned_blocks"]["layers_1"]["mlp"]["expert"]["wi_0"]
    assert expert.spec == P(None, "expert", None, "model")


def test_scanned_sparse_stack_runs_in_bfloat16_like_the_unrolled_one():
    """A sparse layer's output is float32 (its combine is), so the unrolled stack's residual
    becomes float32 after it; the scanned stack's carry starts in float32 to match (a scan
    carry cannot change dtype). Both give the same loss up to bfloat16 rounding."""
    sizes = dict(num_encoder_layers=2, num_decoder_layers=2, num_sparse=1, dtype="bfloat16")
    plain = encdec_model(tiny_config(**sizes))
    scanned = encdec_model(tiny_config(scan_layers=True, **sizes))
    batch = encdec_batch()
    scanned_params = init_params(scanned, batch)
    loss, _ = jit_loss(scanned)(scanned_params, batch)
    plain_loss, _ = jit_loss(plain)(_unscan(scanned_params), batch)
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, plain_loss, rtol=2e-2)
