"""Hugging Face import and export against checkpoints and eval-mode logits written by
transformers 5.24 (PyTorch): logits and router parity, exact round trips, sharded files,
refusals."""

import dataclasses
import json
import shutil

import flax
import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from moe.checkpoint_sources import flatten_params
from moe.interop import hf
from moe.interop.model_gin import build_model
from moe.routing import ExpertChoice, TokenChoice
from moe.routing.shell import Router
from tests.interop.fixtures import HF_SWITCH_TINY, HF_T5_V1_1_TINY, require

# config.json fields that decide the architecture, the sizes and the output logits.
SHARED_KEYS = (
    "architectures", "model_type", "vocab_size", "d_model", "d_kv", "d_ff", "num_heads",
    "num_layers", "num_decoder_layers", "relative_attention_num_buckets",
    "relative_attention_max_distance", "layer_norm_epsilon", "tie_word_embeddings",
    "dense_act_fn", "decoder_start_token_id", "pad_token_id", "eos_token_id",
)
SWITCH_KEYS = (
    "num_experts", "num_sparse_encoder_layers", "num_sparse_decoder_layers",
    "encoder_sparse_step", "decoder_sparse_step", "router_bias", "router_dtype",
)
T5_KEYS = ("feed_forward_proj", "is_gated_act", "scale_decoder_outputs")


def _nest(flat):
    """A nested params dict from `{'a/b': leaf}`."""
    return traverse_util.unflatten_dict(flat, sep="/")


def _hf_tensors(model_dir):
    with safe_open(str(model_dir / hf.WEIGHTS_FILE), framework="numpy") as f:
        names = f.keys()
        return {k: f.get_tensor(k) for k in names}


@dataclasses.dataclass
class Imported:
    model_dir: object
    model: object
    params: dict
    reference: dict
    logits: np.ndarray
    router_probs: dict  # 'encoder/layers_1' -> [B, L, E]


def _router_probs(intermediates, batch_shapes):
    """Each router's probabilities as [B, L, E] (its groups are contiguous slices of the
    flattened [B*L] tokens)."""
    out = {}
    for path, leaf in flatten_params(intermediates).items():
        if path.endswith("/probs"):
            side = "encoder" if path.startswith("encoder/") else "decoder"
            b, length = batch_shapes[side]
            probs = np.asarray(leaf)
            probs = probs.reshape(-1, probs.shape[-1])[: b * length]
            layer = path.split("/mlp/")[0].replace("decoder/stack/", "decoder/")
            out[layer] = probs.reshape(b, length, -1)
    return out


@pytest.fixture(scope="module", params=["switch", "t5_v1_1"])
def imported(request):
    model_dir = require(HF_SWITCH_TINY if request.param == "switch" else HF_T5_V1_1_TINY)
    gin = hf.hf_model_gin(hf.read_hf_config(model_dir), str(model_dir))
    # The fixtures' Switch expert_capacity is above their token count: the converted gin's
    # capacity floor (MIN_EXPERT_CAPACITY = expert_capacity) evaluates without drops, as HF.
    model = build_model(gin.render())
    params = hf.read_hf_params(model_dir, model.module.config)
    ref = dict(np.load(model_dir / "reference.npz"))

    def forward(params, batch):
        logits, state = model.module.apply(
            {"params": params}, **batch, deterministic=True, mutable=["moe", "intermediates"],
            capture_intermediates=lambda mdl, _: isinstance(mdl, Router))
        return logits, state.get("intermediates", {})

    batch = {k: ref[k] for k in ("encoder_input_tokens", "decoder_input_tokens",
                                 "decoder_target_tokens")}
    logits, intermediates = jax.jit(forward)(_nest(params), batch)
    shapes = {"encoder": ref["encoder_input_tokens"].shape,
              "decoder": ref["decoder_input_tokens"].shape}
    return Imported(model_dir, model, params, ref, np.asarray(logits),
                    _router_probs(intermediates, shapes))


