"""TPU tests compile for a TPU v4 slice ahead of time; they need libtpu (the `tpu` extra)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from moe import tpu_topology
from moe.partitioning import Partitioner

requires_libtpu = pytest.mark.skipif(
    not tpu_topology.tpu_compiler_available(),
    reason="libtpu is not installed: pip install -e '.[tpu]' (CI installs it)",
)


def compile_layer_grad(layer: nn.Module, x_shape: tuple[int, ...], partitioner: Partitioner,
                       dtype: Any = jnp.bfloat16) -> tuple[Any, Any]:
    """(abstract sharded params, compiled TPU executable) of the gradient of
    `sum(layer(x)**2)` with respect to the params, on the partitioner's mesh."""
    x_abstract = jax.ShapeDtypeStruct(x_shape, dtype)
    key = jax.random.key(0)  # outside the mesh: the slice's devices cannot run anything
    with partitioner.context():
        boxed = jax.eval_shape(layer.init, key, x_abstract)
    shardings = partitioner.get_shardings(boxed)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
    x = jax.ShapeDtypeStruct(x_shape, dtype, sharding=partitioner.batch_sharding)

    def loss(p, x):
        return jnp.sum(layer.apply(p, x).astype(jnp.float32) ** 2)

    with partitioner.context():
        return params, jax.jit(jax.grad(loss)).lower(params, x).compile()
