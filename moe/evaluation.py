"""What `moe.eval`, `moe.infer` and the trainer's inference eval share.

- `restore_for_inference`: the checks, mesh and parameters both entry points start from. The
  parameters need only their shapes and shardings, from one abstract initialization of the
  model (`jax.eval_shape`): no optimizer, no compiled train step.
- `make_evaluator`: the one `seqio.Evaluator` of a run, and `evaluator_metrics`: its metrics as
  `{'<task>/<metric>': value}`, with the scores of the mixture as a whole that the task module
  computes (BIG-bench's aggregate of a task with subtasks).
- `make_predict_fn` / `make_score_fn`: the model's decoding and scoring with the signatures
  `seqio.Evaluator` expects (an enumerated dataset of model features in, `[(index, tokens)]` /
  `[(index, score)]` out), so evaluation and inference run the model the same way.

The task module (`DatasetConfig.module`, `seqio_tasks` by default) may define
`ensure_registered(name)` and `aggregate_metrics(name, {task: {metric: value}})`; both are
optional, so any module of seqio tasks works.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
import seqio
import tensorflow as tf

from moe import checkpoints, data, log_filters
from moe.errors import ConfigurationError
from moe.partitioning import Partitioner
from moe.routing.shell import ROUTER_STATE

# seqio.Evaluator's notice when it is given no result loggers (it logs through absl): the
# callers write the metrics themselves (`metrics.json`, the training metrics writer).
EMPTY_LOGGER_CLS_NOTICE = "'logger_cls' is empty so seqio.Evaluator will not log its results"


def task_module(cfg: data.DatasetConfig) -> ModuleType | None:
    """The module that registers `cfg`'s tasks, imported (it may register gin configurables)."""
    if not cfg.module:
        return None
    with gin.unlock_config():
        return importlib.import_module(cfg.module)


def abstract_variables(model: Any, partitioner: Partitioner,
                       input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:  # fmt: skip
    """The model's variables (`params`, and `router_state` if its routers keep state) as
    `jax.ShapeDtypeStruct`s in this mesh's shardings (router state replicated), from one
    abstract initialization (nothing is allocated or compiled)."""
    with partitioner.context():
        variables = jax.eval_shape(
            lambda rng: model.get_initial_variables(rng, input_shapes), jax.random.key(0)
        )
    boxed = variables["params"]
    out = {"params": jax.tree.map(
        lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        nn.meta.unbox(boxed),
        partitioner.get_shardings(boxed),
    )}
    if variables.get(ROUTER_STATE):
        replicated = partitioner.replicated_sharding
        out[ROUTER_STATE] = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
            nn.meta.unbox(variables[ROUTER_STATE]),
        )
    return out


def load_variables(model: Any, checkpoint_path: str, cfg: data.DatasetConfig,
                   partitioner: Partitioner, step: int | None = None
                   ) -> tuple[Any, Any]:  # fmt: skip
    """(parameters, router state or None) of the checkpoint at `checkpoint_path`, in this
    mesh's shardings."""
    converter = model.feature_converter_cls(pack=False)
    lengths = converter.get_model_feature_lengths(dict(cfg.task_feature_lengths))
    shapes = {name: (cfg.batch_size, length) for name, length in lengths.items()}
    return restore_variables(model, checkpoint_path, partitioner, shapes, step)


def restore_variables(model: Any, checkpoint_path: str, partitioner: Partitioner,
                      input_shapes: Mapping[str, tuple[int, ...]], step: int | None = None
                      ) -> tuple[Any, Any]:  # fmt: skip
    """(parameters, router state or None) of the checkpoint at `checkpoint_path` for a model
    initialized with `input_shapes`, in this mesh's shardings."""
    abstract = abstract_variables(model, partitioner, input_shapes)
    params, _ = checkpoints.restore_params_from(
        checkpoint_path, abstract["params"], step=step,
        model_config=getattr(model.module, "config", None),
    )  # fmt: skip
    router_state = None
    if ROUTER_STATE in abstract:
        router_state = checkpoints.restore_router_state_from(
            checkpoint_path, abstract[ROUTER_STATE], step
        )
    return params, router_state


@dataclasses.dataclass(frozen=True)
class Restored:
    """What evaluation and inference run from: the task, the mesh and the parameters."""

    task: seqio.Task | seqio.Mixture
    partitioner: Partitioner
    params: Any
    router_state: Any = None  # for models whose routers keep state


def restore_for_inference(
    model: Any,
    checkpoint_path: str,
    cfg: data.DatasetConfig,
    output_dir: str,
    num_expert_partitions: int = 1,
    num_model_partitions: int = 1,
    checkpoint_step: int | None = None,
) -> Restored:
    """Checks `output_dir` and the task before the (slow) restore, then restores the checkpoint
    onto a mesh of the given partitions."""
    checkpoints.directory_is_writable(output_dir)
    task = data.get_task(cfg)
    require_metric_fns(task, cfg)
    partitioner = Partitioner(num_expert_partitions, num_model_partitions)
    params, router_state = load_variables(model, checkpoint_path, cfg, partitioner,
                                          checkpoint_step)
    return Restored(task, partitioner, params, router_state)


