"""Router state (auxiliary-loss-free balancing): a collection beside the parameters that the
trainer updates after each step from the step's global expert loads, checkpoints, restores onto
another mesh and passes to evaluation; never a parameter, never in the optimizer."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import checkpoints, evaluation
from moe.checkpoint_sources import flatten_params, resolve_state_dir
from moe.errors import ConfigurationError
from moe.models.config import SparseConfig
from moe.models.model import DecoderOnlyModel
from moe.orbax_arrays import metadata_tree, read_host_arrays
from moe.partitioning import Partitioner
from moe.routing import SigmoidTokenChoice
from moe.routing.shell import ROUTER_STATE
from moe.trainer import Trainer
from tests.models.helpers import lm_batch, tiny_config
from tests.trainer.test_cli import _losses, train_straight_and_killed

BATCH, LENGTH, EXPERTS = 8, 16, 4
SHAPES = {k: (BATCH, LENGTH) for k in
          ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")}
ROUTER = SigmoidTokenChoice(2, bias_update_rate=0.01, capacity_factor=2.0, fill_order="token")


def _model():
    sparse = SparseConfig(num_sparse_layers=1, num_experts=EXPERTS, router=ROUTER)
    config = tiny_config(num_encoder_layers=0, encoder_sparse=SparseConfig(),
                         decoder_sparse=sparse)
    return DecoderOnlyModel(config, aux_loss_factor=0.0)


def _trainer(partitions=2, **kw):
    kw.setdefault("learning_rate", 0.0)  # only the router state moves
    return Trainer(_model(), Partitioner(num_expert_partitions=partitions), SHAPES, **kw)


def _batch(trainer, seed=0):
    batch = lm_batch(seed, batch=BATCH, length=LENGTH)
    batch["decoder_loss_weights"] = np.ones((BATCH, LENGTH), np.int32)
    return trainer.partitioner.shard_batch(jax.device_get(batch))


def _bias(state):
    return np.asarray(state[ROUTER_STATE]["decoder"]["stack"]["layers_0"]["mlp"]["router"]
                      ["selection_bias"])


def _skewed(state):
    """The state with a selection bias that sends most tokens to expert 0."""
    router = state[ROUTER_STATE]["decoder"]["stack"]["layers_0"]["mlp"]["router"]
    router["selection_bias"] = jnp.array([0.3, 0.1, -0.1, -0.3])
    return state


def _imbalance(metrics):
    load = np.asarray(metrics["experts/expert_load"])
    return load.max() / load.mean()


def test_router_state_is_kept_beside_the_parameters_not_in_them():
    state = _trainer().init_state()
    assert _bias(state).shape == (EXPERTS,) and not _bias(state).any()
    assert "selection_bias" not in str(jax.tree_util.tree_structure(state["params"]))
    assert "selection_bias" not in str(jax.tree_util.tree_structure(state["opt_state"]))


def test_the_bias_balances_the_load_over_steps_without_an_auxiliary_loss():
    trainer = _trainer()
    state, batch = _skewed(trainer.init_state()), _batch(trainer)
    params = jax.device_get(state["params"])
    imbalance = []
    for _ in range(40):
        state, metrics = trainer.train_step(state, batch)
        imbalance.append(_imbalance(metrics))
    assert imbalance[0] > 1.5 and imbalance[-1] < 1.2, imbalance
    assert float(metrics["aux_loss"]) == 0.0
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, b)  # learning rate 0: only the bias moved
    assert _bias(state)[0] < 0.3 and _bias(state)[3] > -0.3


def test_the_update_sees_the_whole_batch_however_it_is_microbatched():
    whole, split = _trainer(), _trainer(num_microbatches=4)
    state = _skewed(whole.init_state())
    batch = _batch(whole, seed=3)
    after_whole, _ = whole.train_step(jax.tree.map(jnp.copy, state), batch)
    after_split, _ = split.train_step(jax.tree.map(jnp.copy, state), batch)
    np.testing.assert_array_equal(_bias(after_whole), _bias(after_split))
    assert not np.array_equal(_bias(after_whole), [0.3, 0.1, -0.1, -0.3])


def test_router_state_is_checkpointed_and_restored_onto_another_mesh(tmp_path):
    trainer = _trainer(partitions=2)
    state, batch = _skewed(trainer.init_state()), _batch(trainer)
    for _ in range(3):
        state, _ = trainer.train_step(state, batch)
    saver = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), period=1, async_save=False)
    saver.save(3, state, {}, force=True)
    saver.close()
    other = Trainer(_model(), Partitioner(devices=jax.devices()[:1]), SHAPES, learning_rate=0.0)
    restored, _ = checkpoints.Checkpointer(str(tmp_path / "checkpoints")).restore(
        other.abstract_state)
    np.testing.assert_array_equal(_bias(restored), _bias(state))
    # Evaluation and inference read it through the parameters' restore path.
    abstract = other.abstract_state[ROUTER_STATE]
    again = checkpoints.restore_router_state_from(str(tmp_path), abstract)
    np.testing.assert_array_equal(_bias({ROUTER_STATE: again}), _bias(state))
    # The state changes the routing, so evaluation must be given it.
    eval_batch = jax.device_get(_batch(trainer, seed=4))
    with_state = other.evaluate(restored["params"], [eval_batch], restored[ROUTER_STATE])
    fresh = other.evaluate(restored["params"], [eval_batch], other.init_state()[ROUTER_STATE])
    assert with_state["experts/expert_load"].tolist() != fresh["experts/expert_load"].tolist()
    with pytest.raises(ConfigurationError, match="router_state"):
        other.model.loss_fn(restored["params"], eval_batch, None)
    # eval/infer/logits restore it with the parameters, and scoring and logits depend on it.
    params, router_state = evaluation.restore_variables(
        other.model, str(tmp_path), other.partitioner, SHAPES)
    np.testing.assert_array_equal(_bias({ROUTER_STATE: router_state}), _bias(state))
    initial = other.init_state()[ROUTER_STATE]
    scores = [np.asarray(other.model.score_batch(params, eval_batch, router_state=s))
              for s in (router_state, initial)]
    assert not np.array_equal(*scores)
    logits = [np.asarray(other.model.compute_logits(params, eval_batch, router_state=s)[0])
              for s in (router_state, initial)]
    assert not np.array_equal(*logits)


def _final_router_state(model_dir):
    state_dir = resolve_state_dir(str(model_dir))
    stored = {f"{ROUTER_STATE}/{k}": (tuple(m.shape), m.dtype) for k, m in
              flatten_params(metadata_tree(state_dir)[ROUTER_STATE]).items()}
    return read_host_arrays(state_dir, stored)


@pytest.mark.slow
def test_sigkill_then_restart_gives_the_uninterrupted_losses_and_biases(tmp_path):
    common = [
        "--gin_file=models/decoder_only_deepseek_tiny.gin", "--gin_file=runs/pretrain.gin",
        "--gin.decoder/SigmoidTokenChoice.bias_update_rate=0.01", "--gin.AUX_LOSS_FACTOR=0.0",
        "--gin.DatasetConfig.module='tests.trainer.toy'",
        "--gin.MIXTURE_OR_TASK_NAME='toy_trainer_lm'", "--gin.TASK_FEATURE_LENGTHS={'targets': 16}",
        "--gin.BATCH_SIZE=8", "--gin.rsqrt_decay_schedule.warmup_steps=4",
        "--gin.TRAIN_STEPS=30", "--gin.LOG_PERIOD=1", "--gin.CHECKPOINT_PERIOD=10",
        "--gin.EVAL_PERIOD=1000",
    ]
    straight_dir, killed_dir, _, last_checkpoint = train_straight_and_killed(tmp_path, common, 15)
    assert last_checkpoint < 30
    a, b = _losses(straight_dir), _losses(killed_dir)
    assert sorted(a) == sorted(b) == list(range(1, 31))
    assert all(a[step] == b[step] for step in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    bias_a, bias_b = _final_router_state(straight_dir), _final_router_state(killed_dir)
    assert bias_a.keys() == bias_b.keys() and bias_a
    for name in bias_a:
        assert np.any(bias_a[name] != 0), name  # the bias did move
        np.testing.assert_array_equal(bias_a[name], bias_b[name])


def test_a_checkpoint_without_router_state_starts_from_the_initial_state(tmp_path, capsys):
    trainer = _trainer()
    state = trainer.init_state()
    checkpoints.save_params(str(tmp_path / "converted"), state["params"])  # params only
    abstract = trainer.abstract_state[ROUTER_STATE]
    restored = checkpoints.restore_router_state_from(str(tmp_path / "converted"), abstract)
    assert restored is abstract
    assert "holds no router state" in capsys.readouterr().out
    # A state of another shape is refused, naming it.
    other = Trainer(DecoderOnlyModel(tiny_config(
        num_encoder_layers=0, encoder_sparse=SparseConfig(),
        decoder_sparse=SparseConfig(num_sparse_layers=1, num_experts=8, router=ROUTER))),
        Partitioner(num_expert_partitions=2), SHAPES, learning_rate=0.0)
    saver = checkpoints.Checkpointer(str(tmp_path / "run" / "checkpoints"), period=1,
                                     async_save=False)
    saver.save(0, state, {}, force=True)
    saver.close()
    with pytest.raises(checkpoints.CheckpointError, match="selection_bias"):
        checkpoints.restore_router_state_from(str(tmp_path / "run"),
                                              other.abstract_state[ROUTER_STATE])
