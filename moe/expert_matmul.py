"""The experts' batched matmul of capacity dispatch: x [E, ..., k] . w [E, k, n] -> [E, ..., n].

Each expert multiplies its buffer rows (groups x capacity: 32 rows per expert at 128 experts
for 4k tokens) by its own weight matrix. XLA:CPU runs that batched dot far below its dense
speed when the rows are few (it packs every weight matrix first: measured on 2 cores, one
expert's [32, 512] x [512, 2048] at 45 GFLOP/s against 156 at 4096 rows), and the many
experts' weight gradients then dominate a training step. `moe/kernels/expert_matmul.cc` is a
CPU kernel for exactly this shape: register-tiled outer products that read each weight matrix
once per product (forward, input gradient and weight gradient, behind a custom VJP). The
forward and the weight gradient skip rows of x that are all zero: the capacity slots that
dispatch left unfilled (a fifth of them at 128 experts, top-1, capacity factor 1, with a
freshly initialized router), whose products are zero.

Implementations:
- 'xla': `jnp.einsum` (every backend; XLA partitions it under any mesh).
- 'cpu_kernel': the C++ kernel (float32, CPU). Built on first use (`moe.cpu_kernels`); where it
  cannot be built, 'xla' runs and the log says why.
- 'auto': 'cpu_kernel' on the CPU when both operands are float32, each expert has at most
  `MAX_KERNEL_ROWS` rows (above that XLA's own dot is as fast: measured at 512 rows), no mesh
  with more than one device is active (an FFI call is not partitioned by XLA: under a mesh the
  einsum keeps its sharding), and the kernel is available; 'xla' everywhere else. The choice
  between CPU and other backends is made when the program is lowered
  (`jax.lax.platform_dependent`), so a TPU program compiled on a CPU machine gets the einsum.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moe import cpu_kernels

IMPLEMENTATIONS = ("xla", "cpu_kernel")
MAX_KERNEL_ROWS = 256
_TARGETS = (("moe_expert_matmul_nn", "MoeExpertMatmulNN"),
            ("moe_expert_matmul_nt", "MoeExpertMatmulNT"),
            ("moe_expert_matmul_tn", "MoeExpertMatmulTN"))
# The kernel's widest vector in floats (AVX-512); AVX2's and NEON's divide it.
_VECTOR_FLOATS = 16


def kernel_available() -> bool:
    """Whether the CPU kernel is built and registered (builds it on the first call)."""
    return cpu_kernels.load("expert_matmul", _TARGETS)


def _ffi(target: str, shape: tuple[int, ...], a: jax.Array, b: jax.Array) -> jax.Array:
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32),
                            vmap_method="sequential")
    return call(a, b)


@jax.custom_vjp
def _kernel_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [E, M, k], w [E, k, n] (float32) -> [E, M, n] by the CPU kernel."""
    return _ffi("moe_expert_matmul_nn", (*x.shape[:2], w.shape[2]), x, w)


def _kernel_fwd(x, w):
    return _kernel_matmul(x, w), (x, w)


def _kernel_bwd(residuals, grad):
    x, w = residuals
    experts, rows, k = x.shape
    # dx = grad . w^T as (w . grad^T)^T: the forward product with the weight rows as the
    # streamed operand (see the kernel's header). The token rows, dx^T's columns, are padded
    # to whole vectors, so that no column falls to the kernel's scalar tail.
    pad = -rows % _VECTOR_FLOATS
    padded = jnp.pad(grad, ((0, 0), (0, pad), (0, 0)))
    dx_t = _ffi("moe_expert_matmul_nt", (experts, k, rows + pad), w, padded)
    dx = jnp.swapaxes(dx_t[:, :, :rows], 1, 2)
    dw = _ffi("moe_expert_matmul_tn", w.shape, x, grad)
    return dx, dw


_kernel_matmul.defvjp(_kernel_fwd, _kernel_bwd)


def _einsum(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("emk,ekn->emn", x, w)


def _single_device_mesh() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def kernel_applies(x: jax.Array, w: jax.Array) -> bool:
    """The 'auto' rule's conditions that do not depend on the backend (see the module doc)."""
    rows = math.prod(x.shape[1:-1])
    return (x.dtype == jnp.float32 and w.dtype == jnp.float32 and rows <= MAX_KERNEL_ROWS
            and _single_device_mesh() and kernel_available())


def expert_matmul(x: jax.Array, w: jax.Array, implementation: str = "auto") -> jax.Array:
    """x [E, ..., k] (each expert's rows), w [E, k, n] -> [E, ..., n]."""
    if implementation not in ("auto", *IMPLEMENTATIONS):
        raise ValueError(f"Unknown expert_matmul {implementation!r}; choose 'auto' or one of "
                         f"{list(IMPLEMENTATIONS)}.")
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    if implementation == "xla" or (implementation == "auto" and not kernel_applies(x, w)):
        out = _einsum(rows, w)
    elif implementation == "cpu_kernel":
        if not kernel_available():
            raise RuntimeError("expert_matmul='cpu_kernel' was asked for but the CPU kernel "
                               "could not be built (the log says why); use 'auto' or 'xla'.")
        out = _kernel_matmul(rows.astype(jnp.float32), w.astype(jnp.float32)).astype(x.dtype)
    else:
        out = jax.lax.platform_dependent(rows, w, cpu=_kernel_matmul, default=_einsum)
    return out.reshape(*x.shape[:-1], w.shape[-1])