def test_params_fit_the_model_built_from_the_gin(imported):
    shapes = {"encoder_input_tokens": (2, 8), "decoder_input_tokens": (2, 4),
              "decoder_target_tokens": (2, 4)}
    abstract = jax.eval_shape(
        lambda: imported.model.get_initial_variables(jax.random.key(0), shapes))
    expected = flatten_params(flax.linen.meta.unbox(abstract)["params"])
    assert {k: v.shape for k, v in expected.items()} == {
        k: v.shape for k, v in imported.params.items()}
    assert all(v.dtype == np.float32 for v in imported.params.values())


def test_logits_match_transformers(imported):
    ref = imported.reference
    real = ref["decoder_loss_weights"] > 0
    assert np.abs(imported.logits - ref["logits"])[real].max() < 1e-4
    log_probs = jax.nn.log_softmax(imported.logits, axis=-1)
    targets = ref["decoder_target_tokens"][..., None]
    token_ll = np.take_along_axis(np.asarray(log_probs), targets, -1)[..., 0]
    sequence_ll = (token_ll * ref["decoder_loss_weights"]).sum(-1)
    np.testing.assert_allclose(sequence_ll, ref["sequence_log_likelihood"], atol=1e-3, rtol=0)


def test_router_choices_match_transformers(imported):
    if not imported.router_probs:
        pytest.skip("dense model: no routers")
    ref, config = imported.reference, imported.model.module.config
    real = {"encoder": ref["encoder_input_tokens"] > 0, "decoder": ref["decoder_loss_weights"] > 0}
    checked = set()
    for side, placement in (("encoder", config.encoder_layers_sparse()),
                            ("decoder", config.decoder_layers_sparse())):
        blocks = [i for i, sparse in enumerate(placement) if sparse]
        # The reference numbers HF's router outputs in order: the i-th sparse block.
        for i, block in enumerate(blocks):
            choice = imported.router_probs[f"{side}/layers_{block}"].argmax(-1)
            expected = ref[f"{side}_router_choice_{i}"]
            np.testing.assert_array_equal(choice[real[side]], expected[real[side]])
            checked.add(f"{side}_router_choice_{i}")
    assert checked == {k for k in ref if "_router_choice_" in k}


def test_export_round_trips_exactly(imported):
    hf_config, tensors = hf.hf_export(imported.model.module.config, imported.params)
    original = _hf_tensors(imported.model_dir)
    assert sorted(tensors) == sorted(original)
    for name, value in original.items():
        assert tensors[name].shape == value.shape and tensors[name].dtype == value.dtype, name
        assert np.array_equal(tensors[name], value), name
    source = hf.read_hf_config(imported.model_dir)
    keys = SHARED_KEYS + (SWITCH_KEYS if "switch" in source["model_type"] else T5_KEYS)
    assert {k: hf_config.get(k) for k in keys} == {k: source.get(k) for k in keys}


