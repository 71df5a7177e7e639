"""T5X-like model objects: a flax module plus the loss, score and predict functions a trainer
and seqio's evaluator call.

`EncoderDecoderModel` wraps `EncoderDecoder` (seqio's EncDecFeatureConverter features);
`DecoderOnlyModel` wraps `DecoderOnly` (DecoderFeatureConverter for causal LM,
PrefixLMFeatureConverter for prefix LM). Batches are dicts of the converter's features.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import seqio

from moe.errors import ConfigurationError
from moe.models import decoding
from moe.models.config import TransformerConfig
from moe.models.losses import cross_entropy_with_logits, moe_losses_and_metrics
from moe.models.transformer import DecoderOnly, EncoderDecoder
from moe.routing.shell import BATCH_COUNTS, ROUTER_LOADS, ROUTER_STATE

Batch = Mapping[str, jax.Array]
DECODE_METHODS = ("greedy", "sample", "beam")


class BaseModel(abc.ABC):
    """Loss, metrics and scoring shared by both model kinds.

    Args:
      module: the flax module (subclasses build it from a `TransformerConfig`).
      label_smoothing: cross-entropy label smoothing.
      z_loss: output-logit z-loss factor (T5X default 1e-4).
      aux_loss_factor: factor of the MoE load-balancing loss (AUX_LOSS_FACTOR).
      router_z_loss_factor: factor of the router z-loss (ROUTER_Z_LOSS_FACTOR).
      eos_id: the end-of-sequence id (1 in T5 vocabularies).
      feature_converter_cls: the seqio feature converter the batches come from.
    """

    module_inputs: tuple[str, ...] = ()
    feature_converter_cls: type[seqio.FeatureConverter]

    def __init__(
        self,
        module: nn.Module,
        label_smoothing: float = 0.0,
        z_loss: float = 1e-4,
        aux_loss_factor: float = 0.01,
        router_z_loss_factor: float = 0.0,
        eos_id: int = 1,
        feature_converter_cls: type[seqio.FeatureConverter] | None = None,
    ):
        self.module = module
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.aux_loss_factor = aux_loss_factor
        self.router_z_loss_factor = router_z_loss_factor
        self.eos_id = eos_id
        if feature_converter_cls is not None:
            self.feature_converter_cls = feature_converter_cls

    # --- Initialization -------------------------------------------------------------------

    def get_initial_variables(
        self,
        rng: jax.Array,
        input_shapes: Mapping[str, tuple[int, ...]],
        input_types: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Fresh variables, still boxed in their logical axes (`nn.LogicallyPartitioned`).

        Unbox with `nn.meta.unbox`; `jax.eval_shape` of this gives the abstract tree from which
        `Partitioner.get_shardings` derives the parameter shardings.
        """
        input_types = dict(input_types or {})
        inputs = {
            name: jnp.zeros(shape, input_types.get(name, jnp.int32))
            for name, shape in input_shapes.items()
            if name in self.module_inputs
        }
        missing = [n for n in self.required_inputs if n not in inputs]
        if missing:
            raise ValueError(
                f"input_shapes lacks {missing}; it has {sorted(input_shapes)}. Give the shapes "
                f"of the feature converter's model features."
            )
        variables = self.module.init(
            {"params": rng, "dropout": rng, "router": rng}, **inputs, deterministic=True
        )
        # Diagnostics sown during init are not state; routers with state keep it beside.
        return {k: v for k, v in variables.items() if k in ("params", ROUTER_STATE)}

    # --- Loss and score -------------------------------------------------------------------

    @property
    def required_inputs(self) -> tuple[str, ...]:
        return self.module_inputs[:2]

    def _inputs(self, batch: Batch) -> dict[str, jax.Array]:
        missing = [n for n in self.required_inputs if n not in batch]
        if missing:
            raise ValueError(f"The batch lacks {missing}; it has {sorted(batch)}.")
        return {name: batch[name] for name in self.module_inputs if name in batch}

    @staticmethod
    def variables(params: Any, router_state: Any = None) -> dict[str, Any]:
        """The variables to apply the module with: parameters, and the routers' state if any.

        Routers with state (`moe.routing.RouterSpec.initial_state`) read it from the
        'router_state' collection, which `get_initial_variables` returns beside 'params' and
        the trainer keeps in its state; every method below takes it as `router_state`.
        """
        return {"params": params, **({ROUTER_STATE: router_state} if router_state else {})}

    def _apply(
        self,
        params,
        batch: Batch,
        dropout_rng: jax.Array | None,
        router_state=None,
        batch_counts=None,
        mutable: tuple[str, ...] = ("moe", ROUTER_LOADS),
    ):
        """(logits, the `mutable` collections); `dropout_rng=None` runs deterministically."""
        deterministic = dropout_rng is None
        rngs = None
        if not deterministic:
            dropout, router = jax.random.split(dropout_rng)
            rngs = {"dropout": dropout, "router": router}
        variables = self.variables(params, router_state)
        if batch_counts:
            variables[BATCH_COUNTS] = batch_counts
        return self.module.apply(
            variables,
            **self._inputs(batch),
            deterministic=deterministic,
            rngs=rngs,
            mutable=list(mutable),
        )

    @staticmethod
    def _loss_weights(batch: Batch) -> jax.Array:
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        return (targets > 0 if weights is None else weights).astype(jnp.float32)

    def batch_counts(
        self,
        params: Any,
        batch: Batch,
        dropout_rng: jax.Array | None,
        router_state: Any = None,
    ) -> dict[str, Any]:
        """What the routers' losses count over the whole batch (`RouterSpec.batch_counts`),
        measured on `batch` by a forward pass: a tree with a node per such router (scanned
        stacks: a leading axis per block), `{}` when no router asks for any.

        The trainer sums them over a step's microbatches, with each microbatch's `dropout_rng`
        (so noisy routing selects as in its gradient pass), and gives them to `loss_fn`. Only
        routers' counts are used: XLA drops the rest of the pass (the output logits, the
        experts after the last router).
        """
        _, state = self._apply(params, batch, dropout_rng, router_state, mutable=(BATCH_COUNTS,))
        return dict(state.get(BATCH_COUNTS, {}))

    def loss_fn(
        self,
        params: Any,
        batch: Batch,
        dropout_rng: jax.Array | None,
        router_state: Any = None,
        batch_counts: Any = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Loss of a batch and its metrics; `dropout_rng=None` runs deterministically.

        The token losses are normalized by the number of real target tokens (loss weights);
        the MoE losses are the mean over MoE layers times their factors (T5X). In training,
        routers with state add their measured expert loads under `ROUTER_LOADS` (a tree the
        trainer sums over microbatches and passes to `update_router_state`). `batch_counts`:
        when `batch` is one of a step's microbatches, the whole step's `batch_counts` summed
        over the microbatches and divided by their number, so that routers balancing over the
        batch count it all (the mean of the microbatches' losses is then the whole batch's).
        """
        logits, state = self._apply(params, batch, dropout_rng, router_state, batch_counts)
        moe_state, router_loads = state.get("moe"), state.get(ROUTER_LOADS)
        targets = batch["decoder_target_tokens"]
        weights = self._loss_weights(batch)
        token_loss, token_z_loss = cross_entropy_with_logits(
            logits, targets, self.label_smoothing, self.z_loss
        )
        num_tokens = jnp.sum(weights)
        normalizer = jnp.maximum(num_tokens, 1.0)
        loss = jnp.sum(token_loss * weights) / normalizer
        z_loss = jnp.sum(token_z_loss * weights) / normalizer
        aux, router_z, moe_metrics = moe_losses_and_metrics(moe_state)
        aux_loss = self.aux_loss_factor * aux
        router_z_loss = self.router_z_loss_factor * router_z
        correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
        metrics = {
            "cross_ent_loss": loss - z_loss,
            "z_loss": z_loss,
            "aux_loss": aux_loss,
            "router_z_loss": router_z_loss,
            "accuracy": jnp.sum(correct * weights) / normalizer,
            "num_tokens": num_tokens,
            **moe_metrics,
        }
        if router_loads:
            metrics[ROUTER_LOADS] = router_loads
        return loss + aux_loss + router_z_loss, metrics

    def update_router_state(self, router_state: Any, router_loads: Any) -> Any:
        """The routers' state after a train step whose expert loads were `router_loads`.

        Both trees have a node per router with state (the same path); each router's own
        `update_state` rule applies, the spec found from the stack the path starts with.
        """

        def visit(state, loads, path):
            if "expert_load" in loads:
                router = self.module.config.sparse_config_at(path).router
                return router.update_state(state, loads["expert_load"])
            return {k: visit(v, loads[k], (*path, k)) if k in loads else v
                    for k, v in state.items()}

        return visit(router_state, router_loads, ())

    def score_batch(self, params: Any, batch: Batch, router_state: Any = None) -> jax.Array:
        """Sum of the target tokens' log-likelihoods per example [batch] (loss weights apply)."""
        logits, _ = self._apply(params, batch, None, router_state)
        return self.sequence_log_likelihood(logits, batch)

    def sequence_log_likelihood(self, logits: jax.Array, batch: Batch) -> jax.Array:
        """[batch]: sum over target positions of log p(target), weighted by the loss weights."""
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
        token_ll = jnp.take_along_axis(
            log_probs, batch["decoder_target_tokens"][..., None].astype(jnp.int32), -1
        )[..., 0]
        return jnp.sum(token_ll * self._loss_weights(batch), axis=-1)

    def compute_logits(
        self, params: Any, batch: Batch, router_state: Any = None
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Eval-mode logits [batch, length, vocab] (float32) and what the layers sow into
        'intermediates' (each MoE layer's `router_top1_expert` [batch, length])."""
        logits, state = self._apply(params, batch, None, router_state,
                                    mutable=("moe", "intermediates"))
        return logits, dict(state.get("intermediates", {}))

    # --- Predict --------------------------------------------------------------------------

    def predict_batch(
        self,
        params: Any,
        batch: Batch,
        rng: jax.Array | None = None,
        decode_method: str = "greedy",
        temperature: float = 1.0,
        topk: int = 0,
        beam_size: int = 4,
        alpha: float = 0.6,
        return_scores: bool = False,
        router_state: Any = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Decoded tokens [batch, length] ('greedy', 'sample' or 'beam'), 0 after EOS.

        The decoding length is the length of `decoder_input_tokens` in the batch. With
        `return_scores`, beam search also returns the length-normalized log-likelihoods.
        """
        if decode_method not in DECODE_METHODS:
            raise ConfigurationError(
                f"Unknown decode_method {decode_method!r}; use one of {DECODE_METHODS}."
            )
        if decode_method == "sample" and (rng is None or temperature <= 0):
            raise ConfigurationError("decode_method='sample' needs an rng and a temperature > 0.")
        if decode_method == "beam" and beam_size < 1:
            raise ConfigurationError(f"beam_size must be >= 1, got {beam_size}.")
        return self._predict_jit(
            self.variables(params, router_state), dict(batch), rng, decode_method, temperature,
            topk, beam_size, alpha, return_scores,
        )

    @functools.cached_property
    def _predict_jit(self):
        return jax.jit(self._predict, static_argnums=(3, 4, 5, 6, 7, 8))

    def _predict(
        self, variables, batch, rng, decode_method, temperature, topk, beam_size, alpha,
        return_scores,
    ):
        copies = beam_size if decode_method == "beam" else 1
        step_fn, cache, prompt = self._decoding_setup(variables, batch, copies)
        length = batch["decoder_input_tokens"].shape[1]
        n = batch["decoder_input_tokens"].shape[0]
        if decode_method == "beam":
            tokens, scores = decoding.beam_search(
                step_fn, cache, length, beam_size, self.eos_id, alpha, batch_size=n, **prompt
            )
        else:
            tokens = decoding.temperature_sample(
                step_fn, cache, length, rng, temperature if decode_method == "sample" else 0.0,
                topk, self.eos_id, batch_size=n, **prompt,
            )
            scores = None
        tokens = self._remove_prompt(tokens, prompt.get("prompt_length"))
        return (tokens, scores) if return_scores else tokens

    @staticmethod
    def _remove_prompt(tokens: jax.Array, prompt_length: jax.Array | None) -> jax.Array:
        """Left-align the generated part of each row (T5X returns outputs without prompts)."""
        if prompt_length is None:
            return tokens
        length = tokens.shape[1]
        index = jnp.arange(length)[None] + prompt_length[:, None]
        shifted = jnp.take_along_axis(tokens, jnp.minimum(index, length - 1), axis=1)
        return jnp.where(index < length, shifted, 0)

    @abc.abstractmethod
    def _decoding_setup(self, variables, batch: Batch, copies: int):
        """(step_fn, cache for batch * copies rows, prompt kwargs of the decoding loops);
        `variables` from `self.variables`."""


def _repeat(x: jax.Array, copies: int) -> jax.Array:
    """[N, ...] -> [N * copies, ...], each row repeated in place (beam-major per example)."""
    return x if copies == 1 else jnp.repeat(x, copies, axis=0)


@gin.configurable
class EncoderDecoderModel(BaseModel):
    """Encoder-decoder model (T5X's EncoderDecoderModel), on EncDecFeatureConverter batches."""

    module_inputs = (
        "encoder_input_tokens",
        "decoder_input_tokens",
        "decoder_target_tokens",
        "encoder_segment_ids",
        "decoder_segment_ids",
        "encoder_positions",
        "decoder_positions",
    )
    feature_converter_cls = seqio.EncDecFeatureConverter

    def __init__(self, config: TransformerConfig, **kwargs):
        super().__init__(EncoderDecoder(config), **kwargs)

    def _decoding_setup(self, variables, batch: Batch, copies: int):
        if "encoder_segment_ids" in batch or "decoder_segment_ids" in batch:
            raise ValueError("Decoding does not take packed batches; use pack=False.")
        encoder_tokens = batch["encoder_input_tokens"]
        encoder_tokens = _repeat(encoder_tokens, copies)
        n, length = encoder_tokens.shape[0], batch["decoder_input_tokens"].shape[1]
        encoded = self.module.apply(variables, encoder_tokens, method=EncoderDecoder.encode)

        def decode(cache, tokens):
            return self.module.apply(
                {**variables, **cache}, encoded, encoder_tokens, tokens, decode=True,
                method=EncoderDecoder.decode, mutable=["cache"],
            )

        _, cache = decode({}, jnp.zeros((n, length), jnp.int32))

        def step_fn(cache, tokens, keep_cache):
            del keep_cache  # nothing is prefilled in the decoder of an encoder-decoder
            logits, cache = decode(cache, tokens)
            return logits[:, -1], cache

        return step_fn, cache, {}


@gin.configurable
class DecoderOnlyModel(BaseModel):
    """Decoder-only LM (T5X's DecoderOnlyModel): causal LM, or prefix LM when batches carry
    `decoder_causal_attention` (PrefixLMFeatureConverter). Predictions continue the prompt
    (the inputs part) and are returned without it."""

    module_inputs = (
        "decoder_input_tokens",
        "decoder_target_tokens",
        "decoder_segment_ids",
        "decoder_positions",
        "decoder_causal_attention",
    )
    feature_converter_cls = seqio.DecoderFeatureConverter

    def __init__(self, config: TransformerConfig, prefix_lm: bool = False, **kwargs):
        """`prefix_lm=True` reads PrefixLMFeatureConverter batches (inputs then targets)."""
        if prefix_lm and "feature_converter_cls" not in kwargs:
            kwargs["feature_converter_cls"] = seqio.PrefixLMFeatureConverter
        super().__init__(DecoderOnly(config), **kwargs)

    @property
    def required_inputs(self) -> tuple[str, ...]:
        return ("decoder_input_tokens",)

    def _decoding_setup(self, variables, batch: Batch, copies: int):
        if "decoder_segment_ids" in batch:
            raise ValueError("Decoding does not take packed batches; use pack=False.")
        inputs = batch["decoder_input_tokens"].astype(jnp.int32)
        n, length = inputs.shape
        causal_attention = batch.get("decoder_causal_attention")

        def apply(cache, tokens, **kwargs):
            return self.module.apply(
                {**variables, **cache}, tokens, decode=True, mutable=["cache"], **kwargs
            )

        _, cache = apply({}, jnp.zeros((n * copies, length), jnp.int32))
        prompt: dict[str, jax.Array] = {}
        if causal_attention is not None:
            causal_attention = causal_attention.astype(jnp.int32)
            prefill_tokens = inputs * causal_attention
            _, cache = apply(
                cache,
                _repeat(prefill_tokens, copies),
                decoder_causal_attention=_repeat(causal_attention, copies),
                prefill=True,
            )
            prefilled = jnp.sum(causal_attention, axis=1)
            # The prompt in target space: output p is input p + 1, for p < len(inputs).
            prompt = {
                "prompt": jnp.roll(prefill_tokens, -1, axis=1),
                "prompt_length": jnp.maximum(prefilled - 1, 0),
                "cache_prefilled": prefilled,
            }

        def step_fn(cache, tokens, keep_cache):
            logits, cache = apply(cache, tokens, keep_cache=keep_cache)
            return logits[:, -1], cache

        return step_fn, cache, prompt
