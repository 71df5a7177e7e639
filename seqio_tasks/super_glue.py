"""SuperGLUE as seqio tasks under the `t5` package's names (`super_glue_<task>_v102`).

Source per task: the official JSONL files under `config.data_paths().super_glue_dir` when set,
else the prepared TFDS `super_glue/<cfg>:1.0.2`. WSC is registered in t5's "simple" form only
(`super_glue_wsc_v102_simple_train` / `_simple_eval`). Texts, label names, postprocessors and
metrics follow the `t5` package's text-to-text formats. `dpr_v001_simple` (Definite Pronoun
Resolution as WSC) completes t5's `super_glue_v102_proportional`.
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
from seqio_tasks.glue import STANDARD_SPLITS, TOKENIZE_AND_EOS

TFDS_VERSION = "1.0.2"
_STRING = tf.TensorSpec([], tf.string)
_INT64 = tf.TensorSpec([], tf.int64)
_INT32 = tf.TensorSpec([], tf.int32)


@dataclasses.dataclass(frozen=True)
class SuperGlueTask:
    """What differs between SuperGLUE tasks."""

    name: str  # TFDS config name
    label_names: tuple[str, ...] | None
    signature: dict  # TFDS features of the raw examples
    text_preprocessor: Callable
    postprocess_fn: Callable
    metric_fns: tuple[Callable, ...]
    splits: tuple[str, ...] = STANDARD_SPLITS
    train_size: int = 0


def _fields(*names: str, **extra) -> dict:
    return {**{n: _STRING for n in names}, "label": _INT64, "idx": _INT32, **extra}


def _glue_text(benchmark_name: str, label_names, feature_names=None) -> Callable:
    return seqio.map_over_dataset(
        functools.partial(
            glue_formatting.glue_text,
            benchmark_name=benchmark_name,
            label_names=label_names,
            feature_names=feature_names,
        )
    )


def _class_ids(label_names) -> Callable:
    return functools.partial(postprocessors.string_label_to_class_id, label_names=label_names)


def _swap_axb_keys(x):
    # The `t5` package rekeys AX-b as {premise: sentence1, hypothesis: sentence2}, so its texts
    # read "rte hypothesis: <sentence2> premise: <sentence1>".
    return {"premise": x["sentence1"], "hypothesis": x["sentence2"], "label": x["label"],
            "idx": x["idx"]}  # fmt: skip


def _axb_text(dataset):
    dataset = dataset.map(_swap_axb_keys)
    return _glue_text("rte", _NLI)(dataset)


_BOOL = ("False", "True")
_NLI = ("entailment", "not_entailment")
_CB = ("entailment", "contradiction", "neutral")
_COPA = ("choice1", "choice2")
_WIC = ("sentence1", "sentence2", "word")
_WIC_SIGNATURE = _fields(*_WIC, start1=_INT32, start2=_INT32, end1=_INT32, end2=_INT32)
_MULTIRC_SIGNATURE = {
    "paragraph": _STRING,
    "question": _STRING,
    "answer": _STRING,
    "label": _INT64,
    "idx": {"paragraph": _INT32, "question": _INT32, "answer": _INT32},
}
_RECORD_SIGNATURE = {
    "passage": _STRING,
    "query": _STRING,
    "entities": tf.TensorSpec([None], tf.string),
    "answers": tf.TensorSpec([None], tf.string),
    "idx": {"passage": _INT32, "query": _INT32},
}
_WSC_SIGNATURE = {
    "text": _STRING,
    "span1_index": _INT32,
    "span2_index": _INT32,
    "span1_text": _STRING,
    "span2_text": _STRING,
    "label": _INT64,
    "idx": _INT32,
}

SUPER_GLUE_TASKS: dict[str, SuperGlueTask] = {
    t.name: t
    for t in (
        SuperGlueTask("boolq", _BOOL, _fields("question", "passage"), _glue_text("boolq", _BOOL),
                      _class_ids(_BOOL), (metrics.accuracy,), train_size=9_427),
        SuperGlueTask("cb", _CB, _fields("premise", "hypothesis"), _glue_text("cb", _CB),
                      _class_ids(_CB), (metrics.mean_3class_f1, metrics.accuracy),
                      train_size=250),
        SuperGlueTask("copa", _COPA, _fields("premise", "choice1", "choice2", "question"),
                      _glue_text("copa", _COPA), _class_ids(_COPA), (metrics.accuracy,),
                      train_size=400),
        SuperGlueTask("multirc", _BOOL, _MULTIRC_SIGNATURE,
                      _glue_text("multirc", _BOOL, ("question", "answer", "paragraph")),
                      postprocessors.multirc,
                      (metrics.multirc_f1_over_all_answers, metrics.multirc_exact_match),
                      train_size=27_243),
        SuperGlueTask("record", None, _RECORD_SIGNATURE, glue_formatting.record_text,
                      postprocessors.record, (metrics.record_em_f1,), train_size=138_854),
        SuperGlueTask("rte", _NLI, _fields("premise", "hypothesis"), _glue_text("rte", _NLI),
                      _class_ids(_NLI), (metrics.accuracy,), train_size=2_490),
        SuperGlueTask("wic", _BOOL, _WIC_SIGNATURE, _glue_text("wic", _BOOL, _WIC),
                      _class_ids(_BOOL), (metrics.accuracy,), train_size=5_428),
        SuperGlueTask("axb", _NLI, _fields("sentence1", "sentence2"), _axb_text,
                      _class_ids(_NLI), (), splits=("test",)),
        SuperGlueTask("axg", _NLI, _fields("premise", "hypothesis"), _glue_text("rte", _NLI),
                      _class_ids(_NLI), (), splits=("test",)),
    )
}  # fmt: skip

WSC_TASK = SuperGlueTask(
    "wsc.fixed", None, _WSC_SIGNATURE, glue_formatting.wsc_simple_text,
    postprocessors.wsc_simple, (metrics.accuracy,),
)  # fmt: skip
WSC_SIMPLE_TRAIN_SIZE = 259
DPR_TRAIN_SIZE = 1_322
DPR_TFDS_NAME = "definite_pronoun_resolution:1.1.0"
_DPR_SIGNATURE = {
    "sentence": _STRING,
    "pronoun": _STRING,
    "candidates": tf.TensorSpec([2], tf.string),
    "label": _INT64,
}
# Multiple-choice tasks that also get a `_rank_classification` variant.
RANK_CLASSIFICATION_TASKS = ("boolq", "cb", "copa", "rte", "wic")


def task_name(task: SuperGlueTask) -> str:
    return f"super_glue_{task.name}_v102"


def super_glue_source(task: SuperGlueTask, splits=None) -> seqio.FunctionDataSource:
    """Official JSONL when a SuperGLUE directory is configured, else prepared TFDS data."""
    splits = splits or task.splits
    return sources.tfds_or_local_source(
        tfds_name=f"super_glue/{task.name}:{TFDS_VERSION}",
        splits={split: split for split in splits},
        local_dir_field="super_glue_dir",
        local_reader=functools.partial(
            _read_local, task_name=task.name, label_names=task.label_names
        ),
        output_signature=task.signature,
    )


def _read_local(directory: str, split: str, task_name: str, label_names):
    return glue_files.read_super_glue(directory, task_name, split, label_names)


def dpr_source() -> seqio.FunctionDataSource:
    """DPR's original files under `<super_glue_dir>/DPR/` when set, else prepared TFDS."""
    return sources.tfds_or_local_source(
        tfds_name=DPR_TFDS_NAME,
        splits={"train": "train", "test": "test"},
        local_dir_field="super_glue_dir",
        local_reader=glue_files.read_dpr,
        output_signature=_DPR_SIGNATURE,
    )


