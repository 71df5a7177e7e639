"""Fine-grained sparse upcycling: each dense MLP's hidden units split into a shared expert and
E routed experts, so that the sparse model computes the dense function at initialization,
then trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import checkpoints
from moe.checkpoint_errors import CheckpointError
from moe.models.param_count import abstract_params
from moe.partitioning import Partitioner
from moe.trainer import Trainer
from tests.interop.test_upcycling import upcycle_assignment_map
from tests.models.helpers import encdec_batch, init_params
from tests.models.test_gin_configs import load_model

# t5_1_1_tiny's MLP_DIM is 64: 1 shared expert of 16 units + 3 routed experts of 16.
FINE_GRAINED = [
    "NUM_ENCODER_SPARSE_LAYERS = 1", "NUM_DECODER_SPARSE_LAYERS = 1",
    "NUM_EXPERTS = 3", "EXPERT_MLP_DIM = 16", "NUM_SHARED_EXPERTS = 1",
    "encoder/SparseConfig.router = @encoder/SigmoidTokenChoice()",
    "decoder/SparseConfig.router = @decoder/SigmoidTokenChoice()",
    "SigmoidTokenChoice.num_selected_experts = 3", "SigmoidTokenChoice.routed_scaling_factor = 3.0",
    "SparseConfig.router_init_stddev = 0.0", "SparseConfig.dispatch = 'dropless'",
]


def _model(bindings=()):
    return load_model("t5_1_1_tiny", list(bindings))


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    model = _model()
    batch = encdec_batch(batch=2, inputs=8, targets=6, vocab=384)
    params = init_params(model, batch, seed=7)
    path = tmp_path_factory.mktemp("dense")
    checkpoints.save_params(str(path), params)
    return path, model, params


def test_upcycled_model_computes_the_dense_function_then_trains(dense_checkpoint):
    path, dense_model, dense_params = dense_checkpoint
    sparse_model = _model(FINE_GRAINED)
    batch = encdec_batch(seed=1, batch=3, inputs=8, targets=6, vocab=384)
    params, report = checkpoints.restore_params_from(
        str(path), init_params(sparse_model, batch), upcycle_assignment_map())
    layer = params["encoder"]["layers_1"]
    dense_wi = np.asarray(dense_params["encoder"]["layers_1"]["mlp"]["wi_0"])  # [32, 64]
    np.testing.assert_array_equal(layer["shared_experts"]["wi_0"], dense_wi[:, :16])
    np.testing.assert_array_equal(layer["mlp"]["expert"]["wi_0"][2], dense_wi[:, 48:])
    np.testing.assert_array_equal(layer["mlp"]["expert"]["wo"][0],
                                  dense_params["encoder"]["layers_1"]["mlp"]["wo"][16:32])
    assert report["encoder/layers_1/mlp/router/router_weights/w"] == "initialized"
    assert not np.any(layer["mlp"]["router"]["router_weights"]["w"])

    dense_logits = dense_model.compute_logits(dense_params, batch)[0]
    sparse_logits = sparse_model.compute_logits(params, batch)[0]
    # At every real target position (padding is never routed to experts, so the sparse layer
    # leaves padding positions to the shared experts; no real position attends to them).
    real = np.asarray(batch["decoder_loss_weights"], bool)
    np.testing.assert_allclose(np.asarray(sparse_logits)[real], np.asarray(dense_logits)[real],
                               atol=2e-5, rtol=1e-5)

    shapes = {k: v.shape for k, v in batch.items()}
    trainer = Trainer(sparse_model, Partitioner(devices=jax.devices()[:1]), shapes,
                      learning_rate=0.01)
    state = trainer.state_with_params(trainer.init_state(), params)
    losses = []
    for _ in range(5):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    assert np.any(jnp.asarray(state["params"]["encoder"]["layers_1"]["mlp"]["router"]
                              ["router_weights"]["w"]) != 0)  # the router learns


def test_slices_that_do_not_tile_the_dense_units_are_refused(dense_checkpoint):
    path, _, _ = dense_checkpoint
    # 1 shared + 2 routed experts of 16 units cover 48 of the 64 dense units.
    model = _model([*FINE_GRAINED, "NUM_EXPERTS = 2",
                    "SigmoidTokenChoice.num_selected_experts = 2"])
    with pytest.raises(CheckpointError, match="NUM_SHARED_EXPERTS"):
        checkpoints.restore_params_from(str(path), abstract_params(model),
                                        upcycle_assignment_map())
