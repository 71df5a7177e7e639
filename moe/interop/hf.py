"""Hugging Face transformers checkpoints <-> ours, without torch: `SwitchTransformers` and `T5`
(v1.1 gated-gelu and the original relu T5) encoder-decoders for conditional generation.

A Hugging Face model directory is `config.json` + `model.safetensors` (or shards listed in
`model.safetensors.index.json`). Import: `hf_model_gin` writes our model gin for its
config.json, `read_hf_params` reads its tensors under our names. Export: `hf_export` gives the
config.json and the tensors for one of our models, `write_hf_model` writes the directory.

Names and layouts (D d_model, H heads, Dh head dim, F d_ff, E experts; HF `nn.Linear` weights
are [out, in], our kernels [in, out]):

    ours                                         Hugging Face
    token_embedder/embedding [V, D]              shared.weight [V, D]
    logits_dense/kernel [D, V] (untied)          lm_head.weight [V, D]
    encoder/relpos_bias/rel_embedding [H, B]     encoder.block.0.layer.0.SelfAttention
                                                   .relative_attention_bias.weight [B, H]
    .../self_attention/query [D, H, Dh]          ...layer.0.SelfAttention.q.weight [H*Dh, D]
    .../self_attention/out [H, Dh, D]            ...layer.0.SelfAttention.o.weight [D, H*Dh]
    .../mlp/wi, wi_0, wi_1 [D, F]; wo [F, D]     ...DenseReluDense.* (T5), ...mlp.* (Switch)
    .../mlp/router/router_weights/w [D, E]       ...mlp.router.classifier.weight [E, D]
    .../mlp/expert/wi [E, D, F]                  ...mlp.experts.expert_{e}.wi.weight [F, D]
    decoder/stack/...                            decoder.block.{i}.layer.{0: self, 1: cross,
                                                   2: MLP}

Embeddings and output logits, as transformers 5.24 loads them: T5 ties the stacks'
`embed_tokens` and `lm_head` to `shared` always, Switch iff `tie_word_embeddings`; a tied tensor
that the file also holds with other values keeps its own. Switch scales the decoder output by
D**-0.5 iff `tie_word_embeddings`; T5 iff `scale_decoder_outputs` (when absent: iff
`tie_word_embeddings` is not false). Untied Switch models of transformers 5 give each stack
its own input embedding (`encoder.embed_tokens`, `decoder.embed_tokens`): ours then has
`shared_embedding = False`. We never scale untied logits; checkpoints that do are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from moe.errors import ConfigurationError
from moe.interop.model_gin import Comment, ModelGin
from moe.models.config import TransformerConfig
from moe.models.sparse_layout import sparse_layers
from moe.routing import TokenChoice

SUPPORTED_ARCHITECTURES = (
    "SwitchTransformersForConditionalGeneration",
    "T5ForConditionalGeneration",
)
SWITCH, T5 = SUPPORTED_ARCHITECTURES
_MODEL_TYPES = {SWITCH: "switch_transformers", T5: "t5"}
TRANSFORMERS_VERSION = "5.24.0"  # the version whose config.json fields `hf_export` writes
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LAYER_NORM_EPSILON = 1e-6
# The tensors whose tying `_hf_embeddings` resolves, and a bias HF itself ignores on load.
_EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight",
                   "decoder.embed_tokens.weight", "lm_head.weight")
_IGNORED_ON_IMPORT = frozenset({
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
})
# HF activation names (`dense_act_fn`) -> ours. HF's plain "gelu" is the exact erf GELU, which
# we do not have; gelu_new, gelu_fast and gelu_pytorch_tanh are all the tanh approximation.
_ACTIVATIONS_FROM_HF = {
    "relu": "relu",
    "gelu_new": "gelu",
    "gelu_fast": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "silu": "silu",
    "swish": "silu",
}
_ACTIVATIONS_TO_HF = {"relu": "relu", "gelu": "gelu_new", "silu": "silu"}


class HfConversionError(ConfigurationError):
    """A Hugging Face model or one of ours that the other side cannot express exactly."""


# --- config.json -> what it means in our terms -----------------------------------------------


def read_hf_config(model_dir: str | os.PathLike) -> dict:
    """The model directory's config.json, as a dict."""
    path = pathlib.Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise HfConversionError(
            f"{path} does not exist; point at a Hugging Face model directory "
            "(the folder save_pretrained writes, with config.json and model.safetensors)."
        )
    return json.loads(path.read_text())


@dataclasses.dataclass(frozen=True)
class _HfModel:
    """The architecture an HF config.json describes, in our terms (validated)."""

    architecture: str
    encoder_layers: int
    decoder_layers: int
    encoder_sparse: tuple[bool, ...]
    decoder_sparse: tuple[bool, ...]
    activation: str  # ours: 'relu', 'gated-gelu', ...
    hf_activation: str  # HF's description: 'relu', 'gated gelu_new', ...


