"""Grouped matmul: rows sorted by group, each group multiplied by its own matrix.

`grouped_matmul(x [M, k], w [E, k, n], group_sizes [E]) -> [M, n]`: rows
`sum(group_sizes[:e]) ... sum(group_sizes[:e+1])` of x use `w[e]`; rows past `sum(group_sizes)`
come out as zeros. This is the dropless expert computation, and the one place that picks how
it runs on each backend, because XLA's `jax.lax.ragged_dot` is not grouped everywhere:

- TPU: its forward is grouped, but its weight gradient is dense over the groups (the TPU cost
  analysis of fwd+bwd at E=16 counts 6x the grouped FLOPs). The megablox grouped matmul that
  ships with JAX (`jax.experimental.pallas.ops.tpu.megablox`, the kernel MaxText uses)
  computes forward and both gradients grouped: 'megablox'.
- CPU: `ragged_dot` lowers to a computation dense over the groups (measured: 9x slower than
  'blocked' at E=8 for fwd+bwd, E=128 did not finish in minutes). 'blocked' is plain JAX: a
  loop over row blocks of one group each, every block one small matmul with its group's
  matrix, with a custom VJP whose weight gradient updates one group's slice in place; its
  FLOPs are the grouped ones plus at most one partial block per group.
- GPU: XLA:GPU lowers `ragged_dot` to a dense [E, M, n] computation (measured with jax 0.11:
  0.13x a dense FFN at E=8, out of memory at E=64). A Hopper GPU runs JAX's Mosaic GPU
  kernels (`ragged_dot` forward and dx, `transposed_ragged_dot` dw) behind a custom VJP:
  'mosaic_gpu', on an H200 3.7 ms fwd+bwd at E=8 and 4.2 ms at E=64 (2 x 32k rows, 1024 x
  4096, bfloat16), 0.95x / 0.91x torch's grouped_mm in the same run. Other GPUs, and shapes
  or dtypes its tiles do not fit, run 'blocked' (38-40 ms there).

Forcing 'ragged_dot' where its lowering is dense (CPU, GPU) logs that once, with its cost.

The backend is chosen when the program is lowered (`jax.lax.platform_dependent`), so a program
compiled ahead of time for a TPU slice on a CPU machine gets the TPU kernel.
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from absl import logging
from jax import lax

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


# --- 'blocked': plain JAX, grouped on every backend ---------------------------------------


def _block_rows(rows: int, groups: int) -> int:
    """Rows per block: about a group's share of the rows (a power of two in [8, 256]), so that
    the partial last block of each group wastes little and a balanced group is one block."""
    share = max(1, rows // groups)
    return int(min(256, max(8, 2 ** math.floor(math.log2(share)))))


def _blocks(group_sizes: jax.Array, rows: int, block: int):
    """Block i covers rows start[i] ... start[i] + valid[i] of group group[i]; blocks past the
    last have valid 0. There are at most ceil(rows / block) + groups of them."""
    groups = group_sizes.shape[0]
    num_blocks = -(-rows // block) + groups
    per_group = (group_sizes + block - 1) // block
    ends = jnp.cumsum(per_group)
    index = jnp.arange(num_blocks)
    group = jnp.searchsorted(ends, index, side="right")
    clipped = jnp.minimum(group, groups - 1)
    within = index - (ends - per_group)[clipped]
    start = (jnp.cumsum(group_sizes) - group_sizes)[clipped] + within * block
    valid = jnp.where(group < groups,
                      jnp.clip(group_sizes[clipped] - within * block, 0, block), 0)
    return num_blocks, clipped, start, valid


def _per_block(lhs: jax.Array, block_fn: Callable[[jax.Array, jax.Array], jax.Array],
               out_cols: int, group_sizes: jax.Array) -> jax.Array:
    """out[rows of block i] = block_fn(lhs[rows of block i], group of block i), block by block
    (rows past the block's valid ones keep what is there: zeros or the next group's)."""
    rows = lhs.shape[0]
    block = _block_rows(rows, group_sizes.shape[0])
    num_blocks, group, start, valid = _blocks(group_sizes, rows, block)
    padded = jnp.pad(lhs, ((0, block), (0, 0)))
    out = jnp.zeros((rows + block, out_cols), lhs.dtype)

    def body(i, out):
        def compute(out):
            result = block_fn(lax.dynamic_slice_in_dim(padded, start[i], block), group[i])
            keep = (jnp.arange(block) < valid[i])[:, None]
            old = lax.dynamic_slice_in_dim(out, start[i], block)
            new = jnp.where(keep, result.astype(out.dtype), old)
            return lax.dynamic_update_slice_in_dim(out, new, start[i], 0)

        return lax.cond(valid[i] > 0, compute, lambda out: out, out)

    return lax.fori_loop(0, num_blocks, body, out)[:rows]


@jax.custom_vjp
def blocked_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The 'blocked' form (see the module doc): x [M, k], w [E, k, n] -> [M, n]."""
    return _per_block(x, lambda rows, g: rows @ w[g], w.shape[2], group_sizes)


