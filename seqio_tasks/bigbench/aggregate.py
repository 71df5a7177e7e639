"""The aggregate score of a BIG-bench task with subtasks, computed as BIG-bench computes it.

`seqio.Evaluator` scores each subtask's seqio task on its own; BIG-bench also reports the
parent task, per shot count, with (its `add_aggregate_scores`):

- every metric: the unweighted mean over the subtasks that report it (a subtask of 10
  examples weighs as much as one of 1000);
- `normalized_aggregate_score`: the mean over subtasks of each subtask's *preferred* metric
  (its `preferred_score` field) rescaled from its [low, high] range to [0, 100]. The range is
  BIG-bench's table below; for `multiple_choice_grade` the low end is the subtask's chance
  level (the mean over its examples of the mean target score of the choices).

BIG-bench's preferred score of the parent is `multiple_choice_grade` when every subtask
prefers it, else `normalized_aggregate_score`.

A seqio task holds one kind of scoring of a subtask (gen, mul or scr), so a subtask's metrics
are first merged over the parent's seqio tasks that were evaluated: the `...mix...` mixture of
a parent holds them all, a `...gen...` parent mixture only the generative ones. When some
subtask's preferred metric is not among them (a subtask preferring `log_likelihood` evaluated
through the `gen` mixture), `normalized_aggregate_score` is left out rather than computed
over the subtasks that have it.

Aggregates are reported for the parent mixtures `tasks.register_bigbench_tasks` registers
(`bigbench:{task}.{gen|mul|scr|mix}...` of a task with subtasks) under the mixture's name.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping

from seqio_tasks.bigbench import reader

# BIG-bench's [low, high] of each metric, for normalizing preferred scores (its SCORE_RANGES,
# restricted to the metrics computed here). As in BIG-bench, `sequence_f1` is listed on 0-100
# although the metric is on 0-1.
SCORE_RANGES: Mapping[str, tuple[float, float]] = {
    "bleu": (0.0, 100.0),
    "sequence_f1": (0.0, 100.0),
    "calibration_multiple_choice_brier_score": (0.0, 1.0),
    "expected_calibration_error": (0.0, 1.0),
    "exact_str_match": (0.0, 1.0),
    "case_insensitive_str_match": (0.0, 1.0),
    "log_likelihood": (-10.0, 0.0),
    "multiple_choice_grade": (0.0, 1.0),
    "numeric_match_with_0_1_relative_error": (0.0, 1.0),
    "rouge1": (0.0, 100.0),
    "rouge2": (0.0, 100.0),
    "rougeLsum": (0.0, 100.0),
    "macro_f1": (0.0, 1.0),
}
NORMALIZED_AGGREGATE_SCORE = "normalized_aggregate_score"


@dataclasses.dataclass(frozen=True)
class SubtaskScoring:
    """A subtask's preferred metric and its range; `None` when the file names no known one."""

    subtask: str
    preferred_score: str | None
    low_score: float | None = None
    high_score: float | None = None

    def normalized(self, scores: Mapping[str, float]) -> float | None:
        """The preferred score rescaled to [0, 1] by the range; None when it cannot be."""
        if self.preferred_score not in scores or self.low_score is None:
            return None
        value = scores[self.preferred_score]
        return (value - self.low_score) / (self.high_score - self.low_score)


def scoring_of(leaf: reader.JsonTask) -> SubtaskScoring:
    """The preferred metric and range BIG-bench normalizes `leaf`'s score with."""
    preferred = leaf.preferred_score
    if preferred not in SCORE_RANGES:
        return SubtaskScoring(leaf.name, preferred)
    low, high = SCORE_RANGES[preferred]
    if preferred == "multiple_choice_grade":
        chance = [statistics.mean(s for _, s in e.target_scores)
                  for e in leaf.examples if e.target_scores]  # fmt: skip
        low = statistics.mean(chance) if chance else low
    return SubtaskScoring(leaf.name, preferred, low, high)


# Parent mixture name -> {seqio task name of a subtask's leaf: that subtask's scoring}.
_PARENTS: dict[str, dict[str, SubtaskScoring]] = {}


def record_parent(mixture_name: str, members: Mapping[str, SubtaskScoring]) -> None:
    """Remembers that `mixture_name` is a task with subtasks made of `members`."""
    _PARENTS[mixture_name] = dict(members)


def is_parent(name: str) -> bool:
    return name in _PARENTS


def parent_aggregate(name: str, results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """BIG-bench's aggregate of parent mixture `name` from `{seqio task: {metric: value}}`.

    `{}` when `name` is not a parent with subtasks or none of its seqio tasks was evaluated.
    """
    members = _PARENTS.get(name, {})
    by_subtask: dict[str, dict[str, float]] = {}
    scoring: dict[str, SubtaskScoring] = {}
    for task_name, subtask_scoring in members.items():
        if task_name in results:
            by_subtask.setdefault(subtask_scoring.subtask, {}).update(results[task_name])
            scoring[subtask_scoring.subtask] = subtask_scoring
    if not by_subtask:
        return {}
    metrics = sorted({m for scores in by_subtask.values() for m in scores})
    aggregate = {
        m: statistics.mean(s[m] for s in by_subtask.values() if m in s) for m in metrics
    }
    normalized = [scoring[sub].normalized(scores) for sub, scores in by_subtask.items()]
    if None not in normalized:
        aggregate[NORMALIZED_AGGREGATE_SCORE] = 100.0 * statistics.mean(normalized)
    return aggregate