def _architecture(hf_config: Mapping[str, Any]) -> str:
    """The one supported architecture config.json names, or a clear refusal."""
    names = hf_config.get("architectures") or []
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if len(names) != 1 or names[0] not in SUPPORTED_ARCHITECTURES:
        raise HfConversionError(
            f"architecture {', '.join(map(repr, names)) or 'None'} is not supported; "
            f"supported: {supported} (config.json 'architectures' must name one of them)."
        )
    return names[0]


def _activation_from_hf(hf_config: Mapping[str, Any], architecture: str) -> tuple[str, str]:
    """(ours, HF's description) of the config's MLP activation. Follows HF's own reading: T5
    derives `dense_act_fn` / `is_gated_act` from `feed_forward_proj`, but saved values win."""
    if architecture == T5:
        proj = hf_config.get("feed_forward_proj", "relu")
        derived = "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1]
        name = hf_config.get("dense_act_fn", derived)
        gated = hf_config.get("is_gated_act", proj.startswith("gated-"))
    else:
        name, gated = hf_config.get("dense_act_fn", "relu"), False
    if name not in _ACTIVATIONS_FROM_HF:
        raise HfConversionError(
            f"activation {name!r} has no equivalent here (ours: relu, gelu = HF gelu_new, "
            f"silu, and their gated forms); supported HF names: {sorted(_ACTIVATIONS_FROM_HF)}."
        )
    ours = _ACTIVATIONS_FROM_HF[name]
    return (f"gated-{ours}", f"gated {name}") if gated else (ours, name)


def _hf_switch_placement(num_layers: int, step: int) -> tuple[bool, ...]:
    """HF SwitchTransformersStack: block i is sparse iff i % step == 1 (all when step is 1)."""
    return tuple(step > 0 and (step == 1 or i % step == 1) for i in range(num_layers))


def _switch_step(hf_config: Mapping[str, Any], num_layers: int, side: str) -> int:
    """HF's sparse step of one stack: a saved `{side}_sparse_step` wins over the one derived
    from the sparse layer count (as when transformers loads the config)."""
    count = hf_config.get(f"num_sparse_{side}_layers", 3)
    derived = num_layers // count if count > 0 else num_layers
    return int(hf_config.get(f"{side}_sparse_step", derived))


def _describe(hf_config: Mapping[str, Any]) -> _HfModel:
    """Validate config.json and say what it describes; refuse what we cannot reproduce."""
    architecture = _architecture(hf_config)
    epsilon = hf_config.get("layer_norm_epsilon", LAYER_NORM_EPSILON)
    if not math.isclose(epsilon, LAYER_NORM_EPSILON, rel_tol=1e-6):
        raise HfConversionError(
            f"layer_norm_epsilon={epsilon}: our RMS norm uses a fixed epsilon of 1e-6; only "
            "checkpoints trained with layer_norm_epsilon=1e-6 convert exactly."
        )
    encoder_layers = int(hf_config.get("num_layers", 6 if architecture == T5 else 12))
    decoder_layers = int(hf_config.get("num_decoder_layers") or encoder_layers)
    encoder_sparse = (False,) * encoder_layers
    decoder_sparse = (False,) * decoder_layers
    if architecture == SWITCH:
        if hf_config.get("router_bias", False):
            raise HfConversionError(
                "router_bias=true: our routers have no bias; only checkpoints with "
                "router_bias=false (every published Switch Transformer) convert."
            )
        encoder_sparse = _hf_switch_placement(
            encoder_layers, _switch_step(hf_config, encoder_layers, "encoder"))
        decoder_sparse = _hf_switch_placement(
            decoder_layers, _switch_step(hf_config, decoder_layers, "decoder"))
        for side, placement in (("encoder", encoder_sparse), ("decoder", decoder_sparse)):
            if sparse_layers(len(placement), sum(placement), "HF_SWITCH") != placement:
                raise HfConversionError(
                    f"the {side}'s sparse blocks {_indices(placement)} (from its sparse step) "
                    "are not a placement our HF_SWITCH layout reproduces; set "
                    f"{side}_sparse_step = num_layers // num_sparse_{side}_layers."
                )
    activation, hf_activation = _activation_from_hf(hf_config, architecture)
    return _HfModel(architecture, encoder_layers, decoder_layers, encoder_sparse,
                    decoder_sparse, activation, hf_activation)


def _indices(flags: tuple[bool, ...]) -> list[int]:
    return [i for i, f in enumerate(flags) if f]


def _ties(hf_config: Mapping[str, Any], architecture: str) -> bool:
    """Whether transformers 5.24 ties embed_tokens and lm_head to shared.weight: T5 always (its
    config forces tie_word_embeddings), Switch iff tie_word_embeddings; untied, it ties nothing,
    not even the encoder's and decoder's input embeddings."""
    return architecture == T5 or hf_config.get("tie_word_embeddings", True) is not False


def _scales(hf_config: Mapping[str, Any], architecture: str) -> bool:
    """Whether the decoder output is multiplied by d_model**-0.5 before the output projection."""
    if architecture == SWITCH:
        return hf_config.get("tie_word_embeddings", True) is not False
    return bool(hf_config.get(
        "scale_decoder_outputs", hf_config.get("tie_word_embeddings") is not False))


