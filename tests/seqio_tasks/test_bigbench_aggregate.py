"""BIG-bench's aggregate of a task with subtasks: unweighted means over subtasks and the
normalized aggregate score, by hand and through seqio.Evaluator."""

import json

import pytest
import seqio

import seqio_tasks
from seqio_tasks.bigbench import aggregate, reader, register_bigbench_tasks

BYTES = seqio.ByteVocabulary()


def write_parent_task(root, name, sizes=(("easy", 5), ("hard", 10))):
    """A BIG-bench task `name` under `root` with generative subtasks of the given sizes; the
    inputs of subtask `s` start with `s[0].upper()`, its targets are `s[0]` + a number."""
    (root / name).mkdir(parents=True)
    (root / name / "task.json").write_text(
        json.dumps({"name": name, "description": "parent", "keywords": ["test"]})
    )
    for subtask, size in sizes:
        (root / name / subtask).mkdir()
        letter = subtask[0]
        (root / name / subtask / "task.json").write_text(json.dumps({
            "name": subtask, "description": subtask, "keywords": ["test"],
            "metrics": ["exact_str_match"], "preferred_score": "exact_str_match",
            "examples": [{"input": f"{letter.upper()}{i}", "target": f"{letter}{i}"}
                         for i in range(size)],
        }))  # fmt: skip
    return root


def predict_right_only_for(letter):
    """A seqio predict_fn: the targets for inputs holding `letter`, a wrong answer for others."""
    marker = BYTES.encode(letter)[0]

    def predict(ds):
        out = []
        for index, features in ds.as_numpy_iterator():
            right = marker in features["encoder_input_tokens"]
            out.append((index, features["decoder_target_tokens"].tolist() if right
                        else [*BYTES.encode("wrong"), 1]))  # fmt: skip
        return out

    return predict


def test_metrics_are_unweighted_means_over_subtasks():
    scoring = {"a": aggregate.SubtaskScoring("a", "exact_str_match", 0.0, 1.0),
               "b": aggregate.SubtaskScoring("b", "exact_str_match", 0.0, 1.0)}  # fmt: skip
    aggregate.record_parent("parent_by_hand", scoring)
    results = {"a": {"exact_str_match": 1.0, "bleu": 30.0}, "b": {"exact_str_match": 0.0},
               "unrelated": {"exact_str_match": 0.7}}  # fmt: skip
    assert aggregate.parent_aggregate("parent_by_hand", results) == pytest.approx(
        {"exact_str_match": 0.5, "bleu": 30.0, "normalized_aggregate_score": 50.0}
    )
    assert aggregate.parent_aggregate("not_a_parent", results) == {}


def test_multiple_choice_chance_is_the_low_end_of_the_normalized_score(tmp_path):
    examples = [{"input": "q1", "target_scores": {"x": 1, "y": 0}},
                {"input": "q2", "target_scores": {"x": 1, "y": 0, "z": 0, "w": 0}}]  # fmt: skip
    (tmp_path / "choices").mkdir()
    (tmp_path / "choices" / "task.json").write_text(json.dumps({
        "metrics": ["multiple_choice_grade"], "preferred_score": "multiple_choice_grade",
        "examples": examples}))  # fmt: skip
    leaf = reader.read_task_folder(str(tmp_path / "choices")).leaves[0]
    scoring = aggregate.scoring_of(leaf)
    assert scoring.low_score == pytest.approx((1 / 2 + 1 / 4) / 2)  # BIG-bench's chance level
    aggregate.record_parent("mc_parent", {"mc_leaf": scoring})
    result = aggregate.parent_aggregate("mc_parent", {"mc_leaf": {"multiple_choice_grade": 0.6875}})
    assert result["normalized_aggregate_score"] == pytest.approx(50.0)


def test_a_subtask_without_its_preferred_metric_leaves_the_normalized_score_out():
    aggregate.record_parent("ll_parent", {
        "ll_a": aggregate.SubtaskScoring("a", "log_likelihood", -10.0, 0.0),
        "ll_b": aggregate.SubtaskScoring("b", "exact_str_match", 0.0, 1.0)})  # fmt: skip
    result = aggregate.parent_aggregate(
        "ll_parent", {"ll_a": {"exact_str_match": 0.2}, "ll_b": {"exact_str_match": 0.4}}
    )
    assert result == pytest.approx({"exact_str_match": 0.3})


def test_registration_records_the_parent_mixtures(tmp_path):
    write_parent_task(tmp_path, "parent_recorded")
    names = register_bigbench_tasks(str(tmp_path), shots=(0,))
    gen = "bigbench:parent_recorded.gen.byte_vocab.0_shot.all_examples"
    scr = gen.replace(".gen.", ".scr.")
    assert gen in names and aggregate.is_parent(gen)
    assert not aggregate.is_parent(f"{gen}.easy")
    assert scr not in names  # the subtasks list no scoring metric


def test_evaluator_results_aggregate_to_the_parent_score(tmp_path):
    write_parent_task(tmp_path, "parent_evaluated")
    register_bigbench_tasks(str(tmp_path), shots=(0,))
    name = "bigbench:parent_evaluated.gen.byte_vocab.0_shot.all_examples"
    evaluator = seqio.Evaluator(name, seqio.EncDecFeatureConverter(pack=False), eval_split="all")
    results, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict_right_only_for("E"),
                                    score_fn=None)  # fmt: skip
    by_task = results.result()
    assert by_task[f"{name}.easy"] == {"exact_str_match": 1.0}  # 5 examples
    assert by_task[f"{name}.hard"] == {"exact_str_match": 0.0}  # 10 examples
    # Unweighted over subtasks, as BIG-bench reports it (weighted by examples would be 1/3).
    assert seqio_tasks.aggregate_metrics(name, by_task) == pytest.approx(
        {"exact_str_match": 0.5, "normalized_aggregate_score": 50.0}
    )
    assert seqio_tasks.aggregate_metrics(f"{name}.easy", by_task) == {}
