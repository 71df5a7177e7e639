"""Experts as one stacked MLP: weights [E, d_model, d_ff] with the expert axis sharded.

Parameter names (`wi` or `wi_0`/`wi_1`, `wo`) and the activation table are those of the dense
MLP, so that sparse upcycling can copy a dense MLP into every expert.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe.activations import apply_activation, is_gated
from moe.grouped_matmul import grouped_matmul


def expert_kernel_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """Fan-in scaled truncated normal per expert (each expert initialized like a dense MLP)."""
    return nn.initializers.variance_scaling(
        scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
    )


class MlpExperts(nn.Module):
    """E independent feed-forward networks applied to per-expert token buffers."""

    num_experts: int
    d_ff: int
    activation: str = "gated-gelu"
    dropout_rate: float = 0.0  # expert dropout (Switch fine-tuning: 0.4 inside experts)
    dtype: jnp.dtype = jnp.float32
    kernel_init_scale: float = 1.0

    def _kernel(self, name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
        init = nn.with_logical_partitioning(expert_kernel_init(self.kernel_init_scale), axes)
        return self.param(name, init, shape, jnp.float32).astype(self.dtype)

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
    ) -> jax.Array:
        """Run every expert on its own tokens.

        Buffered form (capacity dispatch): x [E, G, C, d_model] -> [E, G, C, d_model].
        Ragged form (dropless): x [M, d_model] sorted by expert with `group_sizes` [E] ->
        [M, d_model]; rows past sum(group_sizes) come out as zeros.
        """
        d_model = x.shape[-1]
        x = x.astype(self.dtype)
        if group_sizes is None:
            matmul = lambda a, w: jnp.einsum("egcd,edf->egcf", a, w)
        else:
            matmul = lambda a, w: grouped_matmul(a, w, group_sizes)
        hidden = [matmul(x, w) for w in self.input_kernels(d_model)]
        hidden = apply_activation(self.activation, hidden)
        if group_sizes is None:
            hidden = nn.with_logical_constraint(
                hidden, ("expert", "expert_group", "expert_capacity", "mlp")
            )
        hidden = nn.Dropout(self.dropout_rate, name="dropout")(hidden, deterministic=deterministic)
        return matmul(hidden, self.output_kernel(d_model))