@dataclasses.dataclass(frozen=True)
class _Embeddings:
    """A checkpoint's input embeddings and output projection, as transformers 5.24 computes
    with them."""

    encoder: np.ndarray  # [V, D]
    decoder: np.ndarray  # [V, D], the same array object as `encoder` when shared
    output: np.ndarray | None  # [V, D] a separate output projection; None: tied to `encoder`
    scaled: bool

    @property
    def shared(self) -> bool:
        return self.encoder is self.decoder or np.array_equal(self.encoder, self.decoder)


def _hf_embeddings(tensors: _HfTensors, hf_config: Mapping[str, Any]) -> _Embeddings:
    """Resolve shared / embed_tokens / lm_head the way transformers 5.24 loads them: a tied
    tensor the file also holds with other values is not tied (it keeps its own values)."""
    architecture = _architecture(hf_config)
    tie = _ties(hf_config, architecture)
    shared = tensors.get("shared.weight")

    def effective(key: str) -> np.ndarray:
        if key in tensors.names():
            own = tensors.get(key)
            if not tie or not np.array_equal(own, shared):
                return own
        if not tie and key == "lm_head.weight":
            raise HfConversionError(
                "tie_word_embeddings is false but the checkpoint has no lm_head.weight "
                "(transformers would initialize it randomly); add the output projection or "
                "set tie_word_embeddings true.")
        # Untied but absent (files of transformers 4, which always shared the input
        # embeddings): shared.weight, as there; transformers 5.24 would initialize them.
        return shared

    encoder = effective("encoder.embed_tokens.weight")
    decoder = effective("decoder.embed_tokens.weight")
    if np.array_equal(encoder, decoder):
        decoder = encoder
    output = effective("lm_head.weight")
    tied = output is shared and encoder is shared and decoder is shared
    scaled = _scales(hf_config, architecture)
    if scaled and not tied:
        raise HfConversionError(
            "the checkpoint's output projection is not its input embedding (a separate "
            "lm_head.weight or embed_tokens), yet it scales the decoder output by "
            "d_model**-0.5 (tie_word_embeddings / scale_decoder_outputs true): our untied "
            "logits are never scaled; save it with tied embeddings or scale_decoder_outputs "
            "false.")
    return _Embeddings(encoder, decoder, None if tied else output, scaled)


def _tying_from_config(hf_config: Mapping[str, Any], architecture: str) -> tuple[bool, bool]:
    """(tied, scaled) from config.json alone, when the tensors are not at hand: a T5 config
    with tie_word_embeddings false is the hub's T5 v1.1 layout (a separate lm_head)."""
    tied = _ties(hf_config, architecture) and not (
        architecture == T5 and hf_config.get("tie_word_embeddings") is False)
    scaled = _scales(hf_config, architecture)
    if scaled and not tied:
        raise HfConversionError(
            "config.json describes untied output logits that are scaled by d_model**-0.5; "
            "our untied logits are never scaled: save the model with tied embeddings or "
            "scale_decoder_outputs false.")
    return tied, scaled


# --- Our model gin ----------------------------------------------------------------------------


_CAPACITY_COMMENT = (
    "T5X's Switch capacity factors, with HF's expert_capacity (a fixed count of tokens per expert\n"
    "and sequence) as the floor: when it is at least the group size, nothing is dropped, as in\n"
    "HF (transformers 5.0 until Aug 2026 never dropped a token whatever the count)."
)
_PADDING_COMMENT = (
    "Our default: padding is never routed and takes no capacity (HF routes it). This changes\n"
    "no real token's output when nothing is dropped."
)