def make_evaluator(model: Any, cfg: data.DatasetConfig,
                   num_examples: int | None = None) -> seqio.Evaluator:  # fmt: skip
    """The `seqio.Evaluator` of `cfg`'s split (its first `num_examples` examples per task),
    without its notice that it logs nothing; its other messages pass."""
    with log_filters.dropping("absl", EMPTY_LOGGER_CLS_NOTICE):
        return seqio.Evaluator(
            cfg.mixture_or_task_name,
            feature_converter=model.feature_converter_cls(pack=False),
            eval_split=cfg.split,
            use_cached=cfg.use_cached,
            sequence_length=dict(cfg.task_feature_lengths),
            num_examples=num_examples,
        )


def require_metric_fns(task: seqio.Task | seqio.Mixture, cfg: data.DatasetConfig) -> None:
    """Refuse a task that `seqio.Evaluator` would skip: it evaluates (and so predicts for) only
    tasks with metric functions, and would otherwise end with an empty result."""
    tasks = task.tasks if isinstance(task, seqio.Mixture) else [task]
    if not any(t.metric_fns for t in tasks):
        raise ConfigurationError(
            f"MIXTURE_OR_TASK_NAME={cfg.mixture_or_task_name!r} has no task with metric "
            f"functions on split {cfg.split!r}, so seqio.Evaluator has nothing to evaluate or "
            "predict. Use a task with metrics (GLUE, SuperGLUE, BIG-bench), not a pretraining "
            "task."
        )


def evaluator_metrics(
    evaluator: seqio.Evaluator,
    cfg: data.DatasetConfig,
    predict_fn: Callable[[tf.data.Dataset], list] | None,
    score_fn: Callable[[tf.data.Dataset], list] | None,
) -> dict[str, float]:
    """`{'<task>/<metric>': value}` of every evaluated task, plus `'<name>/<metric>'` for the
    scores of `cfg`'s mixture as a whole that the task module's `aggregate_metrics` gives."""
    results, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict_fn,
                                    score_fn=score_fn)  # fmt: skip
    by_task = {
        task_name: {metric: float(getattr(value, "value", value)) for metric, value in m.items()}
        for task_name, m in results.result().items()
    }
    metrics = {f"{t}/{metric}": value for t, m in by_task.items() for metric, value in m.items()}
    aggregate = getattr(task_module(cfg), "aggregate_metrics", None)
    if aggregate is not None:
        name = cfg.mixture_or_task_name
        metrics.update({f"{name}/{k}": v for k, v in aggregate(name, by_task).items()})
    return metrics


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    return np.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _batches(dataset: tf.data.Dataset, batch_size: int):
    """(indices, padded feature batch, number of real rows) from an enumerated dataset."""
    for indices, features in dataset.padded_batch(batch_size).as_numpy_iterator():
        n = len(indices)
        padded = {k: _pad_rows(v, batch_size) for k, v in features.items()}
        yield indices, padded, n


def _with_router_state(router_state: Any) -> dict[str, Any]:
    """The keyword a model method takes the router state by, for models that have one."""
    return {"router_state": router_state} if router_state else {}


def make_predict_fn(model: Any, params: Any, partitioner: Partitioner, batch_size: int,
                    router_state: Any = None,
                    **predict_kwargs) -> Callable[[tf.data.Dataset], list]:  # fmt: skip
    """A seqio `predict_fn`: greedy (or configured) decoding with `model.predict_batch`."""
    predict_kwargs.update(_with_router_state(router_state))

    def predict_fn(dataset):
        out = []
        for indices, batch, n in _batches(dataset, batch_size):
            with partitioner.context():
                tokens = model.predict_batch(params, batch, **predict_kwargs)
            tokens = np.asarray(jax.device_get(tokens))[:n]
            out += [(int(i), t.tolist()) for i, t in zip(indices, tokens)]
        return out

    return predict_fn


def make_score_fn(model: Any, params: Any, partitioner: Partitioner, batch_size: int,
                  router_state: Any = None) -> Callable[[tf.data.Dataset], list]:  # fmt: skip
    """A seqio `score_fn`: sum of target log-likelihoods with `model.score_batch`."""

    def score_fn(dataset):
        out = []
        for indices, batch, n in _batches(dataset, batch_size):
            with partitioner.context():
                scores = model.score_batch(params, batch, **_with_router_state(router_state))
            scores = np.asarray(jax.device_get(scores))[:n]
            out += [(int(i), float(s)) for i, s in zip(indices, scores)]
        return out

    return score_fn
