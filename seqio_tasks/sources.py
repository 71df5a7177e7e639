"""Data sources: prepared TFDS data (never downloaded behind the user's back) or local files.

Both kinds are `seqio.FunctionDataSource`s whose function decides at dataset-build time, so a
task registered at import time follows the paths configured later (see `config.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import seqio
import tensorflow as tf

from moe import log_filters
from seqio_tasks import config
from seqio_tasks.errors import MissingDataError

Example = dict[str, Any]
LocalReader = Callable[[str, str], Iterator[Example]]  # (directory, split) -> examples

# seqio's warning on shuffling a FunctionDataSource (it logs through absl's "absl" logger).
UNCACHED_FUNCTION_DATASET = "Using an uncached FunctionDataset for training"


class SeededFunctionDataSource(seqio.FunctionDataSource):
    """`seqio.FunctionDataSource` without seqio's "uncached FunctionDataset" warning when the
    shuffle is seeded.

    The warning is about restarts reshuffling differently. These sources shuffle with the seed
    they are given, and a restarted run rebuilds the same seeded dataset and skips the batches
    it had consumed (`moe.data`), so a restart sees exactly what an uninterrupted run would.
    An unseeded shuffle still warns; no other message is touched.
    """

    def get_dataset(self, split: str = "train", shuffle: bool = True,
                    seed: int | None = None, shard_info: seqio.ShardInfo | None = None,
                    **kwargs: Any) -> tf.data.Dataset:  # fmt: skip
        if not (shuffle and seed is not None):
            return super().get_dataset(split, shuffle, seed, shard_info, **kwargs)
        with log_filters.dropping("absl", UNCACHED_FUNCTION_DATASET):
            return super().get_dataset(split, shuffle, seed, shard_info, **kwargs)


def _missing_tfds_message(tfds_name: str, split: str, data_dir: str | None,
                          local_dir_field: str | None) -> str:  # fmt: skip
    message = (
        f"TFDS dataset {tfds_name!r} (split {split!r}) is not prepared in data_dir="
        f"{data_dir or '~/tensorflow_datasets'}"
    )
    if local_dir_field is not None:
        message += (
            f", and no local files are configured. Either read the official files: unzip "
            f"them into <dir> and {config.how_to_set(local_dir_field)}; or prepare TFDS"
        )
    else:
        message += ". Prepare it"
    return message + (
        f" once with network access: `tfds build {tfds_name.split(':')[0]} --data_dir=<dir>`, "
        f"then {config.how_to_set('tfds_data_dir')}."
    )


def load_prepared_tfds(
    tfds_name: str,
    split: str,
    shuffle_files: bool = False,
    seed: int | None = None,
    data_dir: str | None = None,
    local_dir_field: str | None = None,
) -> tf.data.Dataset:
    """Reads an already-prepared TFDS split; raises `MissingDataError` saying how to prepare it
    and, when `local_dir_field` names the `DataPaths` field of a local alternative, how to
    point the task at local files instead.

    `download=False` matters offline: with it TFDS fails at once instead of retrying DNS for
    minutes.
    """
    import tensorflow_datasets as tfds  # Deferred: importing TFDS costs seconds.

    data_dir = data_dir or config.data_paths().tfds_data_dir
    read_config = tfds.ReadConfig(shuffle_seed=seed, skip_prefetch=True)
    try:
        return tfds.load(
            tfds_name,
            split=split,
            data_dir=data_dir,
            download=False,
            try_gcs=False,
            shuffle_files=shuffle_files,
            read_config=read_config,
        )
    except (AssertionError, tfds.core.registered.DatasetNotFoundError, FileNotFoundError) as e:
        message = _missing_tfds_message(tfds_name, split, data_dir, local_dir_field)
        raise MissingDataError(f"{message} TFDS said: {e}") from e


def dataset_from_examples(
    examples: Iterable[Example], output_signature: Mapping[str, tf.TensorSpec]
) -> tf.data.Dataset:
    """Builds a dataset from Python dicts.

    The examples are read here, eagerly (benchmark files are small): a reader's error is raised
    to the caller as it is, not later from inside a `tf.data` generator where TensorFlow would
    wrap it.
    """
    rows = list(examples)

    def generate():
        yield from rows

    return tf.data.Dataset.from_generator(generate, output_signature=dict(output_signature))


def tfds_or_local_source(
    tfds_name: str,
    splits: Mapping[str, str],
    local_dir_field: str,
    local_reader: LocalReader,
    output_signature: Mapping[str, Any],
) -> seqio.FunctionDataSource:
    """A source reading local official files when the `DataPaths` field `local_dir_field`
    ('glue_dir', 'super_glue_dir') is set, else TFDS.

    `splits` maps this task's split names to TFDS split names; the local reader receives the
    task's split name.
    """

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        local_dir = getattr(config.data_paths(), local_dir_field)
        if local_dir:
            ds = dataset_from_examples(local_reader(local_dir, split), output_signature)
            if shuffle_files:
                ds = ds.shuffle(10_000, seed=seed)
            return ds
        return load_prepared_tfds(
            tfds_name, splits[split], shuffle_files, seed, local_dir_field=local_dir_field
        )

    return SeededFunctionDataSource(dataset_fn, splits=list(splits))


__all__ = [
    "MissingDataError",
    "SeededFunctionDataSource",
    "dataset_from_examples",
    "load_prepared_tfds",
    "tfds_or_local_source",
]