def hf_model_gin(hf_config: dict, source: str) -> ModelGin:
    """Our model gin reproducing the architecture of an HF config.json.

    `source` is the HF model directory, named in the gin's header. Whether the output logits
    are tied depends on the tensors too (a T5 file may hold a separate lm_head.weight), so a
    local directory's embeddings are read for that; any other `source` (a hub name) leaves
    the decision to config.json alone (a T5 config with tie_word_embeddings false: untied).
    """
    model = _describe(hf_config)
    shared = True
    if os.path.isdir(source):
        with _HfTensors(source) as tensors:
            embeddings = _hf_embeddings(tensors, hf_config)
        tied, scaled, shared = embeddings.output is None, embeddings.scaled, embeddings.shared
    else:
        tied, scaled = _tying_from_config(hf_config, model.architecture)
    macros: dict[str, Any] = {
        "NUM_ENCODER_LAYERS": model.encoder_layers,
        "NUM_DECODER_LAYERS": model.decoder_layers,
        "NUM_HEADS": int(hf_config.get("num_heads", 8)),
        "HEAD_DIM": int(hf_config.get("d_kv", 64)),
        "EMBED_DIM": int(hf_config.get("d_model", 512)),
        "MLP_DIM": int(hf_config.get("d_ff", 2048)),
        "NUM_EMBEDDINGS": int(hf_config.get("vocab_size", 32128)),
        "DROPOUT_RATE": float(hf_config.get("dropout_rate", 0.1)),
        "NUM_ENCODER_SPARSE_LAYERS": sum(model.encoder_sparse),
        "NUM_DECODER_SPARSE_LAYERS": sum(model.decoder_sparse),
    }
    bindings: dict[str, Any] = {}
    if model.architecture == SWITCH:
        macros.update({
            "NUM_EXPERTS": int(hf_config.get("num_experts", 8)),
            "NUM_SELECTED_EXPERTS": 1,
            "AUX_LOSS_FACTOR": float(hf_config.get("router_aux_loss_coef", 0.001)),
            "ROUTER_Z_LOSS_FACTOR": float(hf_config.get("router_z_loss_coef", 0.001)),
            "JITTER_NOISE": float(hf_config.get("router_jitter_noise", 0.01)),
        })
        placement = Comment("HF's placement: block i is sparse iff i % (layers // sparse) == 1.")
        bindings["ENCODER_SPARSE_LAYOUT"] = ("HF_SWITCH", placement)
        bindings["DECODER_SPARSE_LAYOUT"] = "HF_SWITCH"
        bindings["TRAIN_EXPERT_CAPACITY_FACTOR"] = (1.25, Comment(_CAPACITY_COMMENT))
        bindings["EVAL_EXPERT_CAPACITY_FACTOR"] = 2.0
        bindings["MIN_EXPERT_CAPACITY"] = int(hf_config.get("expert_capacity", 64))
        bindings["TokenChoice.ignore_padding_tokens"] = (True, Comment(_PADDING_COMMENT))
    note = f"HF's MLP activation {model.hf_activation!r}"
    if model.activation.removeprefix("gated-") == "gelu":
        note += " (GELU's tanh approximation)"
    bindings["TransformerConfig.activation"] = (model.activation, Comment(note + "."))
    bindings["TransformerConfig.logits_via_embedding"] = (tied, Comment(
        "Output logits through the shared embedding (HF: lm_head.weight is shared.weight)."
        if tied else "A separate output projection (HF: its own lm_head.weight)."))
    if tied:
        bindings["TransformerConfig.scale_tied_logits"] = (scaled, Comment(
            "HF scales the decoder output by d_model**-0.5 before the tied embedding."
            if scaled else "HF does not scale the decoder output (scale_decoder_outputs false)."))
    if not shared:
        bindings["TransformerConfig.shared_embedding"] = (False, Comment(
            "HF (untied, transformers >= 5) gives the encoder and decoder their own input "
            "embeddings."))
    bindings["TransformerConfig.relative_attention_num_buckets"] = int(
        hf_config.get("relative_attention_num_buckets", 32))
    bindings["TransformerConfig.relative_attention_max_distance"] = int(
        hf_config.get("relative_attention_max_distance", 128))
    header = [f"{model.architecture} converted from Hugging Face: {source}",
              "Written by moe.interop.hf.hf_model_gin."]
    return ModelGin(header=header, macros=macros, bindings=bindings)


