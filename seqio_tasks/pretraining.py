"""Pretraining tasks: span corruption (encoder-decoder), prefix LM and full LM (decoder-only).

Four corpora:
- `pydoc_topics_*`: CPython's embedded `pydoc_data.topics` (~465 KB of English), available
  everywhere with no download; distinct texts with crc32(text) % 10 == 0 (about 1 in 10,
  6.5% of the bytes) form the validation split.
- `python_docs_*`: the pydoc topics plus the docstrings of the standard library and of
  installed packages (~9 MB, no download; `python_docs.py`), held out by the same rule.
- `c4_en_*`: TFDS `c4/en:3.1.0` when prepared (`TFDS_DATA_DIR`); never downloaded here.
- any local text files: `register_text_file_tasks(prefix, {'train': glob, ...})`, one
  document per line.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Mapping

import seqio
import tensorflow as tf

from seqio_tasks import preprocessors, registry, sources, span_corruption

VALIDATION_EVERY = 10
C4_TFDS_NAME = "c4/en:3.1.0"


def pydoc_topics_documents(split: str) -> list[str]:
    """The documents of the embedded corpus for `split` ('train' or 'validation')."""
    from pydoc_data.topics import topics  # ~465 KB; imported only when a dataset is built.

    # Several topic names share one text: deduplicate so no validation text is trained on.
    # A document is held out when crc32(text) % 10 == 0: 8 of 78 texts, 6.5% of the bytes
    # with CPython 3.11 (an every-10th-in-order rule held out 22% by landing on the largest).
    documents = sorted(set(topics.values()))
    held_out = [zlib.crc32(d.encode("utf-8")) % VALIDATION_EVERY == 0 for d in documents]
    if split == "train":
        return [d for d, h in zip(documents, held_out, strict=True) if not h]
    if split == "validation":
        return [d for d, h in zip(documents, held_out, strict=True) if h]
    raise ValueError(f"pydoc_topics has splits 'train' and 'validation', not {split!r}.")


def _pydoc_topics_dataset(split: str, shuffle_files: bool, seed: int | None = None):
    ds = tf.data.Dataset.from_tensor_slices({"text": pydoc_topics_documents(split)})
    if shuffle_files:
        ds = ds.shuffle(len(pydoc_topics_documents(split)), seed=seed)
    return ds


def pydoc_topics_source() -> seqio.DataSource:
    return sources.SeededFunctionDataSource(_pydoc_topics_dataset, splits=("train", "validation"))


def python_docs_source() -> seqio.DataSource:
    """The `python_docs` corpus (`python_docs.py`), imported only when a dataset is built."""

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
        # Imported here: `python -m seqio_tasks.python_docs` then runs a module not yet loaded.
        from seqio_tasks import python_docs

        return python_docs.python_docs_dataset(split, shuffle_files, seed)

    return sources.SeededFunctionDataSource(dataset_fn, splits=("train", "validation"))


def c4_source() -> seqio.DataSource:
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
        return sources.load_prepared_tfds(C4_TFDS_NAME, split, shuffle_files, seed)

    return sources.SeededFunctionDataSource(dataset_fn, splits=("train", "validation"))


def _objectives(
    noise_density: float, mean_noise_span_length: float
) -> dict[str, tuple[Callable, bool]]:
    """Objective suffix -> (preprocessor after tokenization, whether it has 'inputs')."""
    return {
        "span_corruption": (
            functools.partial(
                span_corruption.span_corruption,
                noise_density=noise_density,
                mean_noise_span_length=mean_noise_span_length,
            ),
            True,
        ),
        "prefix_lm": (preprocessors.prefix_lm, True),
        "lm": (preprocessors.full_lm, False),
    }


def register_pretraining_tasks(
    prefix: str,
    source: seqio.DataSource,
    vocabulary: str | seqio.Vocabulary = "byte",
    source_preprocessors: tuple[Callable, ...] = (),
    noise_density: float = span_corruption.NOISE_DENSITY,
    mean_noise_span_length: float = span_corruption.MEAN_NOISE_SPAN_LENGTH,
) -> list[str]:
    """Registers `{prefix}_span_corruption`, `{prefix}_prefix_lm` and `{prefix}_lm` over a
    source of {'text': document} examples. Returns the names; safe to call again."""
    names = []
    objectives = _objectives(noise_density, mean_noise_span_length)
    for suffix, (objective, has_inputs) in objectives.items():
        name = f"{prefix}_{suffix}"
        # Full LM places EOS at document ends itself; the others end each feature with EOS.
        add_eos = suffix != "lm"
        features = registry.text_to_text_features(vocabulary, inputs=has_inputs, add_eos=add_eos)
        eos = [seqio.preprocessors.append_eos_after_trim] if add_eos else []
        registry.add_task(
            name,
            source=source,
            preprocessors=[
                *source_preprocessors,
                preprocessors.text_to_targets,
                seqio.preprocessors.tokenize,
                seqio.CacheDatasetPlaceholder(),
                objective,
                *eos,
            ],
            output_features=features,
            metric_fns=[],
        )
        names.append(name)
    return names


def register_text_file_tasks(
    prefix: str,
    split_to_filepattern: Mapping[str, str],
    vocabulary: str | seqio.Vocabulary = "byte",
) -> list[str]:
    """Pretraining tasks over local text files (one document per line)."""
    return register_pretraining_tasks(
        prefix,
        seqio.TextLineDataSource(dict(split_to_filepattern)),
        vocabulary,
        source_preprocessors=(preprocessors.text_lines_to_examples,),
    )


def register_default_pretraining_tasks(vocabulary: str | seqio.Vocabulary = "byte") -> list[str]:
    """The embedded-corpus tasks (`pydoc_topics_*`, `python_docs_*`) and the C4 tasks
    (`c4_en_*`). Reads no data: the corpora are built when a dataset is."""
    return (
        register_pretraining_tasks("pydoc_topics", pydoc_topics_source(), vocabulary)
        + register_pretraining_tasks("python_docs", python_docs_source(), vocabulary)
        + register_pretraining_tasks("c4_en", c4_source(), vocabulary)
    )
