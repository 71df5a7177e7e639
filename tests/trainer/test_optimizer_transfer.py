"""Adafactor's statistics carried over from INITIAL_CHECKPOINT_PATH: from one of ours, a
continued run takes exactly the step the uninterrupted one takes; from a T5X checkpoint, each
statistic lands on the axes it averages (T5X's layout and naming rules); when they do not
fit, the optimizer starts fresh and says why."""

import functools

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from moe import checkpoints, optimizer_transfer, optimizers
from moe.checkpoint_sources import flatten_params
from moe.interop.flaxformer_names import flaxformer_name
from moe.partitioning import Partitioner
from moe.trainer import Trainer
from tests.interop.fixtures import T5X_TINY, require
from tests.trainer.toy import ToyModel

SHAPES = {"decoder_input_tokens": (8, 16), "decoder_target_tokens": (8, 16),
          "decoder_loss_weights": (8, 16)}


@pytest.fixture(autouse=True)
def _small_factoring():
    """Factor every toy matrix (the toy's dimensions are below T5X's 128)."""
    gin.clear_config()
    gin.bind_parameter("adafactor.min_dim_size_to_factor", 4)
    yield
    gin.clear_config()


def _trainer():
    return Trainer(model=ToyModel(), partitioner=Partitioner(2, 1), input_shapes=SHAPES,
                   learning_rate=optimizers.constant_schedule(1e-2))


def _batch(i):
    rng = np.random.default_rng(i)
    tokens = rng.integers(2, 32, size=(8, 16)).astype(np.int32)
    return {"decoder_input_tokens": tokens, "decoder_target_tokens": np.roll(tokens, -1, 1),
            "decoder_loss_weights": np.ones((8, 16), np.int32)}


def _factored(state):
    location = optimizer_transfer._factored_state_path(state["opt_state"])
    return optimizer_transfer._get(state["opt_state"], location)


