"""Grouped matmul: rows sorted by group, each group multiplied by its own matrix.

`grouped_matmul(x [M, k], w [E, k, n], group_sizes [E]) -> [M, n]`: rows
`sum(group_sizes[:e]) ... sum(group_sizes[:e+1])` of x use `w[e]`; rows past `sum(group_sizes)`
come out as zeros. This is the dropless expert computation, and the one place that picks how
it runs on each backend, because the backends' lowerings of `jax.lax.ragged_dot` differ:

- TPU: XLA's `ragged_dot` forward is grouped, but its weight gradient is dense over the
  groups (the TPU cost analysis of fwd+bwd at E=16 counts 6x the grouped FLOPs). The megablox
  grouped matmul that ships with JAX (`jax.experimental.pallas.ops.tpu.megablox`, the kernel
  MaxText uses) computes forward and both gradients grouped, so TPU uses it.
- GPU: XLA:GPU lowers `ragged_dot` to a dense [E, M, n] computation (measured with jax 0.11:
  0.13x a dense FFN at E=8, out of memory at E=64). No grouped kernel for this JAX version is
  available here, so it still runs `ragged_dot` and says once, with the size of what it
  materializes; `dispatch='index'` is the fast choice on GPU.
- CPU: `ragged_dot` is grouped.

The backend is chosen when the program is lowered (`jax.lax.platform_dependent`), so a program
compiled ahead of time for a TPU slice on a CPU machine gets the TPU kernel.
"""

import functools
import math

import jax
import jax.numpy as jnp
from absl import logging

# megablox tiles: rows per tile (the token dimension, padded to a multiple), and the largest
# contraction/output tile; smaller dimensions use their full size as the tile.
_TILE_M = 128
_TILE_KN = 512


def _ragged_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    return jax.lax.ragged_dot(x, w, group_sizes)


def megablox_grouped_matmul(
    x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, interpret: bool = False
) -> jax.Array:
    """The TPU form: megablox `gmm` (custom VJP: `gmm` for dx, `tgmm` for dw, both grouped).

    The row count is padded to a multiple of the row tile; rows past `sum(group_sizes)` are
    zeroed here to keep the contract (the caller multiplies them by zero gates, and
    uninitialized memory times zero may be NaN).
    `interpret=True` runs the kernel's Python form on any backend (tests on CPU).
    """
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    rows, k = x.shape
    n = w.shape[-1]
    tile_m = min(_TILE_M, 8 * math.ceil(rows / 8))
    padded_rows = tile_m * math.ceil(rows / tile_m)
    # Rows the kernel never visits (past sum(group_sizes)) hold whatever memory held, in the
    # output and in the gradient of x: a select on both sides (not a multiply) keeps them 0.
    computed = (jnp.arange(padded_rows) < jnp.sum(group_sizes))[:, None]
    padded = jnp.pad(x, ((0, padded_rows - rows), (0, 0)))
    padded = jnp.where(computed, padded, jnp.zeros((), x.dtype))
    tiling = (tile_m, min(_TILE_KN, k), min(_TILE_KN, n))
    out = gmm(padded, w.astype(x.dtype), group_sizes.astype(jnp.int32), x.dtype, tiling,
              None, None, False, interpret)
    return jnp.where(computed, out, jnp.zeros((), out.dtype))[:rows]


@functools.cache
def _say_dense_on_gpu(num_groups: int, rows: int, n: int, itemsize: int) -> None:
    """Warn once per shape that XLA:GPU materializes [E, M, n] for `ragged_dot`."""
    gib = num_groups * rows * n * itemsize / 2**30
    logging.warning(
        "dispatch='dropless' on GPU: XLA lowers jax.lax.ragged_dot to a dense computation "
        "over all %d experts ([E, M, n] = [%d, %d, %d], %.2f GiB per expert matmul, E times "
        "the FLOPs of a grouped matmul). Use dispatch='index' for speed on GPU.",
        num_groups, num_groups, rows, n, gib,
    )


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M, k] rows sorted by group, w [E, k, n], group_sizes [E] int32 -> [M, n]."""
    if jax.default_backend() == "gpu":
        _say_dense_on_gpu(w.shape[0], x.shape[0], w.shape[-1], jnp.dtype(x.dtype).itemsize)
    return jax.lax.platform_dependent(
        x, w, group_sizes, tpu=megablox_grouped_matmul, default=_ragged_dot
    )
