"""`python -m moe.plan_table`: the search order, the parent's bookkeeping of its workers, and the
markdown rows, on fake workers and fake reports (no TPU compile here)."""

import json
import sys

import gin
import pytest

from moe import gin_cli, plan_table, tpu_topology
from moe.plan_table import Candidate


def test_expert_partitions_follow_the_recommended_rule():
    assert plan_table.expert_partitions(None, 64) == 1  # dense: pure data parallel
    assert plan_table.expert_partitions(128, 16) == 16  # min(NUM_EXPERTS, devices)
    assert plan_table.expert_partitions(64, 256) == 64
    assert plan_table.expert_partitions(6, 4) == 2  # largest divisor of both


def test_candidates_go_up_by_slice_then_model_partitions():
    found = plan_table.candidates(128, 256)
    order = [(c.slice_name, c.model) for c in found]
    slices = tpu_topology.known_slices()
    # Every slice from the smallest, each with 1, then 2, then 4 model partitions.
    assert order == [(s, m) for s in slices for m in (1, 2, 4)]
    first = found[0]
    assert (first.chips, first.model, first.expert, first.data) == (4, 1, 4, 1)
    for c in found:
        assert c.data * c.expert * c.model == c.chips
        assert c.expert == min(128, c.chips // c.model)
        # Skipped exactly where the batch shards do not divide the batch.
        assert (c.skip is not None) == bool(256 % (c.chips // c.model))
    v4_1024 = {c.model: c for c in found if c.slice_name == "v4-1024"}
    assert "512 batch shards" in v4_1024[1].skip and v4_1024[2].skip is None


def test_model_partitions_are_raised_only_when_the_parameters_do_not_fit():
    todo = plan_table.candidates(64, 256)
    first, rest = todo[0], todo[1:]
    hbm = tpu_topology.TPU_V4.hbm_bytes
    # Temporaries overflowed with 1 GiB of parameters: the rest of v4-8 is skipped, v4-16 not.
    after = plan_table._after(rest, {"candidate": first.to_json(), "held_bytes": 2**30})
    assert [c.model for c in after if c.slice_name == "v4-8"] == [2, 4]
    assert all("the rest is temporaries" in c.skip for c in after if c.slice_name == "v4-8")
    assert all(c.skip is None for c in after if c.slice_name == "v4-16")
    # Parameters take most of the chip: model partitions are raised.
    assert plan_table._after(rest, {"candidate": first.to_json(), "held_bytes": hbm}) == rest
    # A failure at 2 model partitions goes on to 4.
    at_two = {"candidate": rest[0].to_json(), "held_bytes": 1}
    assert plan_table._after(rest[1:], at_two) == rest[1:]


def _entries_script(batches, sleeps):
    """A fake worker: the n-th start appends batches[n] to its --result file, then sleeps
    sleeps[n] seconds."""
    return (
        "import json, os, sys, time\n"
        "result = [a.split('=', 1)[1] for a in sys.argv if a.startswith('--result=')][0]\n"
        f"batches = {batches!r}\n"
        "n = int(open(os.environ['PLAN_TABLE_COUNTER']).read() or 0)\n"
        "open(os.environ['PLAN_TABLE_COUNTER'], 'w').write(str(n + 1))\n"
        "with open(result, 'a') as f:\n"
        "    for e in batches[n]:\n"
        "        f.write(json.dumps(e) + '\\n'); f.flush()\n"
        f"time.sleep({list(sleeps)!r}[n])\n"
    )


@pytest.fixture
def fake_worker(monkeypatch, tmp_path):
    counter = tmp_path / "starts"
    counter.write_text("")
    monkeypatch.setenv("PLAN_TABLE_COUNTER", str(counter))
    seen = []

    def install(batches, sleeps=None):
        def command(spec, todo, result_path, scan_layers):
            seen.append([c.slice_name + f":{c.model}" for c in todo])
            return [sys.executable, "-c", _entries_script(batches, sleeps or [0] * len(batches)),
                    f"--result={result_path}"]
        monkeypatch.setattr(plan_table, "_worker_command", command)
        return seen
    return install


SPEC = plan_table.ModelSpec("fake", "Fake", "models/fake.gin", 8, {"targets": 16}, batch_size=4)


def _entry(cand, status, **extra):
    return {"candidate": cand.to_json(), "status": status, **extra}


def test_search_restarts_a_worker_after_each_compile(fake_worker):
    todo = plan_table.candidates(SPEC.num_experts, SPEC.batch_size)
    report = {"fake": True}
    seen = fake_worker([
        [_entry(todo[0], "too_big", reason="bound"), _entry(todo[1], "compiling"),
         _entry(todo[1], "does_not_fit", reason="oom")],
        [_entry(todo[2], "skipped", reason="batch"), _entry(todo[3], "compiling"),
         _entry(todo[3], "fits", report=report)],
    ])
    row = plan_table.search(SPEC, timeout_s=60, log=lambda _: None)
    # The second worker starts at the candidate after the compiled one ('compiling' entries
    # are not candidates of their own).
    assert seen[1][0] == f"{todo[2].slice_name}:{todo[2].model}"
    assert row["status"] == "fits" and row["report"] == report
    assert [a["status"] for a in row["attempts"]] == ["too_big", "does_not_fit", "skipped", "fits"]
    assert all("report" not in a for a in row["attempts"])


def test_search_goes_on_after_a_timeout(fake_worker):
    todo = plan_table.candidates(SPEC.num_experts, SPEC.batch_size)
    seen = fake_worker([[_entry(todo[0], "compiling")],
                        [_entry(todo[1], "compiling"), _entry(todo[1], "fits", report={})]],
                       sleeps=[30, 0])
    row = plan_table.search(SPEC, timeout_s=2, log=lambda _: None, max_timeouts=2)
    # The timed-out candidate is undecided and listed; the next worker starts after it.
    assert seen[1][0] == f"{todo[1].slice_name}:{todo[1].model}"
    assert row["status"] == "fits"
    assert [a["status"] for a in row["attempts"]] == ["timeout", "fits"]
    assert "did not finish in 2 s" in row["attempts"][0]["reason"]


def test_search_gives_up_after_max_timeouts(fake_worker):
    todo = plan_table.candidates(SPEC.num_experts, SPEC.batch_size)
    fake_worker([[_entry(todo[0], "compiling")]], sleeps=[30])
    row = plan_table.search(SPEC, timeout_s=1, log=lambda _: None, max_timeouts=1)
    assert row["status"] == "failed" and row["report"] is None
    assert "did not finish in 1 s" in row["reason"] and "gave up" in row["reason"]
    assert [a["status"] for a in row["attempts"]] == ["timeout"]


def _report(step_s=0.5, peak=8 * 2**30):
    return {
        "topology": "v4-32", "chips": 16, "chip": vars(tpu_topology.TPU_V4),
        "mesh": {"data": 2, "expert": 8, "model": 1}, "batch_size": 256,
        "task_feature_lengths": {"inputs": 512, "targets": 114},
        "total_parameters": 7_400_000_000, "parameter_bytes": 3 * 2**30,
        "optimizer_state_bytes": 2**24,
        "steps": {"train": {"peak_bytes": peak, "flops": 2.5e13, "compile_s": 41.6,
                            "roofline": {"step_s": step_s, "flop_utilization": 0.25}}},
    }


def _cells(line):
    assert line.startswith("| ") and line.endswith(" |")
    return line[2:-2].split(" | ")


def test_row_of_a_fitting_model():
    row = {"title": "Switch-Base-128", "status": "fits", "report": _report(),
           "published": plan_table.NOT_PUBLISHED}
    cells = _cells(plan_table.format_row(row))
    assert len(cells) == len(plan_table.COLUMNS)
    got = dict(zip(plan_table.COLUMNS, cells, strict=True))
    assert got["parameters"] == "7.40B" and got["slice"] == "v4-32"
    assert got["mesh (data, expert, model)"] == "(2, 8, 1)"
    assert got["params / chip"] == "3.00 GiB" and got["optimizer / chip"] == "16.0 MiB"
    assert got["peak / chip (of 30.75 GiB usable)"] == "8.00 GiB (26%)"
    assert got["TFLOP / step / chip"] == "25" and got["FLOP util."] == "25%"
    # 256 x (512 + 114) tokens in 0.5 s.
    assert got["est. tokens/s"] == f"{256 * 626 * 2:,}"
    assert got["published throughput"] == "not published here"


def test_row_of_a_model_that_did_not_compile_keeps_the_columns():
    row = {"title": "Switch-XXL", "status": "failed", "report": None,
           "reason": "compile did not finish in 600 s on v4-512", "published": "x",
           "scan_layers": True}
    cells = _cells(plan_table.format_row(row))
    assert len(cells) == len(plan_table.COLUMNS)
    assert cells[0] == "Switch-XXL (scanned layers*)" and "did not finish" in cells[3]


@pytest.mark.usefixtures("clean_gin")
@pytest.mark.parametrize("spec", plan_table.CONFIGS, ids=lambda s: s.key)
def test_every_model_gin_takes_the_table_bindings(spec):
    """The bindings name macros the model's gins define (a binding that changes nothing is an
    error), the expert count matches the gin, and the model's feature converter takes the
    feature lengths (no model is built)."""
    gin_cli.parse_gin([spec.gin_file, "runs/pretrain.gin"], spec.bindings(4, 1))
    assert gin.query_parameter("%ACTIVATION_DTYPE") == "bfloat16"
    sparse = (gin.query_parameter("%NUM_DECODER_SPARSE_LAYERS")
              + (gin.query_parameter("%NUM_ENCODER_SPARSE_LAYERS")
                 if "decoder_only" not in spec.gin_file else 0))
    if spec.num_experts is None:
        assert sparse == 0
    else:
        assert sparse > 0 and gin.query_parameter("%NUM_EXPERTS") == spec.num_experts
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    lengths = model.feature_converter_cls(pack=True).get_model_feature_lengths(
        dict(spec.feature_lengths))
    assert all(length > 0 for length in lengths.values())


def test_table_from_earlier_runs_lists_unfinished_models(tmp_path):
    row = {"config": "switch_base", "title": "Switch-Base-128", "gin_file": "g", "batch_size": 256,
           "feature_lengths": {"inputs": 512, "targets": 114}, "published": "not published here",
           "scan_layers": False, "status": "fits", "reason": None, "report": _report(),
           "search_s": 12.0, "attempts": [
               {"candidate": Candidate("v4-8", 4, 1, 4).to_json(), "status": "does_not_fit",
                "reason": "RESOURCE_EXHAUSTED: 33G"},
               {"candidate": Candidate("v4-32", 16, 1, 8).to_json(), "status": "fits"}]}
    run = tmp_path / "a.json"
    run.write_text(json.dumps({"made": "today", "machine": "here", "command": "python -m x",
                               "rows": [row]}))
    out = tmp_path / "plan.md"
    assert plan_table.main([f"--from_json={run}", f"--output={out}",
                            "--configs=switch_base,switch_xxl"]) == 0
    text = out.read_text()
    table = [line for line in text.splitlines() if line.startswith("| Switch")]
    assert len(table) == 2 and "| v4-32 |" in table[0]
    assert "not finished" in table[1] and "did not finish" in table[1]
    assert "v4-8 (data 1, expert 4, model 1): does not fit: RESOURCE_EXHAUSTED: 33G" in text
    assert "python -m x" in text and "Made today on here" in text
    assert f"python -m moe.plan_table --output={out} --configs=switch_base,switch_xxl" in text


def test_search_from_a_start_slice_lists_the_smaller_ones_as_not_tried(fake_worker):
    todo = plan_table.candidates(SPEC.num_experts, SPEC.batch_size)
    v4_16 = next(c for c in todo if c.slice_name == "v4-16")
    seen = fake_worker([[_entry(v4_16, "compiling"), _entry(v4_16, "fits", report=_report())]])
    row = plan_table.search(SPEC, timeout_s=60, log=lambda _: None, start_slice="v4-16")
    assert seen[0][0] == "v4-16:1"
    assert [a["status"] for a in row["attempts"]] == ["not_tried"] * 3 + ["fits"]
    assert "(smaller: undecided, see below)" in plan_table.format_row(row)
