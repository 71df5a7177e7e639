"""seqio datasets for the trainer: feature-converted, per-host, deterministic and resumable.

A dataset is described by a `DatasetConfig` (T5X's names). Batches come out as dicts of numpy
arrays holding this host's slice of the global batch (`seqio.ShardInfo` from the partitioner's
data layout).

Resumption: the dataset is a pure function of (config, seed, shard): the same seed gives the
same shuffle and the same span-corruption noise. `ResumableIterator` counts the batches it has
handed out; that count is saved with each checkpoint, and a restarted run rebuilds the dataset
and skips that many batches, so it continues on exactly the examples it would have seen.
"""

import contextlib
import dataclasses
import difflib
import functools
import importlib
import queue
import threading
from collections.abc import Callable, Mapping

import gin
import numpy as np
import seqio
import tensorflow as tf

from moe.errors import ConfigurationError


class UnknownTaskError(ConfigurationError):
    """MIXTURE_OR_TASK_NAME names no registered seqio task or mixture."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """Which seqio data to read and how (T5X's `utils.DatasetConfig`).

    `module` is imported first so that its tasks register (default: this project's
    `seqio_tasks`). `num_epochs=None` repeats forever (training).
    """

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    split: str = "train"
    batch_size: int = 8
    shuffle: bool = True
    seed: int | None = 0
    pack: bool = False
    use_cached: bool = False
    num_epochs: int | None = None
    module: str | None = "seqio_tasks"


def get_task(cfg: DatasetConfig) -> seqio.Task | seqio.Mixture:
    """The registered task or mixture of `cfg`, or an error listing close names.

    The task module may define `ensure_registered(name)`: it registers the task `name` refers
    to from the configuration parsed by now (a BIG-bench folder bound in gin, which the module
    could not know when a gin file imported it).
    """
    if cfg.module:
        with gin.unlock_config():  # the module may register gin configurables of its own
            module = importlib.import_module(cfg.module)
        getattr(module, "ensure_registered", lambda name: None)(cfg.mixture_or_task_name)
    try:
        return seqio.get_mixture_or_task(cfg.mixture_or_task_name)
    except ValueError as e:
        names = sorted(seqio.TaskRegistry.names()) + sorted(seqio.MixtureRegistry.names())
        close = difflib.get_close_matches(cfg.mixture_or_task_name, names, n=5)
        raise UnknownTaskError(
            f"MIXTURE_OR_TASK_NAME={cfg.mixture_or_task_name!r} is not a registered seqio task "
            f"or mixture (module {cfg.module!r} imported). Close names: {close}. "
            f"{len(names)} are registered."
        ) from e


def get_dataset(
    cfg: DatasetConfig,
    feature_converter: seqio.FeatureConverter,
    shard_id: int = 0,
    num_shards: int = 1,
    drop_remainder: bool = True,
) -> tf.data.Dataset:
    """This host's batches of model features (`batch_size // num_shards` examples each).

    With `drop_remainder=False` (evaluation), the last partial batch is padded with all-zero
    examples, which carry zero loss weight.
    """
    if cfg.batch_size % num_shards:
        raise ConfigurationError(
            f"BATCH_SIZE={cfg.batch_size} is not divisible by the {num_shards} data shards "
            "(hosts); choose a multiple of it."
        )
    get_task(cfg)
    ds = seqio.get_dataset(
        cfg.mixture_or_task_name,
        task_feature_lengths=dict(cfg.task_feature_lengths),
        feature_converter=feature_converter,
        dataset_split=cfg.split,
        use_cached=cfg.use_cached,
        shuffle=cfg.shuffle,
        num_epochs=cfg.num_epochs,
        shard_info=seqio.ShardInfo(shard_id, num_shards) if num_shards > 1 else None,
        seed=cfg.seed,
        verbose=False,
    )
    per_host = cfg.batch_size // num_shards
    if drop_remainder:
        return ds.batch(per_host, drop_remainder=True)
    return ds.padded_batch(per_host).map(functools.partial(_pad_batch, size=per_host))


def _pad_batch(batch, size):
    def pad(x):
        missing = size - tf.shape(x)[0]
        paddings = tf.concat([[[0, missing]], tf.zeros([tf.rank(x) - 1, 2], tf.int32)], 0)
        return tf.pad(x, paddings)

    return {k: pad(v) for k, v in batch.items()}


class ResumableIterator:
    """Numpy batches from `make_dataset()`, resumable at a saved number of batches consumed.

    A background thread builds the dataset and keeps `prefetch` batches ready, so that the
    input pipeline starts while the model compiles and loads while the step runs. Only the
    batches handed out by `__next__` count as consumed. `close()` stops the thread and waits
    for it: a thread still inside TensorFlow when the interpreter exits aborts the process
    (a run resumed at its last step consumes no batch and would exit while the thread is
    still building the dataset).
    """

    _END = object()

    def __init__(self, make_dataset: Callable[[], tf.data.Dataset], batches_consumed: int = 0,
                 prefetch: int = 2):
        self.batches_consumed = int(batches_consumed)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(make_dataset, self.batches_consumed), daemon=True
        )
        self._thread.start()

    def _produce(self, make_dataset, skip):
        try:
            for batch in make_dataset().skip(skip).as_numpy_iterator():
                if self._stop.is_set():
                    return
                self._queue.put(batch)
            self._queue.put(self._END)
        except BaseException as e:  # handed to the consumer, raised in `__next__`
            self._queue.put(e)

    def close(self) -> None:
        """Stop the background thread and wait until it has left TensorFlow; the batches it
        holds ready are dropped (taking them unblocks a thread waiting to queue one more)."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.1)

    def get_state(self) -> dict[str, int]:
        return {"batches_consumed": self.batches_consumed}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self._queue.get()
        if item is self._END:
            self._queue.put(item)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        self.batches_consumed += 1
        return item


__all__ = [
    "DatasetConfig",
    "ResumableIterator",
    "UnknownTaskError",
    "get_dataset",
    "get_task",
]
