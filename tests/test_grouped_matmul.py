"""Every grouped matmul form computes what `jax.lax.ragged_dot` computes, forward and
gradients, with empty groups, one-row groups, groups longer than a block, and rows past the
last group (zeros, with zero gradient: never NaN from memory a kernel did not write). The TPU
form (megablox) runs here in interpret mode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.grouped_matmul import (
    _block_rows,
    blocked_grouped_matmul,
    grouped_matmul,
    megablox_grouped_matmul,
)

FORMS = {
    "blocked": blocked_grouped_matmul,
    "megablox": functools.partial(megablox_grouped_matmul, interpret=True),
    "auto": grouped_matmul,
}
SIZES = [(10, 0, 30, 25, 20), (0, 0, 85, 0, 0), (40, 30, 30, 0, 0), (1, 1, 1, 1, 1),
         (0, 0, 0, 0, 0)]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("sizes", SIZES)
def test_equals_ragged_dot(form, sizes):
    fn = FORMS[form]
    rng = np.random.default_rng(0)
    rows, k, n = 100, 64, 96
    x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(len(sizes), k, n)), jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    used = sum(sizes)

    ours = jax.jit(fn)(x, w, group_sizes)
    reference = jax.lax.ragged_dot(x, w, group_sizes)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-4)
    assert not np.any(np.asarray(ours[used:]))

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w, group_sizes)))

    grads = jax.jit(jax.grad(loss(fn), argnums=(0, 1)))(x, w)
    reference_grads = jax.grad(loss(jax.lax.ragged_dot), argnums=(0, 1))(x, w)
    for ours_g, ref_g in zip(grads, reference_grads):
        assert np.all(np.isfinite(ours_g))
        np.testing.assert_allclose(ours_g, ref_g, rtol=1e-4, atol=1e-4)
    assert not np.any(np.asarray(grads[0][used:]))


def test_blocked_bfloat16_accumulates_weight_gradients_in_float32():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(512, 32)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(2, 32, 16)), jnp.bfloat16)
    sizes = jnp.asarray([500, 12], jnp.int32)  # one group of many blocks
    assert _block_rows(512, 2) < 500
    dw = jax.grad(lambda w: jnp.sum(blocked_grouped_matmul(x, w, sizes).astype(jnp.float32)))(w)
    reference = jax.grad(lambda w: jnp.sum(jax.lax.ragged_dot(
        x.astype(jnp.float32), w.astype(jnp.float32), sizes)))(w)
    assert dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dw, np.float32), reference, rtol=1e-2)


def test_unknown_implementation_names_the_choices():
    x, w = jnp.zeros((4, 2)), jnp.zeros((2, 2, 3))
    with pytest.raises(ValueError, match="'auto' or one of"):
        grouped_matmul(x, w, jnp.asarray([2, 2]), implementation="dense")


def test_forcing_the_dense_ragged_dot_says_so_once_with_its_cost(caplog):
    """On CPU XLA lowers ragged_dot dense over the groups: forcing it logs that once per shape
    with the intermediate's size; the grouped forms log nothing."""
    x, w, sizes = jnp.ones((64, 8)), jnp.ones((4, 8, 16)), jnp.asarray([16] * 4)
    with caplog.at_level("WARNING", logger="absl"):
        for _ in range(2):
            grouped_matmul(x, w, sizes, implementation="ragged_dot")
        grouped_matmul(x, w, sizes, implementation="blocked")
    warnings = [r.getMessage() for r in caplog.records if "ragged_dot" in r.getMessage()]
    assert len(warnings) == 1
    assert "dense over the 4 groups, 4x the grouped FLOPs with a [4, 64, 16]" in warnings[0]
