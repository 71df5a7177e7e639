"""Experts as one stacked MLP: weights [E, d_model, d_ff] with the expert axis sharded.

Parameter names (`wi` or `wi_0`/`wi_1`, `wo`) and the activation table are those of the dense
MLP, so that sparse upcycling can copy a dense MLP into every expert.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moe.activations import apply_activation, is_gated
from moe.expert_matmul import expert_matmul
from moe.grouped_matmul import grouped_matmul


def expert_kernel_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """Fan-in scaled truncated normal per expert (each expert initialized like a dense MLP)."""
    return nn.initializers.variance_scaling(
        scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
    )


@struct.dataclass
class RaggedMlp:
    """The experts' ragged (dropless) form as a pure function of its kernels.

    A pytree rather than the module because the expert-parallel dropless dispatch runs the
    experts inside `jax.shard_map`, where Flax can neither create nor look up variables: the
    kernels (already in the experts' dtype) and the dropout key enter it as ordinary arguments,
    the kernels split over the 'expert' axis. The one-device dispatch calls the same object.
    """

    input_kernels: tuple[jax.Array, ...]  # [E, d_model, d_ff] each: wi, or wi_0 and wi_1
    output_kernel: jax.Array  # [E, d_ff, d_model]
    dropout_rng: jax.Array | None  # None: no expert dropout (rate 0, or deterministic)
    activation: str = struct.field(pytree_node=False)
    dropout_rate: float = struct.field(pytree_node=False, default=0.0)
    grouped_matmul: str = struct.field(pytree_node=False, default="auto")

    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """x [M, d_model] sorted by expert, group_sizes [E] -> [M, d_model] (rows past
        sum(group_sizes) are zeros)."""
        x = x.astype(self.output_kernel.dtype)
        matmul = lambda a, w: grouped_matmul(a, w, group_sizes, self.grouped_matmul)
        hidden = [matmul(x, w) for w in self.input_kernels]
        hidden = apply_activation(self.activation, hidden)
        if self.dropout_rng is not None:
            # The module's dropout, applied unbound: a pure function of the key.
            hidden = nn.Dropout(self.dropout_rate).apply(
                {}, hidden, deterministic=False, rng=self.dropout_rng
            )
        return matmul(hidden, self.output_kernel)

    def fold_in(self, data: jax.Array) -> RaggedMlp:
        """The same experts with the dropout key folded with `data` (a device's index: each
        device draws its own masks for the rows it computes)."""
        if self.dropout_rng is None:
            return self
        return self.replace(dropout_rng=jax.random.fold_in(self.dropout_rng, data))


class MlpExperts(nn.Module):
    """E independent feed-forward networks applied to per-expert token buffers."""

    num_experts: int
    d_ff: int
    activation: str = "gated-gelu"
    dropout_rate: float = 0.0  # expert dropout (Switch fine-tuning: 0.4 inside experts)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32  # the kernels as stored; cast to `dtype` per call
    kernel_init_scale: float = 1.0
    grouped_matmul: str = "auto"  # the ragged form's `moe.grouped_matmul` implementation
    expert_matmul: str = "auto"  # the buffered form's `moe.expert_matmul` implementation

    def _kernel(self, name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
        init = nn.with_logical_partitioning(expert_kernel_init(self.kernel_init_scale), axes)
        return self.param(name, init, shape, self.param_dtype).astype(self.dtype)

    def input_kernels(self, d_model: int) -> list[jax.Array]:
        """The `wi` matrices [E, d_model, d_ff]: one, or gate and value for gated activations."""
        shape = (self.num_experts, d_model, self.d_ff)
        axes = ("expert", "embed", "mlp")
        if is_gated(self.activation):
            return [self._kernel("wi_0", shape, axes), self._kernel("wi_1", shape, axes)]
        return [self._kernel("wi", shape, axes)]

    def output_kernel(self, d_model: int) -> jax.Array:
        shape = (self.num_experts, self.d_ff, d_model)
        return self._kernel("wo", shape, ("expert", "mlp", "embed"))

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        group_sizes: jax.Array | None = None,
        *,
        deterministic: bool = True,
        dropless: Callable[[jax.Array, RaggedMlp], jax.Array] | None = None,
    ) -> jax.Array:
        """Run every expert on its own tokens.

        Buffered form (capacity dispatch): x [E, G, C, d_model] -> [E, G, C, d_model].
        Ragged form (dropless): x [M, d_model] sorted by expert with `group_sizes` [E] ->
        [M, d_model]; rows past sum(group_sizes) come out as zeros.
        Dispatch form: `dropless(x, mlp)` with the ragged form as a pure `RaggedMlp`, so the
        caller's dispatch can run it where Flax cannot go (inside `jax.shard_map`).
        """
        d_model = x.shape[-1]
        x = x.astype(self.dtype)
        if group_sizes is not None or dropless is not None:
            dropping = self.dropout_rate > 0 and not deterministic
            mlp = RaggedMlp(
                tuple(self.input_kernels(d_model)),
                self.output_kernel(d_model),
                self.make_rng("dropout") if dropping else None,
                activation=self.activation,
                dropout_rate=self.dropout_rate,
                grouped_matmul=self.grouped_matmul,
            )
            return mlp(x, group_sizes) if dropless is None else dropless(x, mlp)
        matmul = lambda a, w: expert_matmul(a, w, self.expert_matmul)
        hidden = [matmul(x, w) for w in self.input_kernels(d_model)]
        hidden = apply_activation(self.activation, hidden)
        hidden = nn.with_logical_constraint(
            hidden, ("expert", "expert_group", "expert_capacity", "mlp")
        )
        hidden = nn.Dropout(self.dropout_rate, name="dropout")(hidden, deterministic=deterministic)
        return matmul(hidden, self.output_kernel(d_model))