# --- Tensor names and layouts -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One of our parameters and the HF tensor(s) it is stored in.

    kind: 'same'; 'transpose' ([in, out] <-> [out, in]); 'heads_in' (query/key/value
    [D, H, Dh] <-> [H*Dh, D]); 'heads_out' (out [H, Dh, D] <-> [D, H*Dh]); 'experts'
    ([E, in, out] <-> E tensors [out, in]).
    """

    ours: str
    hf: tuple[str, ...]
    kind: str
    hf_shape: tuple[int, ...]  # of each HF tensor


def _stack_tensors(config: TransformerConfig, decoder: bool, switch: bool) -> Iterator[_Tensor]:
    """The tensors of one stack, block by block."""
    d, h, dh, f = config.d_model, config.num_heads, config.head_dim, config.d_ff
    ours_stack, hf_stack = ("decoder/stack", "decoder") if decoder else ("encoder", "encoder")
    sparse = config.decoder_sparse if decoder else config.encoder_sparse
    layers_sparse = config.decoder_layers_sparse() if decoder else config.encoder_layers_sparse()
    buckets = config.relative_attention_num_buckets
    yield _Tensor(f"{ours_stack}/relpos_bias/rel_embedding",
                  (f"{hf_stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
                  "transpose", (buckets, h))
    attentions = [("self_attention", "pre_self_attention_layer_norm", "SelfAttention")]
    if decoder:
        attentions.append(
            ("encoder_decoder_attention", "pre_cross_attention_layer_norm", "EncDecAttention"))
    wi_names = ("wi_0", "wi_1") if config.activation.startswith("gated-") else ("wi",)
    for i, is_sparse in enumerate(layers_sparse):
        ours, hf = f"{ours_stack}/layers_{i}", f"{hf_stack}.block.{i}"
        for j, (attention, norm, hf_attention) in enumerate(attentions):
            yield _Tensor(f"{ours}/{norm}/scale", (f"{hf}.layer.{j}.layer_norm.weight",),
                          "same", (d,))
            for ours_name, hf_name in (("query", "q"), ("key", "k"), ("value", "v")):
                yield _Tensor(f"{ours}/{attention}/{ours_name}",
                              (f"{hf}.layer.{j}.{hf_attention}.{hf_name}.weight",),
                              "heads_in", (h * dh, d))
            yield _Tensor(f"{ours}/{attention}/out", (f"{hf}.layer.{j}.{hf_attention}.o.weight",),
                          "heads_out", (d, h * dh))
        mlp = f"{hf}.layer.{len(attentions)}"
        yield _Tensor(f"{ours}/pre_mlp_layer_norm/scale", (f"{mlp}.layer_norm.weight",),
                      "same", (d,))
        if is_sparse:
            e, fe = sparse.num_experts, sparse.d_ff or f
            yield _Tensor(f"{ours}/mlp/router/router_weights/w",
                          (f"{mlp}.mlp.router.classifier.weight",), "transpose", (e, d))
            for name, shape in (("wi", (fe, d)), ("wo", (d, fe))):
                keys = tuple(f"{mlp}.mlp.experts.expert_{x}.{name}.weight" for x in range(e))
                yield _Tensor(f"{ours}/mlp/expert/{name}", keys, "experts", shape)
        else:
            module = "mlp" if switch else "DenseReluDense"
            for name in wi_names:
                yield _Tensor(f"{ours}/mlp/{name}", (f"{mlp}.{module}.{name}.weight",),
                              "transpose", (f, d))
            yield _Tensor(f"{ours}/mlp/wo", (f"{mlp}.{module}.wo.weight",), "transpose", (d, f))
    yield _Tensor(f"{ours_stack}/final_layer_norm/scale", (f"{hf_stack}.final_layer_norm.weight",),
                  "same", (d,))


def _tensors(config: TransformerConfig) -> list[_Tensor]:
    """Every parameter of an encoder-decoder `config` with its HF name(s) and layout; a model
    with any sparse layer is a SwitchTransformers one (its dense MLPs are named `mlp`)."""
    switch = _is_sparse(config)
    v, d = config.vocab_size, config.d_model
    if config.shared_embedding:
        tensors = [_Tensor("token_embedder/embedding", ("shared.weight",), "same", (v, d))]
    else:
        tensors = [_Tensor(f"{side}_token_embedder/embedding", (f"{side}.embed_tokens.weight",),
                           "same", (v, d)) for side in ("encoder", "decoder")]
    if not config.logits_via_embedding:
        tensors.append(_Tensor("logits_dense/kernel", ("lm_head.weight",), "transpose", (v, d)))
    tensors += _stack_tensors(config, decoder=False, switch=switch)
    tensors += _stack_tensors(config, decoder=True, switch=switch)
    return tensors


def _is_sparse(config: TransformerConfig) -> bool:
    return any(config.encoder_layers_sparse()) or any(config.decoder_layers_sparse())


def _to_ours(tensor: _Tensor, arrays: list[np.ndarray], config: TransformerConfig) -> np.ndarray:
    """Our layout of the HF arrays of `tensor`."""
    d, h, dh = config.d_model, config.num_heads, config.head_dim
    if tensor.kind == "experts":
        return np.stack([a.T for a in arrays])
    (a,) = arrays
    if tensor.kind == "transpose":
        return a.T
    if tensor.kind == "heads_in":
        return a.T.reshape(d, h, dh)
    if tensor.kind == "heads_out":
        return a.T.reshape(h, dh, d)
    return a


def _to_hf(tensor: _Tensor, array: np.ndarray) -> list[np.ndarray]:
    """The HF arrays (C-contiguous, as safetensors stores them) of our `array`."""
    if tensor.kind == "experts":
        arrays = [a.T for a in array]
    elif tensor.kind == "transpose":
        arrays = [array.T]
    elif tensor.kind == "heads_in":
        arrays = [array.reshape(array.shape[0], -1).T]
    elif tensor.kind == "heads_out":
        arrays = [array.reshape(-1, array.shape[-1]).T]
    else:
        arrays = [array]
    return [np.ascontiguousarray(a) for a in arrays]


# --- Reading HF tensors -----------------------------------------------------------------------


class _HfTensors(contextlib.AbstractContextManager):
    """The tensors of an HF model directory (one file or an index of shards), read lazily."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = pathlib.Path(model_dir)
        self._stack = contextlib.ExitStack()
        self._files = self._file_of_each_key()
        self._handles: dict[str, Any] = {}

    def _file_of_each_key(self) -> dict[str, pathlib.Path]:
        index, single = self.model_dir / INDEX_FILE, self.model_dir / WEIGHTS_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            return {k: self.model_dir / f for k, f in weight_map.items()}
        if single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="numpy") as f:
                return dict.fromkeys(f.keys(), single)
        found = sorted(p.name for p in self.model_dir.iterdir()) if self.model_dir.is_dir() else []
        raise HfConversionError(
            f"{self.model_dir} has no {WEIGHTS_FILE} or {INDEX_FILE} (found: {found}); PyTorch "
            "pickles (pytorch_model.bin) need torch: re-save the model with "
            "save_pretrained(dir, safe_serialization=True)."
        )

    def names(self) -> set[str]:
        return set(self._files)

    def _handle(self, path: pathlib.Path) -> Any:
        from safetensors import safe_open

        if str(path) not in self._handles:
            if not path.is_file():
                raise HfConversionError(f"{path}, named in {INDEX_FILE}, does not exist.")
            handle = safe_open(str(path), framework="numpy")
            self._handles[str(path)] = self._stack.enter_context(handle)
        return self._handles[str(path)]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self._files[key]).get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        """The tensor as float32 (our parameters' dtype)."""
        handle = self._handle(self._files[key])
        if handle.get_slice(key).get_dtype() == "BF16":  # numpy has no bfloat16
            return _read_bfloat16(self._files[key], key)
        return np.asarray(handle.get_tensor(key), dtype=np.float32)

    def __exit__(self, *exc_info) -> None:
        self._stack.close()


