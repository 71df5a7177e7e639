"""Dense building blocks of the T5.1.1 architecture: RMS norm, embeddings, relative position
bias, multi-head attention with a KV cache, and the dense MLP.

Every parameter is boxed with its logical axes (`nn.with_logical_partitioning`) so that the
partitioner can shard it. No biases anywhere (T5.1.1). The dense MLP uses the same parameter
names and activation table as the experts of `moe.moe_layer.MoeLayer` (`wi` or `wi_0`/`wi_1`,
`wo`), so that sparse upcycling copies it into every expert unchanged.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe import activations

# Large negative logit for masked attention (T5X uses -1e10 in float32).
_MASK_VALUE = -1e10


def _init(scale: float, fan_in_axes: tuple[int, ...] = (-2,)) -> nn.initializers.Initializer:
    """T5's truncated-normal fan-in initializer with a global `scale` (0.1 for MoE models)."""
    return nn.initializers.variance_scaling(
        scale, "fan_in", "truncated_normal", in_axis=fan_in_axes, out_axis=-1
    )


def _param(module: nn.Module, name: str, init, shape, axes: tuple[str, ...]) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class RmsNorm(nn.Module):
    """T5's layer norm: scale only, no centering, no bias; computed in float32."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        # Cast, then scale in the activation dtype: flaxformer's order, so that bf16 runs
        # round where its checkpoints were trained to.
        return x32.astype(self.dtype) * scale.astype(self.dtype)


class Embed(nn.Module):
    """Token embeddings [vocab, embed]; `attend` gives tied output logits."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = _param(
            self,
            "embedding",
            nn.initializers.normal(stddev=1.0),
            (self.num_embeddings, self.features),
            ("vocab", "embed"),
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"Token ids must be integers, got dtype {tokens.dtype}.")
        x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the (tied) embedding matrix: [..., embed] -> [..., vocab], computed
        in float32 whatever the activation dtype (T5X's `attend_dtype`)."""
        return jnp.einsum("...d,vd->...v", x.astype(jnp.float32), self.embedding)


def relative_position_bucket(
    relative_position: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucketing of `key_pos - query_pos`: exact for small distances, log-spaced up to
    `max_distance`, one bucket beyond. Bidirectional halves the buckets between the signs."""
    n = -relative_position
    bucket = jnp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / math.log(
        max_distance / max_exact
    )
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(is_small, n, large)


class RelativePositionBiases(nn.Module):
    """Per-head learned bias indexed by the bucketed relative position (shared by all layers
    of a stack, as in T5.1.1)."""

    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        """Positions [q] and [k] (integers) -> bias [1, heads, q, k]."""
        table = _param(
            self,
            "rel_embedding",
            _init(1.0, fan_in_axes=(-1,)),
            (self.num_heads, self.num_buckets),
            ("heads", "relpos_buckets"),
        )
        relative = key_positions[None, :] - query_positions[:, None]  # [q, k]
        buckets = relative_position_bucket(
            relative, self.bidirectional, self.num_buckets, self.max_distance
        )
        bias = jnp.take(table, buckets, axis=1)  # [heads, q, k]
        return bias[None].astype(self.dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention without biases, T5 style (no 1/sqrt(d) on the logits:
    the query initializer carries it).

    With `decode=True` the keys and values are kept in the 'cache' collection
    ([batch, max_length, heads, head_dim]). The first call (from `init` or cache set-up with a
    full-length input) creates a zero cache. Later calls write their keys and values at
    `decode_position` (a scalar); `keep_cache` ([batch] bool) leaves an example's entries as
    they are (its prompt was prefilled). `prefill=True` writes a full-length input's keys and
    values at positions 0..length-1.

    `float32_logits`: attention logits, bias and softmax in float32 (ours); False keeps them in
    the activation dtype, as flaxformer's attention does by default (`float32_logits=False`),
    for bit-level parity with bfloat16 models trained there.
    """

    num_heads: int
    head_dim: int = 64
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    kernel_init_scale: float = 1.0
    float32_logits: bool = True

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array,
        bias: jax.Array | None,
        deterministic: bool = True,
        decode: bool = False,
        prefill: bool = False,
        decode_position: jax.Array | None = None,
        keep_cache: jax.Array | None = None,
    ) -> jax.Array:
        """[batch, q, embed], [batch, k, embed], additive bias broadcastable to
        [batch, heads, q, k] -> [batch, q, embed]."""
        d_model = inputs_q.shape[-1]
        heads, head_dim = self.num_heads, self.head_dim
        # The query initializer absorbs T5's missing 1/sqrt(head_dim).
        q_init = _init(self.kernel_init_scale / head_dim, fan_in_axes=(0,))
        kv_init = _init(self.kernel_init_scale, fan_in_axes=(0,))
        in_axes = ("embed", "heads", "kv")
        w_q = _param(self, "query", q_init, (d_model, heads, head_dim), in_axes)
        w_k = _param(self, "key", kv_init, (d_model, heads, head_dim), in_axes)
        w_v = _param(self, "value", kv_init, (d_model, heads, head_dim), in_axes)
        w_o = _param(
            self, "out", _init(self.kernel_init_scale, fan_in_axes=(0, 1)),
            (heads, head_dim, d_model), ("heads", "kv", "embed"),
        )
        dt = self.dtype
        query = jnp.einsum("bqd,dhk->bqhk", inputs_q.astype(dt), w_q.astype(dt))
        key = jnp.einsum("bsd,dhk->bshk", inputs_kv.astype(dt), w_k.astype(dt))
        value = jnp.einsum("bsd,dhk->bshk", inputs_kv.astype(dt), w_v.astype(dt))

        if decode:
            key, value = self._update_cache(key, value, prefill, decode_position, keep_cache)

        logits_dtype = jnp.float32 if self.float32_logits else dt
        logits = jnp.einsum("bqhk,bshk->bhqs", query, key).astype(logits_dtype)
        if bias is not None:
            logits = logits + bias.astype(logits_dtype)
        weights = jax.nn.softmax(logits, axis=-1).astype(dt)
        if not deterministic and self.dropout_rate > 0:
            weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
        out = jnp.einsum("bhqs,bshk->bqhk", weights, value)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        return jnp.einsum("bqhk,hkd->bqd", out, w_o.astype(dt))

    def _update_cache(self, key, value, prefill, decode_position, keep_cache):
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        if not initialized or self.is_initializing():
            return key, value
        if prefill:
            if key.shape != cached_key.value.shape:
                raise ValueError(
                    f"Prefill input length {key.shape[1]} differs from the cache length "
                    f"{cached_key.value.shape[1]}; prefill with the full decoding length."
                )
            cached_key.value, cached_value.value = key, value
            return key, value
        if key.shape[1] != 1 or decode_position is None:
            raise ValueError(
                "A decoding step takes one position at a time and needs decode_position; got "
                f"{key.shape[1]} positions."
            )
        start = (0, decode_position, 0, 0)
        new_key = jax.lax.dynamic_update_slice(cached_key.value, key, start)
        new_value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
        if keep_cache is not None:
            keep = keep_cache[:, None, None, None]
            new_key = jnp.where(keep, cached_key.value, new_key)
            new_value = jnp.where(keep, cached_value.value, new_value)
        cached_key.value, cached_value.value = new_key, new_value
        return new_key, new_value


class MlpBlock(nn.Module):
    """The dense feed-forward block: `wo(act(x wi))`, or gated `wo(act(x wi_0) * (x wi_1))`.

    Parameter names and the activation table match the experts of `MoeLayer`, so a dense
    checkpoint upcycles into experts by copying `wi*`/`wo` along a new expert axis.
    """

    d_ff: int
    activation: str = "gated-gelu"
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    kernel_init_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        d_model = x.shape[-1]
        dt = self.dtype
        init = _init(self.kernel_init_scale, fan_in_axes=(0,))
        names = (
            ["wi_0", "wi_1"] if activations.num_input_projections(self.activation) == 2 else ["wi"]
        )
        hidden = [
            jnp.einsum(
                "...d,df->...f",
                x.astype(dt),
                _param(self, name, init, (d_model, self.d_ff), ("embed", "mlp")).astype(dt),
            )
            for name in names
        ]
        h = activations.apply_activation(self.activation, hidden)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        if not deterministic and self.dropout_rate > 0:
            h = nn.Dropout(self.dropout_rate)(h, deterministic=False)
        w_o = _param(self, "wo", init, (self.d_ff, d_model), ("mlp", "embed"))
        return jnp.einsum("...f,fd->...d", h, w_o.astype(dt))
