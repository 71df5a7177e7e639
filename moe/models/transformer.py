"""The sparse T5 stacks: layers, encoder, decoder, and the two top-level modules
(`EncoderDecoder` in the T5.1.1 style, `DecoderOnly` GLaM-style for causal and prefix LM).

Pre-norm residual layers: `x + dropout(sublayer(rms_norm(x)))`. A layer's MLP is a dense
`MlpBlock` or a `MoeLayer`, chosen by the stack's sparse layout; ST-MoE's extra dense MLP
follows each sparse one when asked. Packed sequences: attention never crosses segment ids, and
padding (segment 0 / token 0) is never attended to nor routed to experts.

Decoding uses the 'cache' collection: `decode=True` on a full-length input creates the cache,
`prefill=True` writes a prompt's keys and values, and single-token steps advance a position
counter kept by the decoder stack.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moe.errors import ConfigurationError
from moe.models.config import SparseConfig, TransformerConfig
from moe.models.layers import (
    _MASK_VALUE,
    Embed,
    MlpBlock,
    MultiHeadAttention,
    RelativePositionBiases,
    RmsNorm,
)
from moe.moe_layer import MoeLayer
from moe.routing.shell import BATCH_COUNTS, ROUTER_LOADS, ROUTER_STATE


def attention_bias(mask: jax.Array) -> jax.Array:
    """Boolean mask [batch, q, k] -> additive bias [batch, 1, q, k] (0 or a large negative)."""
    return jnp.where(mask, 0.0, _MASK_VALUE)[:, None].astype(jnp.float32)


def decoder_logit_mask(decoder_input_tokens: jax.Array) -> jax.Array:
    """flaxformer's `get_decoder_logit_mask`: [batch, length] -> bool [batch, length].

    A position is kept when its input token is real, when the next input token is real (the
    last target of a sequence, whose input is shifted one step right), or at position 0 (the
    0-BOS token). This keeps one position past the last real target, whose hidden state is
    not attended to by anyone but is routed by flaxformer's MoE layers.
    """
    tokens = decoder_input_tokens
    next_tokens = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    first = jnp.arange(tokens.shape[1])[None, :] == 0
    return (tokens > 0) | (next_tokens > 0) | first


def _masked(x: jax.Array, position_mask: jax.Array | None) -> jax.Array:
    """x [batch, length, d] times a [batch, length] 0/1 mask (or x itself without one)."""
    return x if position_mask is None else x * position_mask[..., None].astype(x.dtype)


def _segments(segment_ids: jax.Array | None, real: jax.Array) -> jax.Array:
    """Segment ids, or 1 for real tokens and 0 for padding when the batch is not packed."""
    return real.astype(jnp.int32) if segment_ids is None else segment_ids


def self_attention_mask(
    segments: jax.Array, causal: bool, bidirectional_prefix: jax.Array | None = None
) -> jax.Array:
    """[batch, length] segment ids (0 = padding) -> [batch, q, k] mask.

    Tokens see tokens of their own segment; with `causal`, only earlier ones, except that
    positions marked in `bidirectional_prefix` (prefix LM's `decoder_causal_attention`) see
    each other in both directions.
    """
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    if not causal:
        return same
    length = segments.shape[1]
    allowed = jnp.tril(jnp.ones((length, length), bool))[None]
    if bidirectional_prefix is not None:
        prefix = bidirectional_prefix.astype(bool)
        allowed = allowed | (prefix[:, :, None] & prefix[:, None, :])
    return same & allowed


@dataclasses.dataclass(frozen=True)
class LayerMode:
    """How the layers run: Python values fixed at trace time.

    A module attribute of every layer, so that rematerialization and scan treat it as static
    without counting argument positions.
    """

    deterministic: bool = True  # no dropout, no router noise, eval capacity factors
    decode: bool = False  # use the 'cache' collection (create, prefill or step)
    prefill: bool = False  # write a full prompt's keys and values into the cache


@struct.dataclass
class LayerInputs:
    """The arrays every layer of a stack reads besides its input (None where not used).

    Attributes:
      self_bias: additive self-attention bias [batch, 1, q, k] (the stack fills it in).
      encoded: encoder output [batch, input_length, embed] (decoders with cross-attention).
      cross_bias: additive cross-attention bias [batch, 1, q, input_length].
      padding_mask: [batch, length] True for real tokens: never routed to experts otherwise.
      decode_position: the position of a decoding step's token.
      keep_cache: [batch] whether an example keeps its cache entries in a decoding step.
      position_mask: flaxformer's logit mask [batch, length], multiplied into the normed input
        of every sublayer (see `TransformerConfig.logit_mask`).
    """

    self_bias: jax.Array | None = None
    encoded: jax.Array | None = None
    cross_bias: jax.Array | None = None
    padding_mask: jax.Array | None = None
    decode_position: jax.Array | None = None
    keep_cache: jax.Array | None = None
    position_mask: jax.Array | None = None


class TransformerLayer(nn.Module):
    """One encoder or decoder layer: self-attention, optional cross-attention, (sparse) MLP."""

    config: TransformerConfig
    sparse: bool
    sparse_config: SparseConfig
    causal: bool
    cross_attention: bool
    mode: LayerMode = LayerMode()

    @nn.compact
    def __call__(self, x: jax.Array, inputs: LayerInputs) -> jax.Array:
        """[batch, length, embed] -> [batch, length, embed]."""
        cfg = self.config
        deterministic, position_mask = self.mode.deterministic, inputs.position_mask
        drop = nn.Dropout(cfg.dropout_rate, name="dropout")

        def attention(name):
            return MultiHeadAttention(
                num_heads=cfg.num_heads,
                head_dim=cfg.head_dim,
                dropout_rate=cfg.dropout_rate,
                dtype=cfg.dtype,
                kernel_init_scale=cfg.kernel_init_scale,
                float32_logits=cfg.float32_attention_logits,
                name=name,
            )

        def dense_mlp(name):
            return MlpBlock(
                d_ff=cfg.d_ff,
                activation=cfg.activation,
                dropout_rate=cfg.dropout_rate,
                dtype=cfg.dtype,
                kernel_init_scale=cfg.kernel_init_scale,
                name=name,
            )

        h = RmsNorm(dtype=cfg.dtype, name="pre_self_attention_layer_norm")(x)
        h = _masked(h, position_mask)
        h = attention("self_attention")(
            h, h, inputs.self_bias, deterministic, self.mode.decode, self.mode.prefill,
            inputs.decode_position, inputs.keep_cache,
        )
        x = x + drop(h, deterministic=deterministic)

        if self.cross_attention:
            h = RmsNorm(dtype=cfg.dtype, name="pre_cross_attention_layer_norm")(x)
            h = _masked(h, position_mask)
            h = attention("encoder_decoder_attention")(
                h, inputs.encoded, inputs.cross_bias, deterministic
            )
            x = x + drop(h, deterministic=deterministic)

        h = RmsNorm(dtype=cfg.dtype, name="pre_mlp_layer_norm")(x)
        h = x_normed = _masked(h, position_mask)
        if self.sparse:
            s = self.sparse_config
            h = MoeLayer(
                num_experts=s.num_experts,
                d_ff=s.d_ff or cfg.d_ff,
                router=s.router,
                activation=s.activation or cfg.activation,
                dispatch=s.dispatch,
                max_group_size=s.group_size,
                group_formula=s.group_formula,
                num_expert_replicas=s.num_expert_replicas,
                router_init_stddev=s.router_init_stddev,
                num_expert_partitions=s.num_expert_partitions,
                expert_dropout_rate=s.expert_dropout_rate,
                dtype=cfg.dtype if s.dtype is None else s.dtype,
                causal=self.causal,
                kernel_init_scale=cfg.kernel_init_scale,
                name="mlp",
            )(h, inputs.padding_mask, deterministic=deterministic)
            if s.num_shared_experts:
                shared = MlpBlock(
                    d_ff=s.num_shared_experts * (s.d_ff or cfg.d_ff),
                    activation=s.activation or cfg.activation,
                    dropout_rate=cfg.dropout_rate,
                    dtype=cfg.dtype if s.dtype is None else s.dtype,
                    kernel_init_scale=cfg.kernel_init_scale,
                    name="shared_experts",
                )
                h = h + shared(x_normed, deterministic)
        else:
            h = dense_mlp("mlp")(h, deterministic)
        x = x + drop(h, deterministic=deterministic)

        if self.sparse and self.sparse_config.extra_dense_mlp:
            h = RmsNorm(dtype=cfg.dtype, name="pre_extra_mlp_layer_norm")(x)
            h = _masked(h, position_mask)
            h = dense_mlp("extra_mlp")(h, deterministic)
            x = x + drop(h, deterministic=deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def _layer_class(config: TransformerConfig):
    """TransformerLayer, rematerialized in the backward pass when `config.remat`."""
    return nn.remat(TransformerLayer) if config.remat else TransformerLayer


def scan_period(layers_sparse: tuple[bool, ...]) -> int:
    """The shortest block of layers whose repetition gives the stack's sparse pattern."""
    n = len(layers_sparse)
    for period in range(1, n + 1):
        if n % period == 0 and layers_sparse == layers_sparse[:period] * (n // period):
            return period
    return n


class _LayerBlock(nn.Module):
    """One period of layers (e.g. dense then sparse): the body of the scanned stack."""

    config: TransformerConfig
    layers_sparse: tuple[bool, ...]
    sparse_config: SparseConfig
    causal: bool
    cross_attention: bool
    mode: LayerMode

    @nn.compact
    def __call__(self, x: jax.Array, inputs: LayerInputs) -> tuple[jax.Array, None]:
        for j, sparse in enumerate(self.layers_sparse):
            x = TransformerLayer(
                self.config, sparse, self.sparse_config, self.causal, self.cross_attention,
                self.mode, name=f"layers_{j}",
            )(x, inputs)
        return x, None


class TransformerStack(nn.Module):
    """L layers sharing one relative position bias, with a final RMS norm and dropout."""

    config: TransformerConfig
    layers_sparse: tuple[bool, ...]
    sparse_config: SparseConfig
    causal: bool
    cross_attention: bool

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        self_mask: jax.Array,
        query_positions: jax.Array,
        key_positions: jax.Array,
        inputs: LayerInputs,
        mode: LayerMode,
    ) -> jax.Array:
        """[batch, length, embed] -> [batch, length, embed]; `self_mask` [batch, q, k] and the
        positions give `inputs.self_bias`."""
        cfg = self.config
        position_bias = RelativePositionBiases(
            num_heads=cfg.num_heads,
            num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance,
            bidirectional=not self.causal,
            dtype=jnp.float32,
            name="relpos_bias",
        )(query_positions, key_positions)
        inputs = inputs.replace(self_bias=attention_bias(self_mask) + position_bias)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=mode.deterministic)
        if cfg.scan_layers:
            x = self._scanned(x, inputs, mode)
        else:
            layer_cls = _layer_class(cfg)
            for i, sparse in enumerate(self.layers_sparse):
                x = layer_cls(
                    cfg, sparse, self.sparse_config, self.causal, self.cross_attention, mode,
                    name=f"layers_{i}",
                )(x, inputs)
        x = _masked(RmsNorm(dtype=cfg.dtype, name="final_layer_norm")(x), inputs.position_mask)
        return nn.Dropout(cfg.dropout_rate)(x, deterministic=mode.deterministic)

    def _scanned(self, x: jax.Array, inputs: LayerInputs, mode: LayerMode) -> jax.Array:
        period = scan_period(self.layers_sparse)
        if any(self.layers_sparse):
            # A sparse layer's output is float32 (the router's combine weights are), which the
            # residual takes on from there as in the unrolled stack; a scan's carry keeps one
            # dtype, so it starts in float32.
            x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        block_cls = nn.remat(_LayerBlock, prevent_cse=False) if self.config.remat else _LayerBlock
        scanned = nn.scan(
            block_cls,
            variable_axes={
                "params": 0, "cache": 0, "moe": 0, ROUTER_STATE: 0, ROUTER_LOADS: 0,
                BATCH_COUNTS: 0,
            },
            split_rngs={"params": True, "dropout": True, "router": True},
            in_axes=nn.broadcast,
            length=len(self.layers_sparse) // period,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = scanned(
            self.config, self.layers_sparse[:period], self.sparse_config, self.causal,
            self.cross_attention, mode, name="scanned_blocks",
        )(x, inputs)
        return x