def _read_bfloat16(path: pathlib.Path, key: str) -> np.ndarray:
    """A bfloat16 tensor as float32, from the safetensors header's byte offsets (the numpy
    API cannot return bfloat16; ml_dtypes, which jax depends on, can view the bytes)."""
    import ml_dtypes

    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(header_size))[key]
        start, end = entry["data_offsets"]
        f.seek(8 + header_size + start)
        data = np.frombuffer(f.read(end - start), dtype=ml_dtypes.bfloat16)
    return data.reshape(entry["shape"]).astype(np.float32)


def read_hf_params(
    model_dir: str | os.PathLike, config: TransformerConfig
) -> dict[str, np.ndarray]:
    """Our flat parameters (float32, `encoder/layers_0/...`) of the HF checkpoint in
    `model_dir`, for the model `config` (the one `hf_model_gin` of its config.json builds).

    Every tensor of the file must be taken (copies of shared.weight aside): otherwise the
    model would silently be a different network. The embeddings resolve as transformers 5.24
    loads them (see `_hf_embeddings`); the model's tying and scaling must match.
    """
    _check_expressible(config)
    hf_config = read_hf_config(model_dir)
    expected = [t for t in _tensors(config) if t.hf[0] not in _EMBEDDING_KEYS]
    with _HfTensors(model_dir) as tensors:
        available = tensors.names()
        wanted = {key for t in expected for key in t.hf} | {"shared.weight"}
        missing = sorted(wanted - available)
        if missing:
            raise HfConversionError(
                f"{model_dir} lacks {len(missing)} tensors the model needs, e.g. {missing[:4]}; "
                "build the model with the gin hf_model_gin writes for this config.json.")
        extra = available - wanted - set(_EMBEDDING_KEYS) - _IGNORED_ON_IMPORT
        if extra:
            raise HfConversionError(
                f"{model_dir} has {len(extra)} tensors the model has no place for, e.g. "
                f"{sorted(extra)[:4]}; build the model with the gin hf_model_gin writes.")
        embeddings = _hf_embeddings(tensors, hf_config)
        _check_tying(config, embeddings, model_dir)
        if config.shared_embedding:
            params = {"token_embedder/embedding": embeddings.encoder}
        else:
            params = {"encoder_token_embedder/embedding": embeddings.encoder,
                      "decoder_token_embedder/embedding": embeddings.decoder}
        if embeddings.output is not None:
            params["logits_dense/kernel"] = embeddings.output.T
        for tensor in expected:
            for key in tensor.hf:
                if tensors.shape(key) != tensor.hf_shape:
                    raise HfConversionError(
                        f"{key} has shape {tensors.shape(key)}, the model expects "
                        f"{tensor.hf_shape}; the model gin's sizes do not match config.json.")
            params[tensor.ours] = _to_ours(tensor, [tensors.get(k) for k in tensor.hf], config)
    shape = (config.vocab_size, config.d_model)
    for embedding in (embeddings.encoder, embeddings.decoder):
        if embedding.shape != shape:
            raise HfConversionError(
                f"an input embedding has shape {embedding.shape}, the model expects {shape}; "
                "the model gin's sizes do not match config.json.")
    return params


def _check_tying(config: TransformerConfig, embeddings: _Embeddings, model_dir: Any) -> None:
    """Refuse a model whose embeddings or output logits would differ from the checkpoint's."""
    if config.shared_embedding and not embeddings.shared:
        raise HfConversionError(
            f"{model_dir} gives the encoder and decoder different input embeddings "
            "(encoder.embed_tokens and decoder.embed_tokens differ: transformers 5 ties "
            "nothing when tie_word_embeddings is false); bind "
            "TransformerConfig.shared_embedding = False (as hf_model_gin does).")
    tied = embeddings.output is None
    if config.logits_via_embedding != tied:
        what = "ties" if tied else "does not tie (a separate lm_head.weight)"
        raise HfConversionError(
            f"{model_dir} {what} its output projection to the input embedding; bind "
            f"TransformerConfig.logits_via_embedding = {tied} (as hf_model_gin does).")
    if tied and config.scale_tied_logits != embeddings.scaled:
        raise HfConversionError(
            f"{model_dir} {'scales' if embeddings.scaled else 'does not scale'} its tied "
            "logits by d_model**-0.5; bind TransformerConfig.scale_tied_logits = "
            f"{embeddings.scaled} (as hf_model_gin does).")


