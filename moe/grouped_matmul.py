"""Grouped matmul: rows sorted by group, each group multiplied by its own matrix.

`grouped_matmul(x [M, k], w [E, k, n], group_sizes [E]) -> [M, n]`: rows
`sum(group_sizes[:e]) ... sum(group_sizes[:e+1])` of x use `w[e]`; rows past `sum(group_sizes)`
come out as zeros. This is the dropless expert computation.
"""

import jax


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M, k] rows sorted by group, w [E, k, n], group_sizes [E] int32 -> [M, n]."""
    return jax.lax.ragged_dot(x, w, group_sizes)