def _blocked_fwd(x, w, group_sizes):
    return blocked_grouped_matmul(x, w, group_sizes), (x, w, group_sizes)


def _blocked_bwd(residuals, grad):
    x, w, group_sizes = residuals
    dx = _per_block(grad, lambda rows, g: rows @ w[g].T, w.shape[1], group_sizes)
    rows = x.shape[0]
    block = _block_rows(rows, w.shape[0])
    num_blocks, group, start, valid = _blocks(group_sizes, rows, block)
    x_padded = jnp.pad(x, ((0, block), (0, 0)))
    grad_padded = jnp.pad(grad, ((0, block), (0, 0)))

    def body(i, dw):
        def accumulate(dw):
            keep = (jnp.arange(block) < valid[i])[:, None]
            x_rows = jnp.where(keep, lax.dynamic_slice_in_dim(x_padded, start[i], block), 0)
            g_rows = lax.dynamic_slice_in_dim(grad_padded, start[i], block)
            update = jnp.einsum("bk,bn->kn", x_rows, g_rows,
                                preferred_element_type=jnp.float32)
            current = lax.dynamic_index_in_dim(dw, group[i], keepdims=False)
            return lax.dynamic_update_index_in_dim(dw, current + update, group[i], 0)

        return lax.cond(valid[i] > 0, accumulate, lambda dw: dw, dw)

    dw = lax.fori_loop(0, num_blocks, body, jnp.zeros(w.shape, jnp.float32))
    return dx, dw.astype(w.dtype), None


blocked_grouped_matmul.defvjp(_blocked_fwd, _blocked_bwd)


# --- 'mosaic_gpu': JAX's Hopper grouped kernels (jax.experimental.pallas.ops.gpu) ----------

# Tiles of JAX's Mosaic GPU ragged_dot kernels (bfloat16/float16 on Hopper); the contraction
# must be a multiple of _MGPU_K and the output columns of _MGPU_N, else 'blocked' runs.
# Chosen by `python -m moe.benchmarks.mgpu_tiles` on an H200 (2 x 32k rows, 1024 x 4096,
# fwd+bwd): 3.99 ms at E=8 and 4.71 ms at E=64, against 4.78 / 5.19 ms with grid_block_n=1,
# and 13.7 / 17.8 ms with block_n=256.
_MGPU_M, _MGPU_N, _MGPU_K = 128, 128, 64
MOSAIC_GPU_TILES = dict(block_m=_MGPU_M, block_n=_MGPU_N, block_k=_MGPU_K,
                        max_concurrent_steps=4, grid_block_n=8)


def _mgpu_tiles(x: jax.Array, w: jax.Array) -> dict | None:
    """The kernels' tiles for these shapes, or None where they do not fit (then 'blocked').

    The forward's output columns (n), dx's (k) and both contractions must be whole tiles; the
    column tile is block_n * grid_block_n, so grid_block_n shrinks until it divides both."""
    k, n = w.shape[1], w.shape[2]
    tiles = dict(MOSAIC_GPU_TILES)
    if not (x.dtype in (jnp.bfloat16, jnp.float16) and w.dtype == x.dtype):
        return None
    if k % tiles["block_k"] or n % tiles["block_k"] or k % tiles["block_m"]:
        return None
    while tiles["grid_block_n"] > 1 and (k % (tiles["block_n"] * tiles["grid_block_n"])
                                         or n % (tiles["block_n"] * tiles["grid_block_n"])):
        tiles["grid_block_n"] //= 2
    if k % tiles["block_n"] or n % tiles["block_n"]:
        return None
    return tiles