# --- Export -----------------------------------------------------------------------------------


def _check_expressible(config: TransformerConfig) -> str:
    """The HF architecture that computes exactly what `config` does, or a refusal naming what
    HF lacks. Training-only and runtime settings (dtype, remat, dispatch, ...) do not matter."""
    if config.num_encoder_layers == 0:
        raise HfConversionError(
            "decoder-only models have no SwitchTransformers/T5 counterpart; only "
            "encoder-decoder models convert.")
    if config.scan_layers:
        raise HfConversionError(
            "layer-scanned parameters (scanned_blocks/...) have no HF counterpart; convert a "
            "model built with TransformerConfig.scan_layers = False.")
    if not _is_sparse(config):
        if not config.shared_embedding:
            raise HfConversionError(
                "separate encoder and decoder input embeddings (shared_embedding = False): "
                "transformers 5 always ties T5's input embeddings; export a model with one.")
        _activation_to_hf(config.activation)
        return T5
    if config.activation.startswith("gated-"):
        raise HfConversionError(
            f"activation {config.activation!r}: HF SwitchTransformers MLPs and experts are "
            "not gated; export a model with 'relu', 'gelu' or 'silu'.")
    _activation_to_hf(config.activation)
    if config.logits_via_embedding and not config.scale_tied_logits:
        raise HfConversionError(
            "tied logits without scaling: HF SwitchTransformers scales tied logits by "
            "d_model**-0.5; export with scale_tied_logits = True or untied logits.")
    experts = set()
    for side in ("encoder", "decoder"):
        sparse = getattr(config, f"{side}_sparse")
        placement = getattr(config, f"{side}_layers_sparse")()
        if not any(placement):
            raise HfConversionError(
                f"the {side} has no sparse layers: HF SwitchTransformers always puts an MoE in "
                f"block 1 of each stack; give the {side} sparse layers.")
        step = len(placement) // sum(placement)
        if _hf_switch_placement(len(placement), step) != placement:
            raise HfConversionError(
                f"the {side}'s sparse layers {_indices(placement)} ({sparse.layout}) are not "
                f"HF's placement (block i sparse iff i % {step} == 1); use the HF_SWITCH "
                "layout (or MIXED with every other layer sparse).")
        router = sparse.router
        if not isinstance(router, TokenChoice) or router.num_selected_experts != 1:
            raise HfConversionError(
                f"the {side} router {type(router).__name__}"
                f"(k={getattr(router, 'num_selected_experts', '-')}) is not HF's top-1 token "
                "choice; only top-1 TokenChoice routers export.")
        if router.normalize_gates:
            raise HfConversionError(
                f"the {side} router renormalizes its gates; HF uses the raw top-1 probability: "
                "export with normalize_gates = False.")
        if sparse.extra_dense_mlp:
            raise HfConversionError(
                "ST-MoE's extra dense MLP after each sparse layer has no HF "
                "SwitchTransformers counterpart.")
        if (sparse.activation or config.activation) != config.activation:
            raise HfConversionError(
                f"the {side} experts use {sparse.activation!r} and the dense MLPs "
                f"{config.activation!r}; HF SwitchTransformers uses one activation for both.")
        if (sparse.d_ff or config.d_ff) != config.d_ff:
            raise HfConversionError(
                f"the {side} experts' hidden size {sparse.d_ff} differs from d_ff "
                f"{config.d_ff}; HF SwitchTransformers has one d_ff (EXPERT_MLP_DIM = MLP_DIM).")
        experts.add(sparse.num_experts)
    if len(experts) > 1:
        raise HfConversionError(
            f"the encoder and decoder have {sorted(experts)} experts; HF SwitchTransformers "
            "has one num_experts.")
    return SWITCH


def _activation_to_hf(activation: str) -> str:
    """HF's name for our activation (without the gate)."""
    base = activation.removeprefix("gated-")
    if base not in _ACTIVATIONS_TO_HF:
        raise HfConversionError(
            f"activation {activation!r} has no HF counterpart; ours that export: "
            f"{sorted(_ACTIVATIONS_TO_HF)} and their gated forms (T5 only).")
    return _ACTIVATIONS_TO_HF[base]


