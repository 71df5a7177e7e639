"""GLUE as seqio tasks under the `t5` package's names (`glue_<task>_v002`).

Source per task: the official TSVs under `config.data_paths().glue_dir` when set, else the
prepared TFDS `glue/<cfg>:2.0.0` (t5's pinned 1.0.0 no longer builds). Texts, label names,
postprocessors and metrics follow the `t5` package's text-to-text formats.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import seqio
import tensorflow as tf

from seqio_tasks import (
    glue_files,
    glue_formatting,
    metrics,
    postprocessors,
    registry,
    sources,
)

TFDS_VERSION = "2.0.0"
STANDARD_SPLITS = ("train", "validation", "test")
MNLI_SPLITS = (
    "train",
    "validation_matched",
    "validation_mismatched",
    "test_matched",
    "test_mismatched",
)


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """What differs between GLUE tasks."""

    name: str  # TFDS config name
    label_names: tuple[str, ...] | None  # None: regression (STS-B)
    text_features: tuple[str, ...]
    metric_fns: tuple[Callable, ...]
    splits: tuple[str, ...] = STANDARD_SPLITS
    benchmark_name: str | None = None  # prefix of the inputs; defaults to `name`
    train_size: int = 0  # training examples: the rate in glue_v002_proportional


_NLI = ("entailment", "not_entailment")
_MNLI = ("entailment", "neutral", "contradiction")
_ACC = (metrics.accuracy,)
_F1_ACC = (metrics.f1_score_with_invalid, metrics.accuracy)

GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("cola", ("unacceptable", "acceptable"), ("sentence",),
                 (metrics.matthews_corrcoef,), train_size=8_551),
        GlueTask("sst2", ("negative", "positive"), ("sentence",), _ACC, train_size=67_349),
        GlueTask("mrpc", ("not_equivalent", "equivalent"), ("sentence1", "sentence2"), _F1_ACC,
                 train_size=3_668),
        GlueTask("qqp", ("not_duplicate", "duplicate"), ("question1", "question2"), _F1_ACC,
                 train_size=363_849),
        GlueTask("stsb", None, ("sentence1", "sentence2"),
                 (metrics.pearson_corrcoef, metrics.spearman_corrcoef), train_size=5_749),
        GlueTask("mnli", _MNLI, ("premise", "hypothesis"), _ACC, splits=MNLI_SPLITS,
                 train_size=392_702),
        GlueTask("mnli_mismatched", _MNLI, ("premise", "hypothesis"), _ACC,
                 splits=("validation", "test"), benchmark_name="mnli"),
        GlueTask("mnli_matched", _MNLI, ("premise", "hypothesis"), _ACC,
                 splits=("validation", "test"), benchmark_name="mnli"),
        GlueTask("qnli", _NLI, ("question", "sentence"), _ACC, train_size=104_743),
        GlueTask("rte", _NLI, ("sentence1", "sentence2"), _ACC, train_size=2_490),
        GlueTask("wnli", ("not_entailment", "entailment"), ("sentence1", "sentence2"), _ACC,
                 train_size=635),
        GlueTask("ax", _MNLI, ("premise", "hypothesis"), (), splits=("test",),
                 benchmark_name="mnli"),
    )
}  # fmt: skip


def task_name(task: GlueTask) -> str:
    return f"glue_{task.name}_v002"


def _output_signature(task: GlueTask) -> dict[str, tf.TensorSpec]:
    signature = {f: tf.TensorSpec([], tf.string) for f in task.text_features}
    label_dtype = tf.float32 if task.label_names is None else tf.int64
    signature["label"] = tf.TensorSpec([], label_dtype)
    signature["idx"] = tf.TensorSpec([], tf.int32)
    return signature


def glue_source(task: GlueTask) -> seqio.FunctionDataSource:
    """Official TSVs when a GLUE directory is configured, else prepared TFDS data."""
    return sources.tfds_or_local_source(
        tfds_name=f"glue/{task.name}:{TFDS_VERSION}",
        splits={split: split for split in task.splits},
        local_dir_field="glue_dir",
        local_reader=functools.partial(
            _read_local, task_name=task.name, label_names=task.label_names
        ),
        output_signature=_output_signature(task),
    )


def _read_local(directory: str, split: str, task_name: str, label_names):
    return glue_files.read_glue(directory, task_name, split, label_names)


def text_preprocessor(task: GlueTask) -> Callable:
    if task.label_names is None:
        return seqio.map_over_dataset(glue_formatting.stsb_text)
    return seqio.map_over_dataset(
        functools.partial(
            glue_formatting.glue_text,
            benchmark_name=task.benchmark_name or task.name,
            label_names=task.label_names,
        )
    )


def postprocess_fn(task: GlueTask) -> Callable:
    if task.label_names is None:
        return postprocessors.string_to_float
    return functools.partial(postprocessors.string_label_to_class_id, label_names=task.label_names)


TOKENIZE_AND_EOS = (
    seqio.preprocessors.tokenize,
    seqio.CacheDatasetPlaceholder(),
    seqio.preprocessors.append_eos_after_trim,
)


def register_glue_tasks(vocabulary: str | seqio.Vocabulary = "byte") -> list[str]:
    """Registers every GLUE task, its rank-classification variant, and the mixture.

    Returns the registered task names. Safe to call again (e.g. with another vocabulary).
    """
    features = registry.text_to_text_features(vocabulary)
    names = []
    for task in GLUE_TASKS.values():
        source = glue_source(task)
        registry.add_task(
            task_name(task),
            source=source,
            preprocessors=[text_preprocessor(task), *TOKENIZE_AND_EOS],
            output_features=features,
            postprocess_fn=postprocess_fn(task),
            metric_fns=list(task.metric_fns),
        )
        names.append(task_name(task))
        if task.label_names is not None and task.name != "ax":
            registry.add_task(
                task_name(task) + "_rank_classification",
                source=source,
                preprocessors=[
                    text_preprocessor(task),
                    functools.partial(
                        glue_formatting.rank_classification_expand, label_names=task.label_names
                    ),
                    *TOKENIZE_AND_EOS,
                ],
                output_features=features,
                postprocess_fn=postprocessors.rank_classification_target,
                metric_fns=[metrics.rank_classification_accuracy],
            )
            names.append(task_name(task) + "_rank_classification")
    # As in the `t5` package, WNLI stays out of the mixture (WSC is trained on instead).
    registry.add_mixture(
        "glue_v002_proportional",
        [(task_name(t), float(t.train_size)) for t in GLUE_TASKS.values() if t.name != "wnli"],
    )
    return names