def _rows_computed(rows: int, group_sizes: jax.Array) -> jax.Array:
    return (jnp.arange(rows) < jnp.sum(group_sizes))[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mgpu(x: jax.Array, w: jax.Array, group_sizes: jax.Array, tiles: tuple) -> jax.Array:
    from jax.experimental.pallas.ops.gpu.ragged_dot_mgpu import ragged_dot

    out = ragged_dot(x, w, group_sizes=group_sizes, **dict(tiles))
    return jnp.where(_rows_computed(x.shape[0], group_sizes), out, jnp.zeros((), out.dtype))


def _mgpu_fwd(x, w, group_sizes, tiles):
    return _mgpu(x, w, group_sizes, tiles), (x, w, group_sizes)


def _mgpu_bwd(tiles, residuals, grad):
    from jax.experimental.pallas.ops.gpu.ragged_dot_mgpu import ragged_dot
    from jax.experimental.pallas.ops.gpu.transposed_ragged_dot_mgpu import (
        transposed_ragged_dot,
    )

    # The inputs' rows past the groups are not selected away (each select was a full pass
    # over `grad` or `x`): dx's kernel leaves them out and its output is selected; dw's
    # kernel multiplies the last group's block by a row mask.
    x, w, group_sizes = residuals
    dx = ragged_dot(grad, w, group_sizes=group_sizes, transpose_rhs=True, **dict(tiles))
    dx = jnp.where(_rows_computed(x.shape[0], group_sizes), dx, jnp.zeros((), dx.dtype))
    dw = transposed_ragged_dot(x, grad, group_sizes=group_sizes, **dict(tiles))
    return dx, dw.astype(w.dtype), None


_mgpu.defvjp(_mgpu_fwd, _mgpu_bwd)


def _hopper_gpu() -> bool:
    """Whether this process's GPU is a Hopper (compute capability 9.x), which the Mosaic GPU
    kernels are written for (wgmma); other GPUs run 'blocked'."""
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:
        return False
    return str(getattr(device, "compute_capability", "")).startswith("9.")


def mosaic_gpu_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The Hopper form: JAX's Mosaic GPU `ragged_dot` (forward, and dx with the kernels
    transposed) and `transposed_ragged_dot` (dw), all grouped. Shapes or dtypes its tiles do
    not fit run 'blocked'. Rows past sum(group_sizes) come out as zeros (output and dx, by
    select) and add nothing to dw as long as they are finite: the dw kernel masks them by a
    multiplication, so a NaN or Inf there would reach dw."""
    tiles = _mgpu_tiles(x, w)
    if tiles is None:
        return blocked_grouped_matmul(x, w, group_sizes)
    return _mgpu(x, w, group_sizes, tuple(sorted(tiles.items())))


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "blocked": blocked_grouped_matmul,
    "megablox": megablox_grouped_matmul,
    "mosaic_gpu": mosaic_gpu_grouped_matmul,
    "ragged_dot": _ragged_dot,
}


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                   implementation: str = "auto") -> jax.Array:
    """x [M, k] rows sorted by group, w [E, k, n], group_sizes [E] int32 -> [M, n].

    `implementation`: 'auto' (megablox on TPU, mosaic_gpu on a Hopper GPU, blocked elsewhere)
    or one of IMPLEMENTATIONS (benchmarks compare them).
    """
    group_sizes = group_sizes.astype(jnp.int32)
    if implementation == "auto":
        gpu = mosaic_gpu_grouped_matmul if _hopper_gpu() else blocked_grouped_matmul
        return lax.platform_dependent(x, w, group_sizes, tpu=megablox_grouped_matmul,
                                      cuda=gpu, default=blocked_grouped_matmul)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown grouped matmul {implementation!r}; choose 'auto' or one of "
                         f"{sorted(IMPLEMENTATIONS)}.")
    if implementation == "ragged_dot" and jax.default_backend() in ("cpu", "gpu"):
        _warn_dense_ragged_dot(w.shape[0], x.shape[0], w.shape[-1], jax.default_backend())
    return IMPLEMENTATIONS[implementation](x, w, group_sizes)


@functools.cache
def _warn_dense_ragged_dot(groups: int, rows: int, columns: int, backend: str) -> None:
    """Say once per shape that XLA lowers `ragged_dot` dense over the groups here."""
    logging.warning(
        "grouped_matmul='ragged_dot' on %s: XLA lowers it dense over the %d groups, %dx the "
        "grouped FLOPs with a [%d, %d, %d] intermediate (%.1f GiB in float32). "
        "grouped_matmul='auto' picks a grouped form for this backend.",
        backend, groups, groups, groups, rows, columns, groups * rows * columns * 4 / 2**30)
