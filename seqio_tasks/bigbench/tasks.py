"""Registers BIG-bench JSON tasks as seqio tasks under the `bbseqio` names.

`bigbench:{task}.{gen|mul|scr}.{vocab}_vocab.{k}_shot.{all_examples|N_examples}[.{subtask}]`:
- gen: generate the answer; predictions post-processed with the task's `stop_string` and
  `output_regex`; the task's generative metrics, best over all targets.
- mul: rank classification, one row per choice scored by the model's log-likelihood;
  multiple_choice_grade and the calibration metrics the task lists.
- scr: one row per target, scored; log_likelihood.
Per task folder, `...{type}...` of a parent with subtasks and `...mix...` (all of a task's
seqio tasks) are mixtures weighted by example count; `bigbench:bigbench_lite_v1.mix...` holds
the BIG-bench Lite tasks that are present. The mixtures of a parent with subtasks get
BIG-bench's aggregate score when evaluated (`aggregate.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import seqio
import tensorflow as tf

from seqio_tasks import config, registry
from seqio_tasks.bigbench import aggregate, formatting, metrics, reader
from seqio_tasks.errors import MissingDataError

GENERATIVE, MULTIPLE_CHOICE, SCORING, MIXED = "gen", "mul", "scr", "mix"
DEFAULT_VOCABULARIES = {"byte": "byte"}
DEFAULT_SHOTS = (0, 1, 2, 3)
BIGBENCH_LITE_V1 = (
    "auto_debugging", "bbq_lite_json", "code_line_description", "conceptual_combinations",
    "conlang_translation", "emoji_movie", "formal_fallacies_syllogisms_negation",
    "hindu_knowledge", "known_unknowns", "language_identification", "linguistics_puzzles",
    "logic_grid_puzzle", "logical_deduction", "misconceptions_russian", "novel_concepts",
    "operators", "parsinlu_reading_comprehension", "play_dialog_same_or_different",
    "repeat_copy_logic", "strange_stories", "strategyqa", "symbol_interpretation",
    "vitaminc_fact_verification", "winowhy",
)  # fmt: skip

_STRING = tf.TensorSpec([], tf.string)
_SIGNATURES = {
    GENERATIVE: {"inputs": _STRING, "targets": _STRING, "answers": tf.TensorSpec([None], tf.string),
                 "idx": tf.TensorSpec([], tf.int32)},
    MULTIPLE_CHOICE: {"inputs": _STRING, "targets": _STRING, "idx": tf.TensorSpec([], tf.int32),
                      "choice_score": tf.TensorSpec([], tf.float32)},
    SCORING: {"inputs": _STRING, "targets": _STRING, "idx": tf.TensorSpec([], tf.int32)},
}  # fmt: skip


def task_name(
    task: str,
    task_type: str,
    vocab_name: str,
    num_shots: int,
    max_examples: int | None = None,
    subtask: str | None = None,
) -> str:
    examples = "all_examples" if max_examples is None else f"{max_examples}_examples"
    name = f"bigbench:{task}.{task_type}.{vocab_name}_vocab.{num_shots}_shot.{examples}"
    return f"{name}.{subtask}" if subtask else name


def _rows(task: reader.JsonTask, task_type: str, split: str, num_shots: int, max_examples):
    for prompt in formatting.prompts(task, split, num_shots, max_examples):
        example = prompt.example
        if task_type == GENERATIVE:
            yield {"inputs": prompt.inputs, "targets": example.targets[0],
                   "answers": list(example.targets), "idx": example.index}  # fmt: skip
        elif task_type == SCORING:
            for target in example.targets:
                yield {"inputs": prompt.inputs, "targets": target, "idx": example.index}
        else:
            for choice, score in zip(example.choices, example.choice_scores, strict=True):
                yield {"inputs": prompt.inputs, "targets": choice, "idx": example.index,
                       "choice_score": score}  # fmt: skip


def _source(task: reader.JsonTask, task_type: str, num_shots: int, max_examples):
    if task_type == GENERATIVE:
        # Choice-only examples have no generative target; they belong to the 'mul' task.
        task = _with_examples(task, [e for e in task.examples if e.targets])
    elif task_type == MULTIPLE_CHOICE:
        task = _with_examples(task, [e for e in task.examples if e.target_scores])
    elif task_type == SCORING:
        task = _with_examples(task, [e for e in task.examples if e.targets])

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        rows = list(_rows(task, task_type, split, num_shots, max_examples))
        ds = tf.data.Dataset.from_generator(
            lambda: iter(rows), output_signature=_SIGNATURES[task_type]
        )
        return ds.shuffle(max(len(rows), 1), seed=seed) if shuffle_files else ds

    return seqio.FunctionDataSource(dataset_fn, splits=formatting.SPLITS), len(task.examples)


def _with_examples(task: reader.JsonTask, examples) -> reader.JsonTask:
    return dataclasses.replace(task, examples=tuple(examples))


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def postprocess_generative(
    output: Any, example=None, is_target=False, stop_string=None, output_regex=None
):
    """Targets -> all acceptable answers; predictions -> BIG-bench post-processed text."""
    if is_target:
        return [_text(a) for a in example["answers"]]
    return metrics.postprocess_output(_text(output), stop_string, output_regex)


def postprocess_choice(output: Any, example=None, is_target=False):
    """Targets of rank-classification rows -> {'idx', 'choice', 'choice_score'}."""
    if not is_target:
        return output
    return {"idx": int(example["idx"]), "choice": _text(example["targets_pretokenized"]),
            "choice_score": float(example["choice_score"])}  # fmt: skip


def postprocess_scored_target(output: Any, example=None, is_target=False):
    return {"idx": int(example["idx"])} if is_target else output


def _task_types(task: reader.JsonTask) -> list[str]:
    types = []
    if task.is_generative:
        types.append(GENERATIVE)
    if task.is_multiple_choice:
        types.append(MULTIPLE_CHOICE)
    if task.is_scoring:
        types.append(SCORING)
    return types


def _register_leaf(name, task, task_type, features, num_shots, max_examples) -> int:
    source, num_examples = _source(task, task_type, num_shots, max_examples)
    if task_type == GENERATIVE:
        postprocess_fn = functools.partial(
            postprocess_generative, stop_string=task.stop_string, output_regex=task.output_regex
        )
        metric_fns = [metrics.GENERATIVE_METRIC_FNS[m] for m in task.metrics
                      if m in metrics.GENERATIVE_METRIC_FNS]  # fmt: skip
    elif task_type == MULTIPLE_CHOICE:
        postprocess_fn = postprocess_choice
        metric_fns = [metrics.MULTIPLE_CHOICE_METRIC_FNS[m] for m in task.metrics
                      if m in metrics.MULTIPLE_CHOICE_METRIC_FNS]  # fmt: skip
    else:
        postprocess_fn = postprocess_scored_target
        metric_fns = [metrics.log_likelihood]
    registry.add_task(
        name,
        source=source,
        preprocessors=[
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=features,
        postprocess_fn=postprocess_fn,
        metric_fns=metric_fns,
    )
    return num_examples


HOW_TO_POINT_AT_TASKS = (
    "point at a folder of BIG-bench JSON tasks (`<folder>/<task>/task.json`, e.g. the "
    f"`bigbench/benchmark_tasks` of the BIG-bench repository): {config.how_to_set('bigbench_dir')}"
    "; or `pip install --no-deps bigbench`, whose tasks are used when no folder is set."
)
# Task or mixture name -> the folder it was registered from (absolute).
_REGISTERED_FROM: dict[str, str] = {}


def resolve_benchmark_dir(benchmark_dir: str | None = None) -> str:
    """Explicit path > configured `bigbench_dir` > the installed `bigbench` package."""
    resolved = (
        benchmark_dir or config.data_paths().bigbench_dir or reader.installed_benchmark_dir()
    )
    if not resolved:
        raise MissingDataError(f"No BIG-bench tasks found: {HOW_TO_POINT_AT_TASKS}")
    return resolved


def registered_from(name: str) -> str | None:
    """The BIG-bench folder `name` was registered from by this module, if it was."""
    return _REGISTERED_FROM.get(name)


def unregister_other_folders(task: str, benchmark_dir: str) -> None:
    """Removes the seqio tasks and mixtures this module registered for BIG-bench task `task`
    from a folder other than `benchmark_dir` (all shots, example counts, vocabularies and
    types), so that registering it from `benchmark_dir` leaves none of their forms behind."""
    prefix = f"bigbench:{task}."
    folder = os.path.abspath(benchmark_dir)
    stale = [n for n, f in _REGISTERED_FROM.items() if n.startswith(prefix) and f != folder]
    for name in stale:
        seqio.MixtureRegistry.remove(name)
        seqio.TaskRegistry.remove(name)
        del _REGISTERED_FROM[name]


def register_bigbench_tasks(
    benchmark_dir: str | None = None,
    task_names: Sequence[str] | None = None,
    vocabularies: Mapping[str, str | seqio.Vocabulary] | None = None,
    shots: Sequence[int] = DEFAULT_SHOTS,
    max_examples: Sequence[int | None] = (None,),
    strict: bool = True,
) -> list[str]:
    """Registers the JSON tasks of `benchmark_dir` (or of `task_names` there); returns the
    names of the registered tasks and mixtures. Safe to call again.

    A malformed task file raises `reader.TaskFileError` naming file and field; with
    `strict=False` it is skipped with that message as a warning.
    """
    benchmark_dir = os.path.abspath(resolve_benchmark_dir(benchmark_dir))
    folders = reader.read_benchmark(benchmark_dir, task_names, strict)
    vocabularies = vocabularies or DEFAULT_VOCABULARIES
    registered: list[str] = []
    for vocab_name, vocabulary in vocabularies.items():
        features = registry.text_to_text_features(vocabulary)
        for k in shots:
            for n in max_examples:
                lite_members: list[tuple[str, int]] = []
                for folder in folders:
                    members = _register_folder(folder, vocab_name, features, k, n, registered)
                    if folder.name in BIGBENCH_LITE_V1:
                        lite_members += members
                if lite_members:
                    name = task_name("bigbench_lite_v1", MIXED, vocab_name, k, n)
                    registry.add_mixture(name, lite_members)
                    registered.append(name)
    present = {f.name for f in folders}
    missing = [t for t in BIGBENCH_LITE_V1 if t not in present]
    if missing and len(missing) < len(BIGBENCH_LITE_V1):
        logging.info("BIG-bench Lite mixture without missing tasks: %s", missing)
    _REGISTERED_FROM.update(dict.fromkeys(registered, benchmark_dir))
    return registered


def _register_folder(folder, vocab_name, features, k, n, registered) -> list[tuple[str, int]]:
    """Registers one task folder's seqio tasks and mixtures; returns (leaf task, rate) pairs."""
    by_type: dict[str, list[tuple[str, int]]] = {}
    scorings: dict[str, aggregate.SubtaskScoring] = {}
    for leaf in folder.leaves:
        subtask = leaf.name if folder.subtask_names else None
        for task_type in _task_types(leaf):
            name = task_name(folder.name, task_type, vocab_name, k, n, subtask)
            num_train = len(formatting.split_indices(len(leaf.examples), n)["train"])
            if num_train < k + 1:
                logging.warning("Skipping %s: %d training examples for %d shots.", name,
                                num_train, k)  # fmt: skip
                continue
            rate = _register_leaf(name, leaf, task_type, features, k, n)
            registered.append(name)
            by_type.setdefault(task_type, []).append((name, rate))
            scorings[name] = aggregate.scoring_of(leaf)
    members = [m for ms in by_type.values() for m in ms]
    if folder.subtask_names:
        for task_type, type_members in by_type.items():
            name = task_name(folder.name, task_type, vocab_name, k, n)
            registry.add_mixture(name, type_members)
            aggregate.record_parent(name, {m: scorings[m] for m, _ in type_members})
            registered.append(name)
    if len(members) > 1:
        name = task_name(folder.name, MIXED, vocab_name, k, n)
        registry.add_mixture(name, members)
        if folder.subtask_names:
            aggregate.record_parent(name, scorings)
        registered.append(name)
    return members
