"""Reading a T5X model gin (flaxformer's MoE/T5 architectures, or t5x's example T5 network)
and writing the model gin of ours that computes the same network.

A T5X model directory carries `config.gin` (written at the start of training) and
`operative_config.gin`; published checkpoints come with the gin files that made them. They
import flaxformer and t5x modules, which we do not depend on, so they cannot be parsed by gin
as configurations. They can be read as *text*: gin's own parser yields every statement
(macros, bindings, includes) without importing anything, macros are resolved here, and the
few configurables that decide the architecture are looked up by class name and scope, the way
gin would apply them:

- sizes: the encoder/decoder `num_layers`, attention `num_heads`/`head_dim`, `Embed`
  `num_embeddings`/`features`, `MlpBlock.intermediate_dim` (dense and `expert/` scoped);
- MoE: `MoeLayer` experts, group size, capacity factors, minimum capacity, dtype; the router
  class and its scope (`TokensChooseMaskedRouter` / `...ScatterRouter` -> TokenChoice,
  `ExpertsChooseMaskedRouter` -> ExpertChoice), `num_selected_experts`,
  `batch_prioritized_routing`, `ignore_padding_tokens`, `jitter_noise`; sparse counts and
  layouts;
- MLP activations (`('gelu', 'linear')` -> 'gated-gelu'), tied or separate output logits,
  relative position buckets, activation dtype, `float32_logits`, dropout, loss factors.

The resulting `ModelGin` sets our macros (the same names as T5X's) and binds the options that
make our layers compute what flaxformer computes (see `FLAXFORMER_NUMERICS`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from gin import config_parser

from moe import file_io
from moe.errors import ConfigurationError
from moe.interop.model_gin import Comment, GinReference, ModelGin


class T5xGinError(ConfigurationError):
    """A T5X gin file cannot be read or describes a network we cannot build."""


@dataclasses.dataclass(frozen=True)
class _Reference:
    """`@scope/module.Name` or `@scope/module.Name()` in a T5X gin."""

    scoped_name: str
    evaluate: bool

    @property
    def scope(self) -> str:
        return self.scoped_name.rpartition("/")[0]

    @property
    def name(self) -> str:
        return self.scoped_name.rpartition("/")[2].rpartition(".")[2]


@dataclasses.dataclass(frozen=True)
class _Macro:
    name: str


class _Delegate(config_parser.ParserDelegate):
    """Keeps references and macros as plain values: nothing is imported or evaluated."""

    def configurable_reference(self, scoped_configurable_name, evaluate):
        return _Reference(scoped_configurable_name, evaluate)

    def macro(self, macro_name):
        return _Macro(macro_name)


_REQUIRED = object()
_MISSING = object()


def _resolve_include(name: str, including_file: str, search_paths: Sequence[str]) -> str:
    """An include's path: as given, under a search path, or under the including file's folder
    or one of its ancestors (where T5X's relative includes usually start)."""
    candidates = [name] if os.path.isabs(name) else [os.path.join(d, name) for d in search_paths]
    folder = os.path.dirname(file_io.absolute(including_file))
    while True:
        candidates.append(os.path.join(folder, name))
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    for path in candidates:
        if file_io.isfile(path):
            return path
    raise T5xGinError(
        f"{including_file} includes {name!r}, which is in none of {search_paths or '[]'} nor "
        "next to the file. Add the folder holding it with --gin_search_paths."
    )


@dataclasses.dataclass
class T5xGin:
    """Every statement of a T5X gin file and its includes, with macros resolvable."""

    files: list[str]
    bindings: dict[tuple[str, str, str], Any]  # (scope, selector, arg) -> raw value
    imports: list[str]

    @classmethod
    def read(cls, path: str, search_paths: Sequence[str] = ()) -> T5xGin:
        config = cls([], {}, [])
        config._read_file(path, list(search_paths))
        return config

    def _read_file(self, path: str, search_paths: list[str]) -> None:
        self.files.append(path)
        try:
            with file_io.open_file(path) as f:
                statements = list(config_parser.ConfigParser(f, _Delegate()))
        except (OSError, SyntaxError) as e:
            raise T5xGinError(f"Cannot read the T5X gin file {path}: {e}") from e
        for statement in statements:
            if isinstance(statement, config_parser.IncludeStatement):
                self._read_file(_resolve_include(statement.filename, path, search_paths),
                                search_paths)
            elif isinstance(statement, config_parser.ImportStatement):
                self.imports.append(statement.module)
            elif isinstance(statement, config_parser.BindingStatement):
                key = (statement.scope, statement.selector, statement.arg_name)
                self.bindings[key] = statement.value

    # --- Values ---------------------------------------------------------------------------

    def resolve(self, value: Any) -> Any:
        """Follow macros (`%NAME`) to their values; `%gin.REQUIRED` stays unresolved."""
        seen = set()
        while isinstance(value, _Macro):
            if value.name == "gin.REQUIRED":
                return _REQUIRED
            if value.name in seen:
                raise T5xGinError(f"Macro cycle through {value.name}.")
            seen.add(value.name)
            if ("", value.name, "") in self.bindings:
                value = self.bindings[("", value.name, "")]
            else:
                # An enum or constant such as %moe_enums.LayerLayout.MIXED.
                return value.name.rpartition(".")[2]
        if isinstance(value, list | tuple):
            return type(value)(self.resolve(v) for v in value)
        return value

    def macro(self, name: str, default: Any = _MISSING) -> Any:
        if ("", name, "") not in self.bindings:
            if default is _MISSING:
                raise T5xGinError(f"The T5X gin sets no {name}.")
            return default
        return self._required(self.resolve(self.bindings[("", name, "")]), name)

    def get(self, configurable: str, arg: str, scope: str = "", default: Any = _MISSING) -> Any:
        """The value gin would pass as `arg` to `configurable` (a class name) called in
        `scope`: the most specific matching scope wins (`a/b`, then `b`, `a`, then none)."""
        scopes = [scope] if scope else []
        parts = scope.split("/") if scope else []
        scopes += [p for p in reversed(parts) if p != scope] + [""]
        for candidate in scopes:
            for (s, selector, a), value in self.bindings.items():
                if s == candidate and a == arg and selector.rpartition(".")[2] == configurable:
                    return self._required(self.resolve(value), f"{configurable}.{arg}")
        if default is _MISSING:
            raise T5xGinError(
                f"The T5X gin does not set {scope + '/' if scope else ''}{configurable}.{arg}."
            )
        return default

    def has(self, configurable: str) -> bool:
        return any(sel.rpartition(".")[2] == configurable for _, sel, _ in self.bindings)

    @staticmethod
    def _required(value: Any, what: str) -> Any:
        if value is _REQUIRED:
            raise T5xGinError(f"{what} is %gin.REQUIRED in the T5X gin and never set.")
        return value


_T5X_MODULES = ("flaxformer", "t5x")
_T5X_CONFIGURABLES = frozenset({
    "T5Config", "EncoderDecoder", "SparseEncoder", "SparseDecoder", "MoeEncoderDecoderModel",
    "MultiHeadDotProductAttention", "TokensChooseMaskedRouter", "ExpertsChooseMaskedRouter",
})


def is_t5x_gin(path: str, search_paths: Sequence[str] = (), _depth: int = 0) -> bool:
    """Whether a gin file is written for T5X/flaxformer rather than for us: it (or a file it
    includes) imports their modules, includes their gins, or configures their classes."""
    try:
        with file_io.open_file(path) as f:
            statements = list(config_parser.ConfigParser(f, _Delegate()))
    except Exception:  # unreadable or malformed: gin itself reports it when parsing as ours
        return False
    include_prefixes = tuple(f"{m}/" for m in _T5X_MODULES)
    for statement in statements:
        if isinstance(statement, config_parser.ImportStatement):
            found = statement.module.startswith(_T5X_MODULES)
        elif isinstance(statement, config_parser.IncludeStatement):
            found = statement.filename.startswith(include_prefixes)
            if not found and _depth < 8:
                try:
                    included = _resolve_include(statement.filename, path, search_paths)
                except T5xGinError:
                    continue
                found = is_t5x_gin(included, search_paths, _depth + 1)
        else:
            found = statement.selector.rpartition(".")[2] in _T5X_CONFIGURABLES
        if found:
            return True
    return False


# Activations as flaxformer / t5x list them -> ours.
def _activation(activations: Sequence[str]) -> str:
    names = tuple(activations)
    if len(names) == 2 and names[1] == "linear":
        return f"gated-{names[0]}"
    if len(names) == 1:
        return names[0]
    raise T5xGinError(f"MLP activations {names} have no counterpart here (want (act,) or "
                      "(act, 'linear')).")


FLAXFORMER_NUMERICS = {
    "TransformerConfig.logit_mask": (
        True, Comment("flaxformer multiplies every sublayer's normed input and the final "
                      "output by its logit masks.")),
    "TokenChoice.capacity_formula": (
        "flaxformer", Comment("flaxformer's capacity: max(min, round(cf * T / E)).")),
    "ExpertChoice.capacity_formula": "flaxformer",
    "ExpertChoice.min_capacity": GinReference("%MIN_EXPERT_CAPACITY"),
    "SparseConfig.group_formula": (
        "flaxformer", Comment("flaxformer's number of routing groups (a multiple of the "
                              "experts that divides the tokens).")),
}


def to_model_gin(t5x: T5xGin, source: str) -> ModelGin:
    """Our model gin for the network the T5X gin describes (encoder-decoder only)."""
    if t5x.has("T5Config"):
        return _from_t5x_network(t5x, source)
    if t5x.has("DecoderOnly") and not t5x.has("EncoderDecoder"):
        raise T5xGinError(
            "Decoder-only T5X models are not converted yet; only encoder-decoder "
            "(flaxformer t5_architecture.EncoderDecoder / moe_architecture) gins are."
        )
    if not t5x.has("EncoderDecoder"):
        raise T5xGinError(
            f"{t5x.files[0]} defines no flaxformer EncoderDecoder nor t5x network.T5Config: "
            "it is not a T5X model gin."
        )
    return _from_flaxformer(t5x, source)


def _header(t5x: T5xGin, source: str) -> list[str]:
    return [
        f"Model gin written by moe from the T5X gin {source}",
        f"(read: {', '.join(os.path.basename(f) for f in t5x.files)}).",
        "It sets T5X's macros and binds the options that make our layers compute what",
        "flaxformer computes, so that the checkpoint's logits are reproduced.",
    ]


def _stack(t5x: T5xGin, side: str) -> dict[str, Any]:
    """Layers, sparse layers/layout and the MoE layer settings of 'encoder' or 'decoder'."""
    sparse_cls = f"Sparse{side.capitalize()}"
    dense_cls = side.capitalize()
    if t5x.has(sparse_cls):
        num_layers = t5x.get(sparse_cls, "num_layers")
        num_sparse = t5x.get(sparse_cls, "num_sparse_layers", default=0)
        layout = str(t5x.get(sparse_cls, "sparse_layout", default="MIXED")).upper()
    else:
        num_layers = t5x.get(dense_cls, "num_layers")
        num_sparse, layout = 0, "MIXED"
    out = {"num_layers": num_layers, "num_sparse": num_sparse, "layout": layout}
    if not num_sparse:
        return out
    layer_cls = f"Sparse{side.capitalize()}Layer"
    mlp = t5x.get(layer_cls, "mlp")
    if not isinstance(mlp, _Reference) or mlp.name != "MoeLayer":
        raise T5xGinError(f"{layer_cls}.mlp is {mlp!r}, not a flaxformer MoeLayer.")
    scope = mlp.scope
    router = t5x.get("MoeLayer", "router", scope)
    if not isinstance(router, _Reference):
        raise T5xGinError(f"{scope}/MoeLayer.router is {router!r}, not a router reference.")
    expert = t5x.get("MoeLayer", "expert", scope)
    expert_scope = expert.scope if isinstance(expert, _Reference) else ""
    rscope = router.scope
    out.update(
        scope=scope,
        router_class=router.name,
        num_experts=t5x.get("MoeLayer", "num_experts", scope),
        group_size=t5x.get("MoeLayer", "max_group_size", scope),
        train_cf=t5x.get("MoeLayer", "train_capacity_factor", scope),
        eval_cf=t5x.get("MoeLayer", "eval_capacity_factor", scope),
        min_capacity=t5x.get("MoeLayer", "min_expert_capacity", scope, default=4),
        moe_dtype=t5x.get("MoeLayer", "dtype", scope, default="bfloat16"),
        k=t5x.get(router.name, "num_selected_experts", rscope, default=1),
        bpr=t5x.get(router.name, "batch_prioritized_routing", rscope, default=False),
        ignore_padding=t5x.get(router.name, "ignore_padding_tokens", rscope, default=False),
        jitter=t5x.get(router.name, "jitter_noise", rscope, default=0.0),
        expert_activation=_activation(t5x.get("MlpBlock", "activations", expert_scope)),
        expert_dim=t5x.get("MlpBlock", "intermediate_dim", expert_scope),
    )
    return out


def _from_flaxformer(t5x: T5xGin, source: str) -> ModelGin:
    encoder, decoder = _stack(t5x, "encoder"), _stack(t5x, "decoder")
    dense_activation = _activation(t5x.get("MlpBlock", "activations"))
    dtype = t5x.get("EncoderDecoder", "dtype", default="float32")
    macros: dict[str, Any] = {
        "NUM_ENCODER_LAYERS": encoder["num_layers"],
        "NUM_DECODER_LAYERS": decoder["num_layers"],
        "NUM_HEADS": t5x.get("MultiHeadDotProductAttention", "num_heads"),
        "HEAD_DIM": t5x.get("MultiHeadDotProductAttention", "head_dim"),
        "EMBED_DIM": t5x.get("Embed", "features"),
        "MLP_DIM": t5x.get("MlpBlock", "intermediate_dim"),
        "NUM_EMBEDDINGS": t5x.get("Embed", "num_embeddings"),
        "ACTIVATION_DTYPE": dtype,
        "DROPOUT_RATE": t5x.macro("DROPOUT_RATE", 0.0),
        "NUM_ENCODER_SPARSE_LAYERS": encoder["num_sparse"],
        "NUM_DECODER_SPARSE_LAYERS": decoder["num_sparse"],
        "ENCODER_SPARSE_LAYOUT": encoder["layout"],
        "DECODER_SPARSE_LAYOUT": decoder["layout"],
    }
    for name, arg in (("Z_LOSS", "z_loss"), ("LABEL_SMOOTHING", "label_smoothing"),
                      ("AUX_LOSS_FACTOR", "aux_loss_factor"),
                      ("ROUTER_Z_LOSS_FACTOR", "router_z_loss_factor")):
        value = t5x.get("MoeEncoderDecoderModel", arg, default=None)
        if value is None:
            value = t5x.get("EncoderDecoderModel", arg, default=None)
        if value is not None:
            macros[name] = value
    bindings: dict[str, Any] = {
        "TransformerConfig.activation": dense_activation,
        "TransformerConfig.relative_attention_num_buckets":
            t5x.get("RelativePositionBiases", "num_buckets", default=32),
        "TransformerConfig.relative_attention_max_distance":
            t5x.get("RelativePositionBiases", "max_distance", default=128),
    }
    tied = t5x.get("SparseDecoder" if t5x.has("SparseDecoder") else "Decoder",
                   "output_logits_factory", default=None) is None
    bindings["TransformerConfig.logits_via_embedding"] = tied
    if not t5x.get("MultiHeadDotProductAttention", "float32_logits", default=False):
        bindings["TransformerConfig.float32_attention_logits"] = (
            False, Comment("flaxformer computes attention logits and softmax in the "
                           "activation dtype (float32_logits=False)."))
    epsilon = t5x.get("T5LayerNorm", "epsilon", default=1e-6)
    if epsilon != 1e-6:
        raise T5xGinError(f"T5LayerNorm.epsilon = {epsilon}; our RMS norm uses 1e-6.")
    moe = [s for s in (encoder, decoder) if s["num_sparse"]]
    if moe:
        _moe_macros(macros, bindings, encoder, decoder, dense_activation, t5x)
    for name, entry in FLAXFORMER_NUMERICS.items():
        if moe or name.startswith("TransformerConfig."):
            bindings[name] = entry
    return ModelGin(header=_header(t5x, source), macros=macros, bindings=bindings)


def _moe_macros(macros, bindings, encoder, decoder, dense_activation, t5x) -> None:
    """The MoE macros and router bindings; both stacks must agree where our gin shares one
    macro between them (experts, group size, capacity factors, expert width)."""
    stacks = {side: s for side, s in (("encoder", encoder), ("decoder", decoder))
              if s["num_sparse"]}
    shared = ("num_experts", "group_size", "train_cf", "eval_cf", "min_capacity", "moe_dtype",
              "jitter", "expert_activation", "expert_dim", "ignore_padding")
    first = next(iter(stacks.values()))
    for key in shared:
        values = {side: s[key] for side, s in stacks.items()}
        if len(set(map(repr, values.values()))) > 1:
            raise T5xGinError(
                f"The encoder and decoder MoE layers differ in {key} ({values}); our model "
                "gins share it between the stacks."
            )
    macros.update(
        NUM_EXPERTS=first["num_experts"],
        GROUP_SIZE=first["group_size"],
        TRAIN_EXPERT_CAPACITY_FACTOR=first["train_cf"],
        EVAL_EXPERT_CAPACITY_FACTOR=first["eval_cf"],
        MIN_EXPERT_CAPACITY=first["min_capacity"],
        MOE_TRUNCATED_DTYPE=first["moe_dtype"],
        JITTER_NOISE=first["jitter"],
        EXPERT_DROPOUT_RATE=t5x.macro("EXPERT_DROPOUT_RATE", macros["DROPOUT_RATE"]),
    )
    if first["expert_dim"] != macros["MLP_DIM"]:
        macros["EXPERT_MLP_DIM"] = first["expert_dim"]
    if first["expert_activation"] != dense_activation:
        bindings["SparseConfig.activation"] = first["expert_activation"]
    token_choice = {"TokensChooseMaskedRouter", "TokensChooseScatterRouter"}
    for side, s in stacks.items():
        if s["router_class"] in token_choice:
            macros["NUM_SELECTED_EXPERTS"] = s["k"]
            if side == "encoder":
                macros["ENCODER_BATCH_PRIORITIZED_ROUTING"] = bool(s["bpr"])
            elif s["bpr"]:
                bindings["decoder/TokenChoice.batch_prioritized"] = True
                bindings["decoder/TokenChoice.allow_causal"] = (
                    True, Comment("The T5X model uses batch-prioritized routing in its decoder, "
                                  "which sees later tokens of the group."))
        elif s["router_class"] == "ExpertsChooseMaskedRouter":
            bindings[f"{side}/SparseConfig.router"] = GinReference(f"@{side}/ExpertChoice()")
            if side == "decoder":
                bindings["decoder/ExpertChoice.allow_causal"] = (
                    True, Comment("The T5X model routes its decoder by expert choice, which "
                                  "sees later tokens of the group."))
        else:
            raise T5xGinError(
                f"Router {s['router_class']} has no counterpart here; supported: "
                f"{sorted(token_choice | {'ExpertsChooseMaskedRouter'})}."
            )
    ks = {s["k"] for s in stacks.values() if s["router_class"] in token_choice}
    if len(ks) > 1:
        raise T5xGinError(f"The stacks route with different top-k ({ks}); our gins share "
                          "NUM_SELECTED_EXPERTS.")
    if not first["ignore_padding"]:
        bindings["TokenChoice.ignore_padding_tokens"] = (
            False, Comment("flaxformer routes padding tokens (ignore_padding_tokens=False): "
                           "they take expert capacity."))
        bindings["ExpertChoice.ignore_padding_tokens"] = False


def _from_t5x_network(t5x: T5xGin, source: str) -> ModelGin:
    """t5x's example T5 (`t5x/examples/t5/network.py`, the published T5.1.1 checkpoints)."""
    get = lambda arg, default=_MISSING: t5x.get("T5Config", arg, default=default)
    macros = {
        "NUM_ENCODER_LAYERS": get("num_encoder_layers"),
        "NUM_DECODER_LAYERS": get("num_decoder_layers"),
        "NUM_HEADS": get("num_heads"),
        "HEAD_DIM": get("head_dim"),
        "EMBED_DIM": get("emb_dim"),
        "MLP_DIM": get("mlp_dim"),
        "NUM_EMBEDDINGS": get("vocab_size"),
        "ACTIVATION_DTYPE": get("dtype", "float32"),
        "DROPOUT_RATE": get("dropout_rate", 0.0),
        "NUM_ENCODER_SPARSE_LAYERS": 0,
        "NUM_DECODER_SPARSE_LAYERS": 0,
    }
    bindings: dict[str, Any] = {
        "TransformerConfig.activation": _activation(get("mlp_activations", ("relu",))),
        "TransformerConfig.logits_via_embedding": bool(get("logits_via_embedding", False)),
    }
    if not get("float32_attention_logits", False):
        bindings["TransformerConfig.float32_attention_logits"] = (
            False, Comment("t5x computes attention logits in the activation dtype."))
    return ModelGin(header=_header(t5x, source), macros=macros, bindings=bindings)


def translate_gin_file(path: str, search_paths: Sequence[str] = ()) -> str:
    """Our model gin text for a T5X gin file."""
    return to_model_gin(T5xGin.read(path, search_paths), path).render()




# Our config fields that the translated macros and bindings set, and that a checkpoint's
# shapes cannot tell apart (heads x head_dim, top-k, activation, ...): compared by
# `config_mismatches`.
_CHECKED_MACROS = {
    "NUM_ENCODER_LAYERS": lambda c: c.num_encoder_layers,
    "NUM_DECODER_LAYERS": lambda c: c.num_decoder_layers,
    "NUM_HEADS": lambda c: c.num_heads,
    "HEAD_DIM": lambda c: c.head_dim,
    "EMBED_DIM": lambda c: c.d_model,
    "MLP_DIM": lambda c: c.d_ff,
    "NUM_EMBEDDINGS": lambda c: c.vocab_size,
    "NUM_ENCODER_SPARSE_LAYERS": lambda c: c.encoder_sparse.num_sparse_layers,
    "NUM_DECODER_SPARSE_LAYERS": lambda c: c.decoder_sparse.num_sparse_layers,
}
_CHECKED_BINDINGS = {
    "TransformerConfig.activation": lambda c: c.activation,
    "TransformerConfig.logits_via_embedding": lambda c: c.logits_via_embedding,
}


def config_mismatches(model_gin: ModelGin, config: Any) -> list[str]:
    """Where a model's `TransformerConfig` differs from a translated T5X gin's network."""
    problems = []
    expected = model_gin.values()
    checks = {**_CHECKED_MACROS, **_CHECKED_BINDINGS}
    sparse = model_gin.macros.get("NUM_ENCODER_SPARSE_LAYERS") or model_gin.macros.get(
        "NUM_DECODER_SPARSE_LAYERS")
    if sparse:
        checks["NUM_EXPERTS"] = lambda c: (c.encoder_sparse if c.encoder_sparse.num_sparse_layers
                                           else c.decoder_sparse).num_experts
        if "NUM_SELECTED_EXPERTS" in expected:
            checks["NUM_SELECTED_EXPERTS"] = lambda c: getattr(
                (c.encoder_sparse if c.encoder_sparse.num_sparse_layers
                 else c.decoder_sparse).router, "num_selected_experts", None)
    for name, read in checks.items():
        if name in expected and read(config) != expected[name]:
            problems.append(f"{name} is {read(config)!r} here, {expected[name]!r} there")
    return problems


def check_config_against_checkpoint_gin(config: Any, gin_path: str) -> None:
    """Raise `T5xGinError` naming every architecture setting in which `config` differs from
    the network of the T5X gin written with a checkpoint (its config.gin)."""
    problems = config_mismatches(to_model_gin(T5xGin.read(gin_path), gin_path), config)
    if problems:
        raise T5xGinError(
            f"The model gin does not describe the network of the T5X checkpoint, whose gin "
            f"{gin_path} says: " + "; ".join(problems) + f". Pass --gin_file={gin_path} (it is "
            "translated to our model gin), or fix these macros."
        )


__all__ = [
    "T5xGin",
    "T5xGinError",
    "check_config_against_checkpoint_gin",
    "config_mismatches",
    "is_t5x_gin",
    "to_model_gin",
    "translate_gin_file",
]
