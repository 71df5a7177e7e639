"""The CPU expert-matmul kernel computes what XLA's batched dot computes, forward and both
gradients, over shapes with every tail (rows, contraction and columns that are not whole tiles
or vectors); the MoE layer with it equals the layer with the einsum; 'auto' picks it only where
the module doc says; and without a compiler everything still runs (on XLA's ops), with a clear
error where the kernel was asked for by name."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import expert_matmul as em
from moe.errors import ConfigurationError
from moe.moe_layer import MoeLayer
from moe.routing import TokenChoice

pytestmark = pytest.mark.skipif(not em.kernel_available(),
                                reason="no C++ compiler: the CPU kernel cannot be built")

# (experts, rows, k, n): whole tiles; rows not a multiple of the 6-row tile; columns with a
# partial panel and a scalar tail; a contraction shorter than one vector; one row; a weight
# gradient with rows of whole vectors (stored non-temporally) and a partial panel. Wide weights
# (n >= 512) at few rows are read in place 32 weight rows at a time: rows under a page (the
# tiles prefetch the next block) and of a page or more (they prefetch along the row), with a
# partial last block, a one-vector step and a scalar tail, 30 rows in tiles of 14, and the
# columns split in two chunks (30 rows x 8803 columns of output pass 1 MiB). The input
# gradient w . g^T packs g^T from g: over two panels (70 token rows), and at 520 token rows
# (w^T's rows are never read in place).
SHAPES = [(4, 32, 64, 128), (3, 13, 96, 72), (2, 7, 5, 37), (5, 1, 33, 17), (1, 40, 130, 200),
          (3, 11, 70, 80), (2, 9, 130, 530), (2, 30, 100, 563), (2, 9, 130, 1041),
          (1, 30, 70, 8803), (2, 70, 24, 40), (1, 520, 20, 12)]


def _loss(implementation):
    return lambda x, w: jnp.sum(jnp.sin(em.expert_matmul(x, w, implementation)))


_kernel_product = jax.jit(lambda x, w: em.expert_matmul(x, w, "cpu_kernel"))


def _assert_kernel_equals_einsum(x, w):
    """The kernel's product and both gradients equal the einsum's at precision HIGHEST."""
    ours = _kernel_product(x, w)
    reference = jnp.einsum("emk,ekn->emn", x, w, precision="highest")
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-4)
    grads = jax.jit(jax.grad(_loss("cpu_kernel"), argnums=(0, 1)))(x, w)
    with jax.default_matmul_precision("highest"):
        reference_grads = jax.grad(_loss("xla"), argnums=(0, 1))(x, w)
    for ours_g, ref_g in zip(grads, reference_grads):
        # float32 sums of up to 8803 terms in another order: an absolute tolerance that
        # follows the gradient's scale (1e-5 of its largest entry), not below 1e-4.
        atol = max(1e-4, 1e-5 * float(np.abs(ref_g).max()))
        np.testing.assert_allclose(ours_g, ref_g, rtol=1e-4, atol=atol)
    return ours


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_einsum_forward_and_gradients(shape):
    experts, rows, k, n = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(experts, rows, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(experts, k, n)), jnp.float32)
    _assert_kernel_equals_einsum(x, w)


# The forward and the weight gradient skip x's zero rows (capacity slots left unfilled): every
# third row of the first expert zero, the second expert's rows all zero, the last expert's
# none; read in place (32 and 30 rows, wide w), packed (70 rows), in row blocks (one expert,
# 520 rows, split across the threads) and with tails.
ZERO_ROW_SHAPES = [(3, 32, 64, 600), (3, 30, 100, 563), (3, 70, 24, 40), (1, 520, 20, 12),
                   (3, 13, 96, 72)]


@pytest.mark.parametrize("shape", ZERO_ROW_SHAPES)
def test_zero_rows_are_skipped_and_give_zero_rows(shape):
    experts, rows, k, n = shape
    rng = np.random.default_rng(1)
    x = rng.normal(size=(experts, rows, k))
    x[0, ::3] = 0
    x[1:2] = 0
    w = jnp.asarray(rng.normal(size=(experts, k, n)), jnp.float32)
    ours = _assert_kernel_equals_einsum(jnp.asarray(x, jnp.float32), w)
    zero_rows = ~np.any(x != 0, axis=-1)
    assert zero_rows.sum() >= rows // 3
    assert np.all(np.asarray(ours)[zero_rows] == 0)


def test_zero_rows_are_not_computed():
    # The one place a skipped row shows: times an infinite weight (forward) or an infinite
    # gradient (weight gradient) it would give NaN, skipped it adds exactly zero.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 32, 64)).astype(np.float32)
    x[:, 7] = 0
    w = rng.normal(size=(2, 64, 600)).astype(np.float32)
    w_inf = w.copy()
    w_inf[:, 3, 5] = np.inf
    y = np.asarray(_kernel_product(x, w_inf))
    assert np.all(y[:, 7] == 0) and np.isinf(y[:, :7, 5]).all()
    _, vjp = jax.vjp(lambda w: em.expert_matmul(jnp.asarray(x), w, "cpu_kernel"),
                     jnp.asarray(w))
    cotangent = rng.normal(size=(2, 32, 600)).astype(np.float32)
    cotangent[:, 7, 11] = np.inf
    (dw,) = vjp(jnp.asarray(cotangent))
    assert np.isfinite(np.asarray(dw)).all()


def test_a_row_with_a_nan_is_not_skipped():
    x = np.zeros((2, 32, 64), np.float32)
    x[:, 5, 17] = np.nan
    x[:, 9] = 1.0
    w = jnp.ones((2, 64, 600), jnp.float32)
    y = np.asarray(_kernel_product(x, w))
    assert np.all(np.isnan(y[:, 5])) and np.all(y[:, 9] == 64.0)
    assert np.all(np.delete(y, [5, 9], axis=1) == 0)


def test_buffers_with_group_and_capacity_axes_keep_their_shape():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 3, 5, 16)), jnp.float32)  # [E, G, C, d]
    w = jnp.asarray(rng.normal(size=(4, 16, 24)), jnp.float32)
    ours = em.expert_matmul(x, w, "cpu_kernel")
    assert ours.shape == (4, 3, 5, 24)
    np.testing.assert_allclose(ours, jnp.einsum("egcd,edf->egcf", x, w, precision="highest"),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k", [1, 2])
def test_layer_with_the_kernel_equals_the_layer_with_the_einsum(k):
    x = jax.random.normal(jax.random.key(0), (2, 64, 32))
    router = TokenChoice(k, capacity_factor=1.0)

    def run(implementation):
        layer = MoeLayer(8, 48, router=router, activation="gated-gelu", max_group_size=32,
                         expert_matmul=implementation)
        variables = nn.meta.unbox(layer.init(jax.random.key(1), x))

        def loss(params, x):
            return jnp.sum(layer.apply({**variables, "params": params}, x) ** 2)

        with jax.default_matmul_precision("highest"):
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables["params"], x)

    (value, grads), (ref_value, ref_grads) = run("cpu_kernel"), run("xla")
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for ours_g, ref_g in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(ours_g, ref_g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["index", "mask"])
def test_the_layer_passes_its_choice_to_the_experts(dispatch):
    x = jnp.zeros((2, 32, 16))

    def lowered(**kwargs):
        layer = MoeLayer(4, 24, activation="relu", dispatch=dispatch, max_group_size=32,
                         **kwargs)
        params = nn.meta.unbox(layer.init(jax.random.key(0), x))["params"]
        loss = lambda p: jnp.sum(layer.apply({"params": p}, x))
        return jax.jit(jax.grad(loss)).lower(params).as_text()

    kernel = lowered()  # 'auto': float32, 16 rows per expert, no mesh
    assert all(f"moe_expert_matmul_{p}" in kernel for p in ("nn", "nt", "tn"))
    assert "moe_expert_matmul" not in lowered(expert_matmul="xla")


def _lowered(x, w, implementation="auto"):
    return jax.jit(lambda x, w: em.expert_matmul(x, w, implementation)).lower(x, w).as_text()


def test_auto_picks_the_kernel_only_where_it_pays():
    w = jnp.zeros((4, 16, 8), jnp.float32)
    small = jnp.zeros((4, 2, em.MAX_KERNEL_ROWS // 2, 16), jnp.float32)
    assert "moe_expert_matmul_nn" in _lowered(small, w)
    # Too many rows per expert, or not float32: XLA's dot.
    large = jnp.zeros((4, em.MAX_KERNEL_ROWS + 1, 16), jnp.float32)
    assert "moe_expert_matmul" not in _lowered(large, w)
    assert "moe_expert_matmul" not in _lowered(small.astype(jnp.bfloat16),
                                               w.astype(jnp.bfloat16))
    # Under a mesh of several devices the einsum keeps its sharding.
    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    with jax.set_mesh(mesh):
        assert "moe_expert_matmul" not in _lowered(small, w)
    # Asked for by name, the backward runs both gradients on the kernel: the input gradient
    # (w . g^T, g^T packed by the kernel from g itself) and the weight gradient.
    grad = jax.jit(jax.grad(_loss("cpu_kernel"), argnums=(0, 1))).lower(small, w).as_text()
    assert [grad.count(f"moe_expert_matmul_{p}") for p in ("nn", "nt", "tn")] == [1, 1, 1]


def test_a_tpu_program_lowered_here_gets_the_einsum():
    x = jnp.zeros((4, 32, 16), jnp.float32)
    w = jnp.zeros((4, 16, 8), jnp.float32)
    text = jax.jit(lambda x, w: em.expert_matmul(x, w)).trace(x, w).lower(
        lowering_platforms=("tpu",)).as_text()
    assert "moe_expert_matmul" not in text and "dot_general" in text


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="choose 'auto' or one of"):
        em.expert_matmul(jnp.zeros((1, 2, 3)), jnp.zeros((1, 3, 4)), "blas")
    layer = MoeLayer(4, 8, expert_matmul="blas")
    with pytest.raises(ConfigurationError, match="Unknown expert_matmul 'blas'"):
        layer.check_config()


def _run_without_kernel(tmp_path, env_update):
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from moe import expert_matmul as em
        x, w = jnp.ones((2, 4, 8)), jnp.ones((2, 8, 3))
        print("available", em.kernel_available())
        print("auto", float(em.expert_matmul(x, w).sum()))
        print("lowered", "moe_expert_matmul" in jax.jit(em.expert_matmul).lower(x, w).as_text())
        try:
            em.expert_matmul(x, w, "cpu_kernel")
        except RuntimeError as error:
            print("error", error)
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MOE_CACHE_DIR": str(tmp_path), **env_update}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("env", [{"MOE_CPU_KERNELS": "off"}, {"CXX": "false"}],
                         ids=["turned-off", "compiler-fails"])
def test_without_the_kernel_everything_runs_on_xla(tmp_path, env):
    result = _run_without_kernel(tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert "available False" in result.stdout
    assert "auto 192.0" in result.stdout  # 2 experts x 4 rows x 3 columns x (8 x 1 x 1)
    assert "lowered False" in result.stdout
    assert "error expert_matmul='cpu_kernel' was asked for" in result.stdout
    if "CXX" in env:
        assert "could not be built" in result.stderr
        assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written kept


def test_the_built_library_is_reused(tmp_path, monkeypatch):
    from moe import cpu_kernels

    monkeypatch.setenv("MOE_CACHE_DIR", str(tmp_path))
    first = cpu_kernels._build("expert_matmul")
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels._build("expert_matmul") == first
    assert first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left