def _export_config(
    config: TransformerConfig, architecture: str, dtype: str, expert_capacity: int | None,
    aux_loss_factor: float, router_z_loss_factor: float,
) -> dict:
    """config.json with the fields (and tying fields) transformers 5.24 writes."""
    out = {
        "architectures": [architecture],
        "d_ff": config.d_ff,
        "d_kv": config.head_dim,
        "d_model": config.d_model,
        "decoder_start_token_id": 0,
        "dropout_rate": config.dropout_rate,
        "dtype": dtype,
        "eos_token_id": 1,
        "initializer_factor": 1.0,
        "is_decoder": False,
        "is_encoder_decoder": True,
        "layer_norm_epsilon": LAYER_NORM_EPSILON,
        "model_type": _MODEL_TYPES[architecture],
        "num_decoder_layers": config.num_decoder_layers,
        "num_heads": config.num_heads,
        "num_layers": config.num_encoder_layers,
        "pad_token_id": 0,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }
    activation = _activation_to_hf(config.activation)
    if architecture == T5:
        gated = config.activation.startswith("gated-")
        proj = {"gated-gelu": "gated-gelu", "gelu": "gelu_new"}.get(
            config.activation, f"gated-{activation}" if gated else activation)
        tied = config.logits_via_embedding
        out.update({
            "classifier_dropout": 0.0,
            "dense_act_fn": activation,
            "feed_forward_proj": proj,
            "is_gated_act": gated,
            "scale_decoder_outputs": tied and config.scale_tied_logits,
            # 5.24 writes true whatever the model, but then warns when lm_head.weight differs;
            # false loads the same in 5.24 and correctly (untied, unscaled) in 4.x too.
            "tie_word_embeddings": tied,
        })
    else:
        encoder, decoder = config.encoder_layers_sparse(), config.decoder_layers_sparse()
        sparse = config.encoder_sparse
        out.update({
            "add_cross_attention": False,
            "add_router_probs": False,
            "bos_token_id": None,
            "decoder_sparse_step": len(decoder) // sum(decoder),
            "dense_act_fn": activation,
            "encoder_sparse_step": len(encoder) // sum(encoder),
            "expert_capacity": expert_capacity or sparse.group_size,
            "num_experts": sparse.num_experts,
            "num_sparse_decoder_layers": sum(decoder),
            "num_sparse_encoder_layers": sum(encoder),
            "router_aux_loss_coef": aux_loss_factor,
            "router_bias": False,
            "router_dtype": "float32",
            "router_ignore_padding_tokens": False,
            "router_jitter_noise": sparse.router.jitter_noise,
            "router_z_loss_coef": router_z_loss_factor,
            "tie_word_embeddings": config.logits_via_embedding,
        })
    return dict(sorted(out.items()))


def hf_export(
    config: TransformerConfig,
    params_flat: dict[str, np.ndarray],
    *,
    expert_capacity: int | None = None,
    aux_loss_factor: float = 0.001,
    router_z_loss_factor: float = 0.001,
) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json, tensors by HF name) of our encoder-decoder model: a T5 model when it has
    no sparse layer, else a SwitchTransformers one.

    Refuses (HfConversionError) what HF cannot express: decoder-only models, scanned layers,
    routers other than top-1 token choice, sparse placements other than HF's, gated or
    differently sized experts, ST-MoE's extra dense MLP, ...

    `expert_capacity` (Switch: HF's per-sequence count of tokens an expert takes): None gives
    the group size, which no sequence of up to that length overflows, i.e. HF evaluates
    without drops. The loss factors only matter for training in HF (its defaults: 0.001).
    """
    architecture = _check_expressible(config)
    expected = _tensors(config)
    names = {t.ours for t in expected}
    missing, extra = sorted(names - set(params_flat)), sorted(set(params_flat) - names)
    if missing or extra:
        raise HfConversionError(
            f"the parameters do not fit the config: missing {missing[:4]}, unexpected "
            f"{extra[:4]}; pass the flattened params of the model built from this config.")
    tensors = {}
    dtypes = set()
    for tensor in expected:
        array = np.asarray(params_flat[tensor.ours])
        if array.dtype not in (np.float16, np.float32, np.float64):
            array = array.astype(np.float32)  # bfloat16: numpy's safetensors cannot write it
        dtypes.add(array.dtype.name)
        tensors.update(zip(tensor.hf, _to_hf(tensor, array)))
    if architecture == SWITCH and not config.logits_via_embedding:
        # Untied, transformers 5 ties nothing: each stack's input embedding must be written
        # (and shared.weight, which it no longer reads, as the encoder's copy).
        if config.shared_embedding:
            for side in ("encoder", "decoder"):
                tensors[f"{side}.embed_tokens.weight"] = tensors["shared.weight"]
        else:
            tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
    dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    hf_config = _export_config(config, architecture, dtype, expert_capacity, aux_loss_factor,
                               router_z_loss_factor)
    return hf_config, tensors


def write_hf_model(output_dir: str | os.PathLike, hf_config: dict, tensors: dict) -> None:
    """Write config.json, model.safetensors and generation_config.json into `output_dir` (new
    or empty): all at once, by renaming a finished temporary directory into place, so that a
    crash leaves no half-written model."""
    from safetensors.numpy import save_file

    output = pathlib.Path(output_dir).absolute()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise HfConversionError(
            f"{output} exists and is not an empty directory; choose a new output directory.")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        (staging / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        generation = {"_from_model_config": True, "decoder_start_token_id": 0,
                      "eos_token_id": 1, "pad_token_id": 0,
                      "transformers_version": hf_config.get("transformers_version",
                                                            TRANSFORMERS_VERSION)}
        (staging / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                  str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        if output.exists():
            output.rmdir()
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "HfConversionError",
    "hf_export",
    "hf_model_gin",
    "read_hf_config",
    "read_hf_params",
    "write_hf_model",
]