def test_write_hf_model_reads_back(imported, tmp_path):
    hf_config, tensors = hf.hf_export(imported.model.module.config, imported.params)
    out = tmp_path / "exported"
    hf.write_hf_model(out, hf_config, tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no staging left
    assert hf.read_hf_config(out) == hf_config
    generation = json.loads((out / hf.GENERATION_CONFIG_FILE).read_text())
    assert (generation["decoder_start_token_id"], generation["eos_token_id"],
            generation["pad_token_id"]) == (0, 1, 0)
    with safe_open(str(out / hf.WEIGHTS_FILE), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
    again = hf.read_hf_params(out, imported.model.module.config)
    assert all(np.array_equal(again[k], v) for k, v in imported.params.items())
    with pytest.raises(hf.HfConversionError, match="not an empty directory"):
        hf.write_hf_model(out, hf_config, tensors)


def test_sharded_checkpoint_imports_the_same_params(imported, tmp_path):
    tensors = _hf_tensors(imported.model_dir)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    (tmp_path / hf.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(imported.model_dir / hf.CONFIG_FILE, tmp_path / hf.CONFIG_FILE)
    sharded = hf.read_hf_params(tmp_path, imported.model.module.config)
    assert sorted(sharded) == sorted(imported.params)
    assert all(np.array_equal(sharded[k], v) for k, v in imported.params.items())


def _copy_fixture(source, target, edit_config=None, edit_tensors=None):
    target.mkdir()
    config = hf.read_hf_config(source)
    tensors = _hf_tensors(source)
    if edit_config:
        edit_config(config)
    if edit_tensors:
        edit_tensors(tensors)
    (target / hf.CONFIG_FILE).write_text(json.dumps(config))
    save_file(tensors, str(target / hf.WEIGHTS_FILE), metadata={"format": "pt"})
    return target


def _import_untied(source, tmp_path, untie, lm_head):
    """A fixture copy with untied output logits (`lm_head`), imported and exported again:
    (model_dir, config, params, hf_config, tensors)."""
    model_dir = _copy_fixture(source, tmp_path / "untied", untie,
                              lambda t: t.update({"lm_head.weight": lm_head}))
    gin = hf.hf_model_gin(hf.read_hf_config(model_dir), str(model_dir)).render()
    assert "TransformerConfig.logits_via_embedding = False" in gin
    config = build_model(gin).module.config
    params = hf.read_hf_params(model_dir, config)
    return (model_dir, config, params, *hf.hf_export(config, params))


def test_untied_t5_checkpoint_keeps_its_lm_head(tmp_path):
    # The hub's T5 v1.1 layout: tie_word_embeddings false, a separate lm_head.weight.
    source = require(HF_T5_V1_1_TINY)
    lm_head = np.random.default_rng(0).normal(size=(384, 64)).astype(np.float32)

    def untie(config):
        config["tie_word_embeddings"] = False
        del config["scale_decoder_outputs"]

    model_dir, config, params, hf_config, tensors = _import_untied(source, tmp_path, untie,
                                                                   lm_head)
    np.testing.assert_array_equal(params["logits_dense/kernel"], lm_head.T)
    np.testing.assert_array_equal(tensors["lm_head.weight"], lm_head)
    assert (hf_config["tie_word_embeddings"], hf_config["scale_decoder_outputs"]) == (False, False)
    # The same file read into a tied model is refused rather than silently dropping lm_head.
    tied = dataclasses.replace(config, logits_via_embedding=True, scale_tied_logits=False)
    with pytest.raises(hf.HfConversionError, match="logits_via_embedding = False"):
        hf.read_hf_params(model_dir, tied)


def test_original_relu_t5_imports_and_round_trips(tmp_path):
    """Original T5: relu MLP (`DenseReluDense.wi`, `.wo`), tied and scaled logits."""
    source = require(HF_T5_V1_1_TINY)

    def relu(config):
        config.update(feed_forward_proj="relu", dense_act_fn="relu", is_gated_act=False,
                      scale_decoder_outputs=True)

    def one_input_projection(tensors):
        for key in [k for k in tensors if k.endswith("DenseReluDense.wi_0.weight")]:
            tensors[key.replace("wi_0", "wi")] = tensors.pop(key)
            del tensors[key.replace("wi_0", "wi_1")]

    model_dir = _copy_fixture(source, tmp_path / "relu", relu, one_input_projection)
    gin = hf.hf_model_gin(hf.read_hf_config(model_dir), str(model_dir)).render()
    assert "TransformerConfig.activation = 'relu'" in gin
    assert "TransformerConfig.scale_tied_logits = True" in gin
    model = build_model(gin)
    params = hf.read_hf_params(model_dir, model.module.config)
    assert "encoder/layers_0/mlp/wi" in params and "encoder/layers_0/mlp/wi_0" not in params
    hf_config, tensors = hf.hf_export(model.module.config, params)
    original = _hf_tensors(model_dir)
    assert sorted(tensors) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(tensors[key], value)
    assert (hf_config["feed_forward_proj"], hf_config["scale_decoder_outputs"]) == ("relu", True)
    # Our forward pass: relu MLPs and the d_model**-0.5 scale before the tied embedding.
    ref = np.load(source / "reference.npz")
    batch = {k: ref[k] for k in ("encoder_input_tokens", "decoder_input_tokens",
                                 "decoder_target_tokens")}
    logits = np.asarray(jax.jit(lambda p: model.compute_logits(p, batch)[0])(_nest(params)))
    unscaled = build_model(gin.replace("TransformerConfig.scale_tied_logits = True",
                                       "TransformerConfig.scale_tied_logits = False"))
    raw = np.asarray(jax.jit(lambda p: unscaled.compute_logits(p, batch)[0])(_nest(params)))
    np.testing.assert_allclose(logits, raw / np.sqrt(64.0), rtol=1e-5, atol=1e-5)


def _untie_switch(config):
    config["tie_word_embeddings"] = False


def test_untied_switch_exports_each_stacks_embedding(tmp_path):
    # transformers 5 ties nothing when tie_word_embeddings is false: a file without the
    # stacks' embed_tokens (as transformers 4 wrote them) means shared.weight, and an export
    # writes them, or transformers 5 would initialize them randomly.
    source = require(HF_SWITCH_TINY)
    lm_head = np.random.default_rng(1).normal(size=(384, 64)).astype(np.float32)
    _, _, _, hf_config, tensors = _import_untied(source, tmp_path, _untie_switch, lm_head)
    assert hf_config["tie_word_embeddings"] is False
    np.testing.assert_array_equal(tensors["lm_head.weight"], lm_head)
    for side in ("encoder", "decoder"):
        np.testing.assert_array_equal(tensors[f"{side}.embed_tokens.weight"],
                                      tensors["shared.weight"])


def test_separate_encoder_and_decoder_embeddings_round_trip(tmp_path):
    # What transformers 5 saves for an untied Switch model: encoder.embed_tokens,
    # decoder.embed_tokens and lm_head are different matrices, and each stack reads its own.
    rng = np.random.default_rng(2)
    separate_values = {}

    def separate(tensors):
        for key in ("lm_head.weight", "encoder.embed_tokens.weight",
                    "decoder.embed_tokens.weight"):
            separate_values[key] = tensors[key] = rng.normal(size=(384, 64)).astype(np.float32)

    model_dir = _copy_fixture(require(HF_SWITCH_TINY), tmp_path / "separate", _untie_switch,
                              separate)
    gin = hf.hf_model_gin(hf.read_hf_config(model_dir), str(model_dir)).render()
    assert "TransformerConfig.shared_embedding = False" in gin
    model = build_model(gin)
    params = hf.read_hf_params(model_dir, model.module.config)
    for side in ("encoder", "decoder"):
        np.testing.assert_array_equal(params[f"{side}_token_embedder/embedding"],
                                      separate_values[f"{side}.embed_tokens.weight"])
    # The decoder reads its own embedding: changing the encoder's leaves the decoder's input
    # embedding path untouched but changes the encoded inputs; both are used.
    ref = np.load(require(HF_SWITCH_TINY) / "reference.npz")
    batch = {k: ref[k] for k in ("encoder_input_tokens", "decoder_input_tokens",
                                 "decoder_target_tokens")}
    apply = jax.jit(lambda p: model.compute_logits(p, batch)[0])
    base = np.asarray(apply(_nest(params)))
    for side in ("encoder", "decoder"):
        changed = dict(params)
        name = f"{side}_token_embedder/embedding"
        changed[name] = params[name] * 2
        assert np.abs(np.asarray(apply(_nest(changed))) - base).max() > 1e-3
    hf_config, tensors = hf.hf_export(model.module.config, params)
    assert hf_config["tie_word_embeddings"] is False
    for key, value in separate_values.items():
        np.testing.assert_array_equal(tensors[key], value)
    # Our model gin refuses the file when it assumes one shared embedding.
    shared = build_model(gin.replace("TransformerConfig.shared_embedding = False", ""))
    with pytest.raises(hf.HfConversionError, match="different input embeddings"):
        hf.read_hf_params(model_dir, shared.module.config)


def test_bfloat16_checkpoint_reads_as_float32(tmp_path):
    import ml_dtypes

    source = require(HF_T5_V1_1_TINY)
    model_dir = _copy_fixture(source, tmp_path / "bf16", edit_tensors=lambda t: t.update(
        {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}))
    config = build_model(hf.hf_model_gin(hf.read_hf_config(source), str(source)).render())
    params = hf.read_hf_params(model_dir, config.module.config)
    expected = _hf_tensors(source)["shared.weight"].astype(ml_dtypes.bfloat16)
    assert params["token_embedder/embedding"].dtype == np.float32
    np.testing.assert_array_equal(params["token_embedder/embedding"], expected.astype(np.float32))


@pytest.mark.parametrize("edit, message", [
    ({"architectures": ["BartForConditionalGeneration"]}, "'BartForConditionalGeneration' is not"),
    ({"layer_norm_epsilon": 1e-5}, "layer_norm_epsilon"),
    ({"router_bias": True}, "router_bias"),
    ({"dense_act_fn": "gelu"}, "activation 'gelu'"),
    ({"num_layers": 6, "encoder_sparse_step": 4}, "sparse step"),  # blocks 1, 5
])
def test_import_refuses_what_we_cannot_reproduce(edit, message):
    config = {**hf.read_hf_config(require(HF_SWITCH_TINY)), **edit}
    with pytest.raises(hf.HfConversionError, match=message):
        hf.hf_model_gin(config, "hub-name")


def test_import_refuses_an_unsupported_architecture_directory(tmp_path):
    model_dir = _copy_fixture(require(HF_T5_V1_1_TINY), tmp_path / "bart",
                              lambda c: c.update(architectures=["BartForConditionalGeneration"]))
    with pytest.raises(hf.HfConversionError, match="supported: Switch"):
        hf.hf_model_gin(hf.read_hf_config(model_dir), str(model_dir))


def _switch_config():
    gin = hf.hf_model_gin(hf.read_hf_config(require(HF_SWITCH_TINY)), "hub-name")
    return build_model(gin.render()).module.config


def _both_stacks(config, **changes):
    return dataclasses.replace(
        config,
        encoder_sparse=dataclasses.replace(config.encoder_sparse, **changes),
        decoder_sparse=dataclasses.replace(config.decoder_sparse, **changes))


@pytest.mark.parametrize("change, message", [
    (lambda c: _both_stacks(c, router=TokenChoice(num_selected_experts=2)), "top-1"),
    (lambda c: _both_stacks(c, router=ExpertChoice()), "top-1"),
    (lambda c: _both_stacks(c, layout="BOTTOM"), "HF_SWITCH"),
    (lambda c: _both_stacks(c, extra_dense_mlp=True), "extra dense MLP"),
    (lambda c: dataclasses.replace(c, activation="gated-gelu"), "not gated"),
    (lambda c: dataclasses.replace(c, scan_layers=True), "scan"),
    (lambda c: dataclasses.replace(c, scale_tied_logits=False), "scale"),
    (lambda c: dataclasses.replace(
        c, num_encoder_layers=0,
        encoder_sparse=dataclasses.replace(c.encoder_sparse, num_sparse_layers=0)),
     "decoder-only"),
])
def test_export_refuses_what_hf_cannot_express(change, message):
    with pytest.raises(hf.HfConversionError, match=message):
        hf.hf_export(change(_switch_config()), {})


def test_transformers_loads_the_export(imported, tmp_path):
    """Optional (torch and transformers are not dependencies): transformers' own forward pass
    on the exported directory gives our logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config, tensors = hf.hf_export(imported.model.module.config, imported.params)
    hf.write_hf_model(tmp_path / "exported", hf_config, tensors)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "exported").eval()
    ref = imported.reference
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor(ref["encoder_input_tokens"], dtype=torch.long),
            attention_mask=torch.tensor(ref["encoder_input_tokens"] > 0, dtype=torch.long),
            decoder_input_ids=torch.tensor(ref["decoder_input_tokens"], dtype=torch.long),
            decoder_attention_mask=torch.tensor(ref["decoder_loss_weights"], dtype=torch.long),
        ).logits.numpy()
    real = ref["decoder_loss_weights"] > 0
    assert np.abs(logits - imported.logits)[real].max() < 1e-4
