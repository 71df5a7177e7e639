"""Reads and validates BIG-bench JSON tasks (`<task>/task.json`, subtasks in subfolders).

A malformed file fails with an error naming the file and the field, before any dataset is
built.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from moe.errors import ConfigurationError
from seqio_tasks.errors import MissingDataError

GENERATIVE_METRICS = frozenset({
    "exact_str_match", "case_insensitive_str_match", "bleu", "rouge", "sequence_f1",
    "numeric_match_with_0_1_relative_error",
})  # fmt: skip
SCORING_METRICS = frozenset({"log_likelihood"})
MULTIPLE_CHOICE_METRICS = frozenset({
    "multiple_choice_grade", "calibration_multiple_choice_brier_score",
    "expected_calibration_error", "macro_f1",
})  # fmt: skip
# BIG-bench metrics this package does not compute (BLEURT needs a learned model): a task
# listing them is kept, without them, and a warning says so.
UNSUPPORTED_METRICS = frozenset({"bleurt"})
KNOWN_METRICS = GENERATIVE_METRICS | SCORING_METRICS | MULTIPLE_CHOICE_METRICS | UNSUPPORTED_METRICS


class TaskFileError(ConfigurationError):
    """A BIG-bench task file is missing a field or has one of the wrong type."""


@dataclasses.dataclass(frozen=True)
class Example:
    input: str
    targets: tuple[str, ...]  # generative targets ('target', as a list); may be empty
    target_scores: tuple[tuple[str, float], ...]  # (choice, score) in file order; may be empty


@dataclasses.dataclass(frozen=True)
class JsonTask:
    """One BIG-bench JSON task (a leaf: a task without subtasks, or one subtask)."""

    name: str
    path: str
    metrics: tuple[str, ...]
    examples: tuple[Example, ...]
    task_prefix: str = ""
    example_input_prefix: str = "\nQ: "
    example_output_prefix: str = "\nA: "
    choice_prefix: str = "\n  choice: "
    append_choices_to_input: bool = True
    few_shot_example_separator: str = "\n"
    output_regex: str | None = None
    stop_string: str | None = None
    preferred_score: str | None = None

    @property
    def is_generative(self) -> bool:
        has_targets = any(e.targets for e in self.examples)
        return bool(GENERATIVE_METRICS & set(self.metrics)) and has_targets

    @property
    def is_scoring(self) -> bool:
        return bool(SCORING_METRICS & set(self.metrics)) and any(e.targets for e in self.examples)

    @property
    def is_multiple_choice(self) -> bool:
        has_scores = any(e.target_scores for e in self.examples)
        return bool(MULTIPLE_CHOICE_METRICS & set(self.metrics)) and has_scores


@dataclasses.dataclass(frozen=True)
class TaskFolder:
    """A BIG-bench task folder: one JSON task, or a parent with subtasks."""

    name: str
    leaves: tuple[JsonTask, ...]  # the task itself, or its subtasks
    subtask_names: tuple[str, ...] = ()  # empty for a task without subtasks


def _field(data: Mapping[str, Any], key: str, kind, path: str, where: str = "", default=None):
    if key not in data:
        if default is not None or kind is type(None):
            return default
        raise TaskFileError(f"{path}: {where}missing required field {key!r}.")
    value = data[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise TaskFileError(
            f"{path}: {where}field {key!r} should be {names}, got {type(value).__name__}."
        )
    return value


def _parse_example(raw: Any, path: str, index: int) -> Example:
    where = f"examples[{index}]: "
    if not isinstance(raw, dict):
        raise TaskFileError(f"{path}: {where}should be an object, got {type(raw).__name__}.")
    text = _field(raw, "input", str, path, where)
    target = raw.get("target", [])
    if isinstance(target, str):
        target = [target]
    if not isinstance(target, list) or not all(isinstance(t, str) for t in target):
        raise TaskFileError(f"{path}: {where}field 'target' should be a string or strings.")
    scores = raw.get("target_scores", {})
    if not isinstance(scores, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()
    ):
        raise TaskFileError(f"{path}: {where}field 'target_scores' should map choices to numbers.")
    if not target and not scores:
        raise TaskFileError(f"{path}: {where}needs 'target' or 'target_scores'.")
    return Example(text, tuple(target), tuple((k, float(v)) for k, v in scores.items()))


def _parse_leaf(data: Mapping[str, Any], path: str, name: str) -> JsonTask:
    metrics = _field(data, "metrics", list, path)
    unknown = [m for m in metrics if m not in KNOWN_METRICS]
    if unknown:
        raise TaskFileError(
            f"{path}: field 'metrics' has unknown metric(s) {unknown}; "
            f"known: {sorted(KNOWN_METRICS)}."
        )
    skipped = [m for m in metrics if m in UNSUPPORTED_METRICS]
    if skipped:
        logging.warning("%s: metrics %s are not computed here.", path, skipped)
        metrics = [m for m in metrics if m not in UNSUPPORTED_METRICS]
    raw_examples = _field(data, "examples", list, path)
    if not raw_examples:
        raise TaskFileError(f"{path}: field 'examples' is empty.")
    examples = tuple(_parse_example(e, path, i) for i, e in enumerate(raw_examples))
    optional_strings = {}
    for key in (
        "task_prefix", "example_input_prefix", "example_output_prefix", "choice_prefix",
        "few_shot_example_separator",
    ):  # fmt: skip
        if key in data:
            optional_strings[key] = _field(data, key, str, path)
    for key in ("output_regex", "stop_string", "preferred_score"):
        if data.get(key) is not None:
            optional_strings[key] = _field(data, key, str, path)
    append = data.get("append_choices_to_input", True)
    if not isinstance(append, bool):
        raise TaskFileError(f"{path}: field 'append_choices_to_input' should be true or false.")
    return JsonTask(
        name=name,
        path=path,
        metrics=tuple(metrics),
        examples=examples,
        append_choices_to_input=append,
        **optional_strings,
    )


def _load_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise TaskFileError(f"{path}: not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise TaskFileError(f"{path}: the top level should be an object.")
    return data


def read_task_folder(folder: str) -> TaskFolder:
    """Reads `folder/task.json` and, when it has no examples, its subtask folders."""
    path = os.path.join(folder, "task.json")
    if not os.path.exists(path):
        raise MissingDataError(f"No BIG-bench task file at {path}.")
    data = _load_json(path)
    name = os.path.basename(os.path.normpath(folder))
    subfolders = sorted(
        d for d in os.listdir(folder) if os.path.exists(os.path.join(folder, d, "task.json"))
    )
    if "examples" in data or not subfolders:
        return TaskFolder(name, (_parse_leaf(data, path, name),))
    leaves = tuple(
        _parse_leaf(_load_json(os.path.join(folder, d, "task.json")),
                    os.path.join(folder, d, "task.json"), d)
        for d in subfolders
    )  # fmt: skip
    return TaskFolder(name, leaves, tuple(subfolders))


def list_json_task_folders(benchmark_dir: str) -> list[str]:
    """Folders under `benchmark_dir` holding a JSON task (programmatic tasks are skipped)."""
    if not os.path.isdir(benchmark_dir):
        raise MissingDataError(f"BIG-bench task directory {benchmark_dir} does not exist.")
    return sorted(
        os.path.join(benchmark_dir, d)
        for d in os.listdir(benchmark_dir)
        if os.path.exists(os.path.join(benchmark_dir, d, "task.json"))
    )


def installed_benchmark_dir() -> str | None:
    """`bigbench/benchmark_tasks` of the installed `bigbench` package, without importing it."""
    spec = importlib.util.find_spec("bigbench")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, "benchmark_tasks")
        if os.path.isdir(candidate):
            return candidate
    return None


def read_benchmark(
    benchmark_dir: str, task_names: Sequence[str] | None = None, strict: bool = True
) -> list[TaskFolder]:
    """The task folders of `benchmark_dir` (or only `task_names`).

    `strict=False` skips malformed tasks with a warning naming file and field instead of
    raising, so one bad task cannot hide the others.
    """
    folders = list_json_task_folders(benchmark_dir)
    if task_names is not None:
        wanted = set(task_names)
        missing = wanted - {os.path.basename(f) for f in folders}
        if missing:
            raise MissingDataError(f"No BIG-bench JSON task {sorted(missing)} in {benchmark_dir}.")
        folders = [f for f in folders if os.path.basename(f) in wanted]
    out = []
    for folder in folders:
        try:
            out.append(read_task_folder(folder))
        except TaskFileError as e:
            if strict:
                raise
            logging.warning("Skipping BIG-bench task: %s", e)
    return out