def register_super_glue_tasks(vocabulary: str | seqio.Vocabulary = "byte") -> list[str]:
    """Registers every SuperGLUE task, the WSC simple tasks, rank-classification variants and
    `super_glue_v102_proportional`. Returns the task names; safe to call again."""
    features = registry.text_to_text_features(vocabulary)
    names = []
    for task in SUPER_GLUE_TASKS.values():
        registry.add_task(
            task_name(task),
            source=super_glue_source(task),
            preprocessors=[task.text_preprocessor, *TOKENIZE_AND_EOS],
            output_features=features,
            postprocess_fn=task.postprocess_fn,
            metric_fns=list(task.metric_fns),
        )
        names.append(task_name(task))
        if task.name in RANK_CLASSIFICATION_TASKS:
            name = task_name(task) + "_rank_classification"
            registry.add_task(
                name,
                source=super_glue_source(task),
                preprocessors=[
                    task.text_preprocessor,
                    functools.partial(
                        glue_formatting.rank_classification_expand, label_names=task.label_names
                    ),
                    *TOKENIZE_AND_EOS,
                ],
                output_features=features,
                postprocess_fn=postprocessors.rank_classification_target,
                metric_fns=[metrics.rank_classification_accuracy],
            )
            names.append(name)
    registry.add_task(
        "super_glue_wsc_v102_simple_train",
        source=super_glue_source(WSC_TASK, splits=("train",)),
        preprocessors=[
            functools.partial(glue_formatting.wsc_simple_text, correct_referent_only=True),
            *TOKENIZE_AND_EOS,
        ],
        output_features=features,
        metric_fns=[],
    )
    registry.add_task(
        "super_glue_wsc_v102_simple_eval",
        source=super_glue_source(WSC_TASK, splits=("validation", "test")),
        preprocessors=[glue_formatting.wsc_simple_text, *TOKENIZE_AND_EOS],
        output_features=features,
        postprocess_fn=postprocessors.wsc_simple,
        metric_fns=[metrics.accuracy],
    )
    # Definite Pronoun Resolution in the WSC format: extra training data in t5's mixture.
    registry.add_task(
        "dpr_v001_simple",
        source=dpr_source(),
        preprocessors=[glue_formatting.dpr_simple_text, *TOKENIZE_AND_EOS],
        output_features=features,
        metric_fns=[metrics.accuracy],
    )
    names += [
        "super_glue_wsc_v102_simple_train",
        "super_glue_wsc_v102_simple_eval",
        "dpr_v001_simple",
    ]
    rates = [(task_name(t), float(t.train_size)) for t in SUPER_GLUE_TASKS.values()]
    rates += [
        ("dpr_v001_simple", float(DPR_TRAIN_SIZE)),
        ("super_glue_wsc_v102_simple_train", float(WSC_SIMPLE_TRAIN_SIZE)),
        ("super_glue_wsc_v102_simple_eval", 0.0),
    ]
    registry.add_mixture("super_glue_v102_proportional", rates)
    return names
