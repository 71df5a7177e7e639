"""A real T5X/flaxformer checkpoint (written by t5x's train.py, both formats) gives the logits
flaxformer computed from it: through `python -m moe.logits` with the T5X model's own gin, in
float32 and bit for bit in bfloat16; its MoE layers route the same tokens (the sown routing
metrics agree). Plus the translation of T5X gins and the errors a user can make."""


import pathlib

import gin
import numpy as np
import pytest

from moe import logits as moe_logits
from moe.interop import t5x_checkpoint, t5x_gin
from tests.interop.fixtures import T5X_TINY, require

FORMATS = {"orbax": "checkpoint_30", "legacy": "legacy/checkpoint_30"}


def _logits(tmp_path, capsys, checkpoint, *extra, gin_file=None):
    fixture = require(T5X_TINY)
    out = tmp_path / "out.npz"
    gin_file = gin_file or str(fixture / "gin" / "model.gin")
    gin.clear_config()
    code = moe_logits.main([
        f"--gin_file={gin_file}", f"--gin.CHECKPOINT_PATH='{checkpoint}'",
        f"--features={fixture / 'logits.npz'}", f"--output={out}", *extra,
    ])
    err = capsys.readouterr().err
    return code, err, (np.load(out) if code == 0 else None)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_float32_logits_match_flaxformer(fmt, tmp_path, capsys):
    fixture = require(T5X_TINY)
    code, err, out = _logits(tmp_path, capsys, fixture / FORMATS[fmt], "--float32")
    assert code == 0, err
    ref = np.load(fixture / "logits.npz")
    targets = ref["decoder_loss_weights"] > 0
    assert np.abs(out["logits"] - ref["logits_fp32act"])[targets].max() < 1e-4
    # flaxformer zeroes the logits of masked decoder positions; so do its logit masks here.
    np.testing.assert_allclose(out["logits"], ref["logits_fp32act"], atol=1e-4)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_bfloat16_logits_and_log_likelihoods_match_flaxformer(fmt, tmp_path, capsys):
    fixture = require(T5X_TINY)
    code, err, out = _logits(tmp_path, capsys, fixture / FORMATS[fmt])
    assert code == 0, err
    ref = np.load(fixture / "logits.npz")
    targets = ref["decoder_loss_weights"] > 0
    # The gin's own dtypes (bf16 activations and experts): the required 5e-2, and in fact
    # the same bits, since every flaxformer rounding step is reproduced.
    assert np.abs(out["logits"] - ref["logits"])[targets].max() < 5e-2
    np.testing.assert_array_equal(out["logits"], ref["logits"])
    np.testing.assert_allclose(out["sequence_log_likelihood"], ref["sequence_log_likelihood"],
                               atol=1e-3)
    assert out["encoder_router_choice_0"].shape == ref["encoder_input_tokens"].shape
    assert out["decoder_router_choice_0"].shape == ref["decoder_target_tokens"].shape


def test_moe_layers_route_as_flaxformer_did():
    """The metrics flaxformer sowed in this eval call: the same tokens were dropped and the
    same slots filled (padding routed, its grouping and capacity formula)."""
    import jax

    from moe import checkpoints
    from moe.interop.model_gin import build_model

    fixture = require(T5X_TINY)
    ref = np.load(fixture / "logits.npz")
    model = build_model(t5x_gin.translate_gin_file(str(fixture / "gin" / "model.gin")))
    batch = {k: ref[k] for k in ("encoder_input_tokens", "decoder_input_tokens",
                                 "decoder_target_tokens")}
    abstract = jax.eval_shape(
        lambda: model.get_initial_variables(jax.random.key(0), {k: v.shape for k, v in
                                                                batch.items()}))
    import flax.linen as nn

    init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nn.meta.unbox(abstract["params"]))
    params, _ = checkpoints.restore_params_from(str(fixture / "checkpoint_30"), init)
    _, state = jax.jit(lambda p, b: model.module.apply(
        {"params": p}, **b, deterministic=True, mutable=["moe"]))(params, batch)
    layers = {"encoder": state["moe"]["encoder"]["layers_1"]["mlp"],
              "decoder": state["moe"]["decoder"]["stack"]["layers_1"]["mlp"]}
    for side, layer in layers.items():
        ours = layer["diagnostics"][0]
        theirs = lambda name, side=side: float(
            ref[f"intermediates/{side}/layers_1/mlp/{name}"].item())
        # Counts of dispatched tokens and filled slots: exact.
        assert float(ours["fraction_tokens_left_behind"]) == theirs("fraction_tokens_left_behind")
        assert float(ours["expert_usage"]) == theirs("expert_usage")
        # Losses from the router probabilities (flaxformer's run was in bfloat16 activations).
        for name in ("auxiliary_loss", "router_z_loss"):
            assert float(ours[name]) == pytest.approx(theirs(name), rel=1e-5)
        # (router_confidence is defined differently: ours averages per token, flaxformer's
        # per dispatched (token, expert) pair.)