class OutputProjection(nn.Module):
    """Untied output logits: [batch, length, embed] -> [batch, length, vocab] (float32)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                ("embed", "vocab"),
            ),
            (cfg.d_model, cfg.vocab_size),
            jnp.float32,
        )
        # float32 whatever the activation dtype, as T5X's `logits_dense` (stability).
        return jnp.einsum("bld,dv->blv", x.astype(jnp.float32), kernel)


class _Logits:
    """Output logits shared by both top-level modules: tied to the token embedding (scaled by
    1/sqrt(d_model), as T5X does) or a separate projection."""

    def _make_logits(self):
        if not self.config.logits_via_embedding:
            self.logits_dense = OutputProjection(self.config)

    def logits(self, y: jax.Array) -> jax.Array:
        if self.config.logits_via_embedding:
            out = self.token_embedder.attend(y)
            if self.config.scale_tied_logits:
                out = out / jnp.sqrt(y.shape[-1]).astype(out.dtype)
        else:
            out = self.logits_dense(y)
        return nn.with_logical_constraint(out.astype(jnp.float32), ("batch", "length", "vocab"))

    def _logit_mask(self, decoder_input_tokens: jax.Array) -> jax.Array | None:
        if not self.config.logit_mask:
            return None
        return decoder_logit_mask(decoder_input_tokens)


def _check_tokens(tokens: jax.Array, name: str, config: TransformerConfig) -> None:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be integer token ids of shape [batch, length], got "
            f"{tokens.dtype}{list(tokens.shape)}."
        )
    config.check_length(tokens.shape[1], name)


def _check_same_shape(a: jax.Array | None, b: jax.Array, name_a: str, name_b: str) -> None:
    if a is not None and a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}.")


class Decoder(nn.Module):
    """The causal stack with its decoding state (position counter) in the 'cache' collection."""

    config: TransformerConfig
    cross_attention: bool

    @nn.compact
    def __call__(
        self,
        embedded: jax.Array,
        segments: jax.Array,
        mode: LayerMode,
        *,
        bidirectional_prefix: jax.Array | None = None,
        encoded: jax.Array | None = None,
        encoder_segments: jax.Array | None = None,
        keep_cache: jax.Array | None = None,
        position_mask: jax.Array | None = None,
    ) -> jax.Array:
        """[batch, length, embed] -> [batch, length, embed] (length 1 in a decoding step).

        `segments` [batch, length]: segment ids, 0 for padding. `position_mask`: flaxformer's
        decoder logit mask (teacher-forced calls only)."""
        decode, prefill = mode.decode, mode.prefill
        batch, length = embedded.shape[:2]
        step = decode and not prefill and self.has_variable("cache", "position")
        if decode:
            position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            # Only its shape is read: the cache length, fixed when the cache is created.
            cache_length = self.variable("cache", "length", lambda: jnp.zeros((length,), jnp.int8))
        if step:
            if length != 1:
                raise ValueError(f"A decoding step takes one token per example, got {length}.")
            p = position.value
            key_positions = jnp.arange(cache_length.value.shape[0])
            query_positions = p[None]
            self_mask = jnp.broadcast_to(key_positions <= p, (batch, 1, key_positions.size))
            position.value = p + 1
        else:
            p = None
            key_positions = query_positions = jnp.arange(length)
            self_mask = self_attention_mask(segments, True, bidirectional_prefix)

        cross_bias = None
        if self.cross_attention:
            encoder_real = encoder_segments > 0
            if step:
                shape = (batch, 1, encoded.shape[1])
                cross_mask = jnp.broadcast_to(encoder_real[:, None, :], shape)
            else:
                same = segments[:, :, None] == encoder_segments[:, None, :]
                cross_mask = same & encoder_real[:, None, :]
            cross_bias = attention_bias(cross_mask)

        stack = TransformerStack(
            self.config,
            self.config.decoder_layers_sparse(),
            self.config.decoder_sparse,
            causal=True,
            cross_attention=self.cross_attention,
            name="stack",
        )
        inputs = LayerInputs(
            encoded=encoded,
            cross_bias=cross_bias,
            padding_mask=segments > 0,
            decode_position=p,
            keep_cache=keep_cache,
            position_mask=None if decode else position_mask,
        )
        return stack(embedded, self_mask, query_positions, key_positions, inputs, mode)


class EncoderDecoder(_Logits, nn.Module):
    """T5.1.1-style encoder-decoder with per-stack MoE layouts; embeddings shared by both."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        if cfg.num_encoder_layers < 1:
            raise ConfigurationError(
                "EncoderDecoder needs num_encoder_layers >= 1; use DecoderOnly."
            )
        if cfg.shared_embedding:
            self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, cfg.dtype)
        else:
            self.encoder_token_embedder = Embed(cfg.vocab_size, cfg.d_model, cfg.dtype)
            self.decoder_token_embedder = Embed(cfg.vocab_size, cfg.d_model, cfg.dtype)
        self.encoder = TransformerStack(
            cfg, cfg.encoder_layers_sparse(), cfg.encoder_sparse, causal=False,
            cross_attention=False,
        )
        self.decoder = Decoder(cfg, cross_attention=True)
        self._make_logits()

    def encode(
        self,
        encoder_input_tokens: jax.Array,
        encoder_segment_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """[batch, input_length] tokens -> [batch, input_length, embed]."""
        _check_tokens(encoder_input_tokens, "encoder_input_tokens", self.config)
        _check_same_shape(
            encoder_segment_ids, encoder_input_tokens, "encoder_segment_ids", "encoder_input_tokens"
        )
        segments = _segments(encoder_segment_ids, encoder_input_tokens > 0)
        positions = jnp.arange(encoder_input_tokens.shape[1])
        embedder = self.token_embedder if self.config.shared_embedding else (
            self.encoder_token_embedder)
        x = embedder(encoder_input_tokens)
        inputs = LayerInputs(
            padding_mask=segments > 0,
            position_mask=encoder_input_tokens > 0 if self.config.logit_mask else None,
        )
        return self.encoder(
            x, self_attention_mask(segments, causal=False), positions, positions, inputs,
            LayerMode(deterministic=deterministic),
        )

    def decode(
        self,
        encoded: jax.Array,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        decoder_target_tokens: jax.Array | None = None,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> jax.Array:
        """Decoder logits [batch, target_length, vocab] (length 1 in a decoding step)."""
        _check_tokens(decoder_input_tokens, "decoder_input_tokens", self.config)
        _check_same_shape(
            decoder_target_tokens, decoder_input_tokens, "decoder_target_tokens",
            "decoder_input_tokens",
        )
        _check_same_shape(
            decoder_segment_ids, decoder_input_tokens, "decoder_segment_ids",
            "decoder_input_tokens",
        )
        if encoded.shape[0] != decoder_input_tokens.shape[0]:
            raise ValueError(
                f"Encoder batch {encoded.shape[0]} differs from decoder batch "
                f"{decoder_input_tokens.shape[0]}."
            )
        encoder_segments = _segments(encoder_segment_ids, encoder_input_tokens > 0)
        real = (
            jnp.ones(decoder_input_tokens.shape, bool)
            if decoder_target_tokens is None
            else decoder_target_tokens > 0
        )
        segments = _segments(decoder_segment_ids, real)
        embedder = self.token_embedder if self.config.shared_embedding else (
            self.decoder_token_embedder)
        y = embedder(decoder_input_tokens)
        y = self.decoder(
            y, segments, LayerMode(deterministic, decode), encoded=encoded,
            encoder_segments=encoder_segments,
            position_mask=self._logit_mask(decoder_input_tokens),
        )
        return self.logits(y)

    def __call__(
        self,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        decoder_target_tokens: jax.Array | None = None,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        encoder_positions: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> jax.Array:
        """Teacher-forced logits [batch, target_length, vocab].

        Positions are accepted for the feature converter's sake; relative position biases use
        in-sequence offsets, which equal position differences inside a packed segment.
        """
        del encoder_positions, decoder_positions
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, deterministic)
        return self.decode(
            encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
            encoder_segment_ids, decoder_segment_ids, deterministic, decode,
        )


class DecoderOnly(_Logits, nn.Module):
    """GLaM-style decoder-only LM (Expert Choice paper), causal or prefix LM.

    With `decoder_causal_attention` (seqio's PrefixLMFeatureConverter), the positions it marks
    attend to each other in both directions; everything else is causal.
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        if cfg.num_encoder_layers:
            raise ConfigurationError(
                f"DecoderOnly has no encoder, but num_encoder_layers={cfg.num_encoder_layers}."
            )
        self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, cfg.dtype)
        self.decoder = Decoder(cfg, cross_attention=False)
        self._make_logits()

    def __call__(
        self,
        decoder_input_tokens: jax.Array,
        decoder_target_tokens: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        decoder_causal_attention: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        prefill: bool = False,
        keep_cache: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [batch, length, vocab] (length 1 in a decoding step).

        `prefill=True` (with `decode=True`) writes the keys and values of a full-length input
        into the cache; `keep_cache` [batch] keeps an example's cache entries in a step.
        """
        del decoder_positions
        _check_tokens(decoder_input_tokens, "decoder_input_tokens", self.config)
        for name, value in (
            ("decoder_target_tokens", decoder_target_tokens),
            ("decoder_segment_ids", decoder_segment_ids),
            ("decoder_causal_attention", decoder_causal_attention),
        ):
            _check_same_shape(value, decoder_input_tokens, name, "decoder_input_tokens")
        if decoder_target_tokens is not None:
            real = decoder_target_tokens > 0
        elif prefill and decoder_causal_attention is not None:
            real = decoder_causal_attention > 0
        else:
            real = jnp.ones(decoder_input_tokens.shape, bool)
        segments = _segments(decoder_segment_ids, real)
        y = self.token_embedder(decoder_input_tokens)
        y = self.decoder(
            y, segments, LayerMode(deterministic, decode, prefill),
            bidirectional_prefix=decoder_causal_attention, keep_cache=keep_cache,
            position_mask=self._logit_mask(decoder_input_tokens),
        )
        return self.logits(y)
