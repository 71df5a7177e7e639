"""The grouped matmul's TPU form (megablox, run here in interpret mode) computes what
`jax.lax.ragged_dot` computes, forward and gradients, including empty groups and rows past
the last group (zeros, with zero gradient: never NaN from memory the kernel did not write)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.grouped_matmul import grouped_matmul, megablox_grouped_matmul


@pytest.mark.parametrize("sizes", [(10, 0, 30, 25, 20), (0, 0, 85, 0, 0), (40, 30, 30, 0, 0)])
def test_megablox_equals_ragged_dot(sizes):
    rng = np.random.default_rng(0)
    rows, k, n = 100, 64, 96
    x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(len(sizes), k, n)), jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    used = sum(sizes)

    def megablox(x, w, s):
        return megablox_grouped_matmul(x, w, s, interpret=True)

    ours, reference = megablox(x, w, group_sizes), grouped_matmul(x, w, group_sizes)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-4)
    assert not np.any(np.asarray(ours[used:]))

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w, group_sizes)))

    grads = jax.grad(loss(megablox), argnums=(0, 1))(x, w)
    reference_grads = jax.grad(loss(grouped_matmul), argnums=(0, 1))(x, w)
    for ours_g, ref_g in zip(grads, reference_grads):
        assert np.all(np.isfinite(ours_g))
        np.testing.assert_allclose(ours_g, ref_g, rtol=1e-4, atol=1e-4)
    assert not np.any(np.asarray(grads[0][used:]))