def test_continuing_from_our_checkpoint_takes_the_uninterrupted_step(tmp_path):
    trainer = _trainer()
    state = trainer.init_state()
    for i in range(2):
        state, _ = trainer.train_step(state, trainer.partitioner.shard_batch(_batch(i)))
    saver = checkpoints.Checkpointer(str(tmp_path / "run" / "checkpoints"), period=1,
                                     async_save=False)
    saver.save(2, state, {}, force=True)
    saver.close()
    uninterrupted, _ = trainer.train_step(state, trainer.partitioner.shard_batch(_batch(2)))

    fresh = _trainer()
    new = fresh.init_state()
    params, _ = checkpoints.restore_params_from(str(tmp_path / "run"), new["params"])
    new = fresh.state_with_params(new, params)
    new, line = optimizer_transfer.carry_over_statistics(new, str(tmp_path / "run"),
                                                         fresh.factor_specs)
    assert "carried over" in line
    assert int(_factored(new).count) == 2
    continued, _ = fresh.train_step(new, fresh.partitioner.shard_batch(_batch(2)))
    for a, b in zip(jax.tree.leaves(uninterrupted["params"]), jax.tree.leaves(continued["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # Without the statistics the step differs: the test would notice a transfer that did nothing.
    plain = fresh.state_with_params(fresh.init_state(), params)
    differs, _ = fresh.train_step(plain, fresh.partitioner.shard_batch(_batch(2)))
    assert any(not np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree.leaves(uninterrupted["params"]), jax.tree.leaves(differs["params"])))


def _t5x_keeps(name, shape):
    """T5X's Adafactor: the axes its v_row keeps (heuristic for matrices, MoE rules for
    expert kernels); written out independently of the code under test."""
    if len(shape) == 3:  # [E, in, out]: expert = batch, the embedding axis = row
        return (0, 2) if name.split("/")[-2] == "wo" else (0, 1)
    largest = int(np.argsort(shape, kind="stable")[-1])
    return tuple(i for i in range(len(shape)) if i != largest)


def _mean_keeping(x, kept):
    return x.mean(axis=tuple(i for i in range(x.ndim) if i not in kept))


def test_t5x_statistics_land_on_the_axes_they_average(tmp_path):
    trainer = _trainer()
    state = trainer.init_state()
    params = {k: np.asarray(v) for k, v in flatten_params(state["params"]).items()}
    rng = np.random.default_rng(0)
    squares = {k: rng.uniform(0.5, 2.0, size=v.shape).astype(np.float32)
               for k, v in params.items()}
    # A T5X train state (Orbax layout) whose statistics average `squares` as T5X does.
    target, param_states = {}, {}
    for name, value in params.items():
        ff = flaxformer_name(name)
        target[ff] = value
        kept_row = _t5x_keeps(ff, value.shape)
        # v_col keeps the batch axes and the factored axis v_row averages over.
        kept_col = (0, 3 - kept_row[1]) if value.ndim == 3 else tuple(
            i for i in range(value.ndim) if i not in kept_row)
        param_states[ff] = {"v_row": _mean_keeping(squares[name], kept_row),
                            "v_col": _mean_keeping(squares[name], kept_col),
                            "v": np.zeros((1,), np.float32), "m": np.zeros((1,), np.float32)}

    nest = functools.partial(traverse_util.unflatten_dict, sep="/")
    train_state = {"target": nest(target),
                   "state": {"step": np.asarray(7, np.int32), "param_states": nest(param_states)}}
    step_dir = tmp_path / "t5x_model" / "checkpoint_7"
    ocp.PyTreeCheckpointer().save(step_dir / "state", train_state)

    state, line = optimizer_transfer.carry_over_statistics(
        state, str(step_dir.parent), trainer.factor_specs)
    assert "carried over" in line, line
    factored = _factored(state)
    assert int(factored.count) == 7
    specs = {"/".join(str(getattr(k, "key", k)) for k in p): s for p, s in
             jax.tree_util.tree_flatten_with_path(
                 trainer.factor_specs, is_leaf=lambda x: isinstance(x, tuple))[0]}
    rows = flatten_params(factored.v_row)
    cols = flatten_params(factored.v_col)
    for name, g2 in squares.items():
        spec = specs[name]
        col_axes = tuple(i for i, r in enumerate(spec) if r == optimizers.COL)
        row_axes = tuple(i for i, r in enumerate(spec) if r == optimizers.ROW)
        np.testing.assert_allclose(np.asarray(rows[name]), g2.mean(col_axes, keepdims=True),
                                   rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(np.asarray(cols[name]), g2.mean(row_axes, keepdims=True),
                                   rtol=1e-6, err_msg=name)


def test_t5x_statistics_factored_otherwise_start_fresh():
    """The tiny T5X checkpoint factors its expert kernels (T5X's MoE rules) where ours, below
    128 dimensions, does not: the optimizer starts fresh, saying why."""
    from moe.interop import t5x_gin
    from moe.interop.model_gin import build_model

    fixture = require(T5X_TINY)
    gin.clear_config()
    model = build_model(t5x_gin.translate_gin_file(str(fixture / "gin" / "model.gin")))
    shapes = {"encoder_input_tokens": (2, 8), "decoder_input_tokens": (2, 8),
              "decoder_target_tokens": (2, 8)}
    trainer = Trainer(model=model, partitioner=Partitioner(1, 1), input_shapes=shapes)
    state = trainer.init_state()
    params, _ = checkpoints.restore_params_from(str(fixture / "checkpoint_30"), state["params"])
    state = trainer.state_with_params(state, params)
    before = jax.tree.map(np.asarray, _factored(state))
    state, line = optimizer_transfer.carry_over_statistics(
        state, str(fixture / "checkpoint_30"), trainer.factor_specs)
    assert "not used" in line and "factored" in line and "starts fresh" in line, line
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(_factored(state))):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_another_optimizer_starts_fresh(tmp_path):
    trainer = Trainer(model=ToyModel(), partitioner=Partitioner(2, 1), input_shapes=SHAPES,
                      optimizer=functools.partial(optimizers.build_optimizer,
                                                  optimizer=optimizers.adamw))
    state = trainer.init_state()
    saver = checkpoints.Checkpointer(str(tmp_path / "c"), period=1, async_save=False)
    saver.save(1, state, {}, force=True)
    saver.close()
    _, line = optimizer_transfer.carry_over_statistics(state, str(tmp_path / "c"),
                                                       trainer.factor_specs)
    assert "not Adafactor" in line
