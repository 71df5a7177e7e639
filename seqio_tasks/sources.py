"""Data sources: prepared TFDS data (never downloaded behind the user's back) or local files.

Both kinds are `seqio.FunctionDataSource`s whose function decides at dataset-build time, so a
task registered at import time follows the paths configured later (see `config.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import seqio
import tensorflow as tf

from moe.errors import ConfigurationError
from seqio_tasks import config

Example = dict[str, Any]
LocalReader = Callable[[str, str], Iterator[Example]]  # (directory, split) -> examples


class MissingDataError(ConfigurationError, FileNotFoundError):
    """The data of a task is neither prepared in TFDS nor present as local files."""


def load_prepared_tfds(
    tfds_name: str,
    split: str,
    shuffle_files: bool = False,
    seed: int | None = None,
    data_dir: str | None = None,
) -> tf.data.Dataset:
    """Reads an already-prepared TFDS split; raises `MissingDataError` saying how to prepare it.

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
        raise MissingDataError(
            f"TFDS dataset {tfds_name!r} (split {split!r}) is not prepared in data_dir="
            f"{data_dir or '~/tensorflow_datasets'}. Prepare it once with network access: "
            f"`tfds build {tfds_name.split(':')[0]} --data_dir=<dir>` and set "
            f"{config.ENV_TFDS_DATA_DIR}=<dir>, or point the task at local files "
            f"(see seqio_tasks.config). Original error: {e}"
        ) from e


def dataset_from_examples(
    examples: Iterable[Example], output_signature: Mapping[str, tf.TensorSpec]
) -> tf.data.Dataset:
    """Builds a dataset from Python dicts (read eagerly: benchmark files are small)."""
    rows = list(examples)

    def generate():
        yield from rows

    return tf.data.Dataset.from_generator(generate, output_signature=dict(output_signature))


def tfds_or_local_source(
    tfds_name: str,
    splits: Mapping[str, str],
    local_dir_fn: Callable[[], str | None],
    local_reader: LocalReader,
    output_signature: Mapping[str, Any],
) -> seqio.FunctionDataSource:
    """A source reading local official files when `local_dir_fn()` is set, else TFDS.

    `splits` maps this task's split names to TFDS split names; the local reader receives the
    task's split name.
    """

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        local_dir = local_dir_fn()
        if local_dir:
            ds = dataset_from_examples(local_reader(local_dir, split), output_signature)
            if shuffle_files:
                ds = ds.shuffle(10_000, seed=seed)
            return ds
        return load_prepared_tfds(tfds_name, splits[split], shuffle_files, seed)

    return seqio.FunctionDataSource(dataset_fn, splits=list(splits))
