"""The global-batch balance loss (`TokenChoice(balance_scope='batch')`) under microbatching:
the trainer counts the whole step's routing in a forward pass first, so a step split into
microbatches has the whole batch's balance loss and gradients; models without such a router
compile no extra pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.models.config import SparseConfig
from moe.models.model import DecoderOnlyModel
from moe.partitioning import Partitioner
from moe.routing import TokenChoice
from moe.trainer import Trainer
from tests.models.helpers import lm_batch, tiny_config

BATCH, LENGTH, MICRO = 8, 16, 4
SHAPES = {k: (BATCH, LENGTH) for k in
          ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")}
# No drops (capacity 8x): a token's routing does not depend on how the batch is split.
BATCH_SCOPE = TokenChoice(2, capacity_factor=8.0, fill_order="token", balance_scope="batch")
GROUP_SCOPE = TokenChoice(2, capacity_factor=8.0, fill_order="token")
# Real target tokens per row; microbatch i holds rows i and i + 4, so the microbatches hold
# 32, 11, 28 and 26 real tokens: a per-microbatch count differs from the batch's.
REAL_LENGTHS = np.array([16, 4, 16, 10, 16, 7, 12, 16])


def _model(router, scan_layers=False):
    sparse = SparseConfig(num_sparse_layers=2, num_experts=4, router=router)
    config = tiny_config(num_encoder_layers=0, encoder_sparse=SparseConfig(),
                         decoder_sparse=sparse, num_decoder_layers=2, scan_layers=scan_layers)
    # A large factor, so that the balance loss weighs in the gradients.
    return DecoderOnlyModel(config, aux_loss_factor=1.0)


class _PerMicrobatch:
    """The model without `batch_counts`: each microbatch counts only itself (the behaviour
    before the trainer's counting pass)."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        if name == "batch_counts":
            raise AttributeError(name)
        return getattr(self._model, name)


def _trainer(model, num_microbatches=1):
    return Trainer(model, Partitioner(num_expert_partitions=2), SHAPES,
                   num_microbatches=num_microbatches)


def _params(trainer):
    """Initial parameters with larger router kernels: uneven router probabilities, so f and
    P differ between microbatches and the batch (at init P is nearly uniform, and the loss
    nearly k whatever f is)."""
    params = trainer.init_state()["params"]

    def scale(path, x):
        return x * 50.0 if "router" in jax.tree_util.keystr(path) else x

    return jax.tree_util.tree_map_with_path(scale, params)


def _batch(trainer, padded=True):
    """Rows with padding (`REAL_LENGTHS`); loss weights 1 everywhere, so each microbatch's
    token loss has the same normalizer and only the routing can tell the splits apart."""
    batch = jax.device_get(lm_batch(0, batch=BATCH, length=LENGTH))
    targets = np.asarray(batch["decoder_target_tokens"])
    if padded:
        targets = np.where(np.arange(LENGTH) < REAL_LENGTHS[:, None], targets, 0)
    return trainer.partitioner.shard_batch({
        "decoder_input_tokens": np.asarray(batch["decoder_input_tokens"]),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones((BATCH, LENGTH), np.int32),
    })


def _loss_and_grads(trainer):
    """The trainer's gradients and metrics of a batch, compiled without XLA's backend
    optimizations (half the compile time on CPU)."""
    return jax.jit(trainer._loss_and_grads,
                   compiler_options={"xla_backend_optimization_level": 0})


def _max_difference(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


@pytest.mark.parametrize("scan_layers", [False, True], ids=["layers", "scan_layers"])
def test_microbatched_step_has_the_whole_batch_balance_loss_and_gradients(scan_layers):
    model = _model(BATCH_SCOPE, scan_layers)
    whole = _trainer(model)
    params, batch, key = _params(whole), _batch(whole), jax.random.key(0)
    g1, m1 = _loss_and_grads(whole)(params, batch, key)
    g4, m4 = _loss_and_grads(_trainer(model, MICRO))(params, batch, key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g4)
    aux_names = [n for n in m1 if n == "aux_loss" or n.startswith("experts/auxiliary_loss")]
    assert len(aux_names) == 4  # the loss, the mean and both layers
    for name in aux_names:
        np.testing.assert_allclose(m1[name], m4[name], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)

    if scan_layers:
        return
    # Counting each microbatch alone gives another loss and other gradients: the equalities
    # above are the counting pass's doing.
    per_microbatch = _trainer(_PerMicrobatch(model), MICRO)
    g_old, m_old = _loss_and_grads(per_microbatch)(params, batch, key)
    assert abs(float(m_old["aux_loss"]) - float(m1["aux_loss"])) > 1e-3
    assert _max_difference(g_old, g1) > 100 * _max_difference(g4, g1)


def test_group_scope_steps_compile_no_counting_pass():
    """Without a 'batch' router the microbatched step is the one it was: the same program as
    for a model that has no counting pass at all, with one loop over microbatches."""
    trainer = _trainer(_model(GROUP_SCOPE), MICRO)
    params, batch, key = trainer.init_state()["params"], _batch(trainer), jax.random.key(0)

    def program(t):
        return jax.make_jaxpr(t._loss_and_grads)(params, batch, key)

    def loops(jaxpr):
        return [e.primitive.name for e in jaxpr.jaxpr.eqns].count("scan")

    group = program(trainer)
    assert str(group) == str(program(_trainer(_PerMicrobatch(_model(GROUP_SCOPE)), MICRO)))
    assert loops(group) == 1
    assert loops(program(_trainer(_model(BATCH_SCOPE), MICRO))) == 2  # counting, gradients
    # Without microbatching the batch is its own count: no extra pass either.
    assert loops(program(_trainer(_model(BATCH_SCOPE)))) == 0


class _ShowsGivenCounts(_PerMicrobatch):
    """The model, reporting as a metric the f each gradient pass was given."""

    def __getattr__(self, name):
        return getattr(self._model, name)

    def loss_fn(self, params, batch, dropout_rng, batch_counts=None):
        loss, metrics = self._model.loss_fn(params, batch, dropout_rng, batch_counts=batch_counts)
        counts = batch_counts["decoder"]["stack"]["layers_0"]["mlp"]["router"]
        return loss, {**metrics, "given_f": counts["selected"] / counts["tokens"]}


def test_the_counting_pass_routes_with_each_gradient_pass_randomness():
    """Jitter and sampled second experts select with the microbatch's key in both passes: the
    f given to the gradient passes is the one they route (their measured expert loads)."""
    noisy = TokenChoice(2, capacity_factor=8.0, fill_order="token", balance_scope="batch",
                        jitter_noise=0.5, second_expert_policy="sampling")
    trainer = _trainer(_ShowsGivenCounts(_model(noisy)), MICRO)
    params, batch = _params(trainer), _batch(trainer, padded=False)
    _, metrics = _loss_and_grads(trainer)(params, batch, jax.random.key(0))
    # Equal microbatches: the mean of their expert loads (shares of the 2 choices per token)
    # is the batch's.
    load = metrics["experts/expert_load/decoder/stack/layers_0/mlp"]
    np.testing.assert_allclose(metrics["given_f"] / 2, load, rtol=1e-6)