def test_t5x_gin_translates_macro_for_macro():
    fixture = require(T5X_TINY)
    config = t5x_gin.T5xGin.read(str(fixture / "gin" / "model.gin"))
    gin_model = t5x_gin.to_model_gin(config, "fixture")
    macros = gin_model.macros
    assert {k: macros[k] for k in ("NUM_ENCODER_LAYERS", "NUM_HEADS", "HEAD_DIM", "EMBED_DIM",
                                   "MLP_DIM", "NUM_EMBEDDINGS", "NUM_EXPERTS",
                                   "NUM_SELECTED_EXPERTS", "NUM_ENCODER_SPARSE_LAYERS")} == {
        "NUM_ENCODER_LAYERS": 2, "NUM_HEADS": 6, "HEAD_DIM": 64, "EMBED_DIM": 32, "MLP_DIM": 64,
        "NUM_EMBEDDINGS": 384, "NUM_EXPERTS": 8, "NUM_SELECTED_EXPERTS": 2,
        "NUM_ENCODER_SPARSE_LAYERS": 1}
    assert macros["TRAIN_EXPERT_CAPACITY_FACTOR"] == 1.25
    assert macros["EVAL_EXPERT_CAPACITY_FACTOR"] == 2.0
    assert macros["ENCODER_BATCH_PRIORITIZED_ROUTING"] is True
    assert macros["ACTIVATION_DTYPE"] == "bfloat16"
    assert gin_model.bindings["TransformerConfig.activation"] == "gated-gelu"
    assert gin_model.bindings["TransformerConfig.logits_via_embedding"] is False
    assert t5x_gin.is_t5x_gin(str(fixture / "gin" / "model.gin"))
    ours = pathlib.Path(__file__).resolve().parents[2] / "gin_configs" / "models"
    assert not t5x_gin.is_t5x_gin(str(ours / "tokens_choose_tiny.gin"))


def test_both_formats_hold_the_same_train_state():
    fixture = require(T5X_TINY)
    orbax = t5x_checkpoint.T5xCheckpoint.open(
        t5x_checkpoint.find_step_dir(fixture / "checkpoint_30"))
    legacy = t5x_checkpoint.T5xCheckpoint.open(
        t5x_checkpoint.find_step_dir(fixture / "legacy" / "checkpoint_30"))
    assert (orbax.format, legacy.format) == ("orbax", "legacy")
    assert orbax.step == legacy.step == 30
    assert orbax.params.keys() == legacy.params.keys() and len(orbax.params) == 54
    names = sorted(orbax.params)
    a, b = orbax.read(names), legacy.read(names)
    for name in names:
        np.testing.assert_array_equal(a[name], b[name])
    stats = ["encoder/layers_1/mlp/expert/wi_0/kernel/v_row"]
    np.testing.assert_array_equal(orbax.read(stats, "param_states")[stats[0]],
                                  legacy.read(stats, "param_states")[stats[0]])
    # The T5X model directory (parent of checkpoint_N) resolves to its latest step.
    assert t5x_checkpoint.find_step_dir(fixture) == fixture / "checkpoint_30"


def test_legacy_arrays_are_read_where_the_checkpoint_now_lives():
    """A legacy msgpack stores array paths relative to its step directory; on GCS they must
    become gcs kvstores of that bucket."""
    from etils import epath

    local = t5x_checkpoint._kvstore_for("target.a.kernel/", epath.Path("/ckpt/checkpoint_5"))
    assert local == {"driver": "file", "path": "/ckpt/checkpoint_5/target.a.kernel/"}
    remote = t5x_checkpoint._kvstore_for(
        "target.a.kernel/", epath.Path("gs://bucket/models/run/checkpoint_5"))
    assert remote == {"driver": "gcs", "bucket": "bucket",
                      "path": "models/run/checkpoint_5/target.a.kernel/"}


def test_a_model_gin_that_does_not_fit_names_parameter_and_shapes(tmp_path, capsys):
    fixture = require(T5X_TINY)
    # Our tokens_choose_tiny has head_dim 8: the attention kernels do not fit.
    code, err, _ = _logits(tmp_path, capsys, fixture / "checkpoint_30",
                           gin_file="models/tokens_choose_tiny.gin")
    assert code == 2
    assert ("decoder/stack/layers_0/self_attention/query: the model's shape is (32, 6, 8), the "
            "checkpoint's decoder/layers_0/self_attention/query/kernel has (32, 384)") in err
    assert "more" in err and "EMBED_DIM" in err
    # Same sizes, fewer layers: the checkpoint's extra layers are named, not dropped silently.
    code, err, _ = _logits(tmp_path, capsys, fixture / "legacy" / "checkpoint_30",
                           "--gin.NUM_ENCODER_LAYERS=1")
    assert code == 2 and "no model parameter takes" in err and "encoder/layers_1/" in err


def test_a_directory_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    require(T5X_TINY)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err, _ = _logits(tmp_path, capsys, empty)
    assert code == 2 and "No checkpoint found" in err and "checkpoint_<N>" in err


def test_a_gin_whose_shapes_fit_but_whose_network_differs_is_refused(tmp_path, capsys):
    """12 heads of 32 have the kernels of 6 heads of 64: only the checkpoint's config.gin can
    tell. A T5X model directory carries one; the mismatch is named."""
    import shutil

    fixture = require(T5X_TINY)
    model_dir = tmp_path / "t5x_model"
    shutil.copytree(fixture / "legacy" / "checkpoint_30", model_dir / "checkpoint_30")
    (model_dir / "config.gin").write_text(f"include '{fixture / 'gin' / 'model.gin'}'\n")
    code, err, _ = _logits(tmp_path, capsys, model_dir, "--gin.NUM_HEADS=12", "--gin.HEAD_DIM=32",
                           gin_file="models/tokens_choose_tiny.gin")
    assert code == 2
    assert "NUM_HEADS is 12 here, 6 there" in err and "HEAD_DIM is 32 here, 64 there" in err
    assert f"--gin_file={model_dir / 'config.gin'}" in err
    # The checkpoint's own gin passes the check (and gives flaxformer's logits).
    code, err, out = _logits(tmp_path, capsys, model_dir, gin_file=str(model_dir / "config.gin"))
    assert code == 0, err
    np.testing.assert_array_equal(out["logits"], np.load(fixture / "logits.npz")["logits"])
