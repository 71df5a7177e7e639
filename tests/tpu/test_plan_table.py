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
    found = plan_table.candidates(128, 256, savers=False)
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


def test_each_slice_tries_remat_then_microbatches_before_the_next():
    found = plan_table.candidates(64, 256)
    v4_8 = [(c.model, c.remat, c.microbatches) for c in found if c.slice_name == "v4-8"]
    assert v4_8 == [(1, False, 1), (2, False, 1), (4, False, 1)] + [
        (m, True, mb) for m in (1, 2, 4) for mb in (1, 2, 4, 8)]
    # Slices stay in order: every v4-8 candidate comes before any v4-16 one.
    names = [c.slice_name for c in found]
    assert names.index("v4-16") == len(v4_8)
    for c in found:
        micro = 256 // c.microbatches
        # A microbatch that its batch shards cannot split is skipped, and named.
        assert (c.skip is not None) == bool(micro % (c.chips // c.model))
    v4_512 = [c for c in found if c.slice_name == "v4-512" and c.model == 2]
    assert [c.skip is None for c in v4_512] == [True, True, True, False, False]
    assert "microbatch of 64 (BATCH_SIZE 256 / 4) is not a multiple of its 128" in v4_512[3].skip


def test_group_size_is_lowered_where_the_batch_shards_cannot_split_the_groups():
    # 256 x 1024 tokens in groups of 4096: 64 groups, fewer than (2, 64, 1)'s 128 batch shards.
    assert plan_table.split_group_size([256 * 1024], 4096, 64, 64) is None
    size = plan_table.split_group_size([256 * 1024], 4096, 64, 128)
    # The largest GROUP_SIZE that splits (4095) gives 128 groups of 2048 tokens: named 2048.
    assert plan_table._groups(256 * 1024, 4095, 64) == 128
    assert size == 2048 and plan_table._groups(256 * 1024, size, 64) == 128
    # Every stack (encoder and decoder tokens) must split with the one GROUP_SIZE.
    both = plan_table.split_group_size([256 * 512, 256 * 114], 4096, 128, 256)
    assert all(plan_table._groups(n, both, 128) % 256 == 0 for n in (256 * 512, 256 * 114))
    # The candidates carry it: EC 8B/64E on v4-512 with 2 data shards, not with 1.
    spec = plan_table.CONFIG_BY_KEY["ec_8b_64e"]
    found = plan_table.candidates(64, 256, slices=["v4-256", "v4-512"],
                                  stack_lengths=spec.stack_lengths(), group_size=4096)
    by_mesh = {(c.slice_name, c.data, c.model, c.microbatches): c.group_size for c in found}
    assert by_mesh["v4-256", 1, 2, 1] is None
    assert by_mesh["v4-256", 2, 1, 1] == size
    assert "GROUP_SIZE" in next(c for c in found if c.group_size).label


def test_model_partitions_are_raised_only_when_the_parameters_do_not_fit():
    todo = plan_table.candidates(64, 256, savers=False)
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


def test_savers_are_tried_at_each_model_partition_compiled():
    todo = plan_table.candidates(64, 256, slices=["v4-8", "v4-16"])
    first, rest = todo[0], todo[1:]
    after = plan_table._after(rest, {"candidate": first.to_json(), "held_bytes": 2**30})
    v4_8 = [c for c in after if c.slice_name == "v4-8"]
    # Temporaries overflowed at model 1: models 2 and 4 are skipped, savers and all; the
    # savers at model 1 are kept in order.
    assert all(c.skip for c in v4_8 if c.model > 1)
    assert [(c.remat, c.microbatches) for c in v4_8 if not c.skip] == [
        (True, 1), (True, 2), (True, 4), (True, 8)]
    assert all(c.skip is None for c in after if c.slice_name == "v4-16")
    # Parameters fill most of a chip: nothing skipped, models 2 and 4 and their savers follow.
    hbm = tpu_topology.TPU_V4.hbm_bytes
    assert plan_table._after(rest, {"candidate": first.to_json(), "held_bytes": hbm}) == rest
    # A failed saver changes nothing: the next saver is tried.
    saver = next(c for c in rest if c.saver)
    assert plan_table._after(rest, {"candidate": saver.to_json(), "held_bytes": 1}) == rest


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


def test_row_found_with_savers_names_them_and_marks_loop_counts():
    fit = Candidate("v4-32", 16, 1, 8, remat=True, microbatches=2, group_size=2048)
    row = {"title": "EC", "status": "fits", "report": _report(), "published": "x",
           "attempts": [{"candidate": fit.to_json(), "status": "fits"}]}
    got = dict(zip(plan_table.COLUMNS, _cells(plan_table.format_row(row)), strict=True))
    assert got["mesh (data, expert, model)"] == "(2, 8, 1) remat, 2 microbatches, GROUP_SIZE 2048"
    # A microbatch loop is counted once: FLOPs and times are per loop body, memory is not.
    assert got["TFLOP / step / chip"] == "25†" and got["est. step s"] == "0.5†"
    assert got["peak / chip (of 30.75 GiB usable)"] == "8.00 GiB (26%)"


@pytest.mark.usefixtures("clean_gin")
@pytest.mark.parametrize("spec", plan_table.CONFIGS, ids=lambda s: s.key)
def test_every_model_gin_takes_the_table_bindings(spec):
    """The bindings name macros the model's gins define (a binding that changes nothing is an
    error), the expert count matches the gin, and the model's feature converter takes the
    feature lengths (no model is built)."""
    gin_cli.parse_gin([spec.gin_file, "runs/pretrain.gin"], spec.bindings(4, 1))
    assert gin.query_parameter("%ACTIVATION_DTYPE") == "bfloat16"
    if spec.num_experts:
        assert gin.query_parameter("%GROUP_SIZE") == spec.group_size
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
    # The savers' bindings parse too, and take effect.
    gin.clear_config()
    gin_cli.parse_gin([spec.gin_file, "runs/pretrain.gin"],
                      spec.bindings(4, 1, True, True, 4, 1024 if spec.num_experts else None))
    assert gin.query_parameter("%NUM_MICROBATCHES") == 4
    assert gin.query_parameter("TransformerConfig.remat") is True
    assert gin.query_parameter("TransformerConfig.scan_layers") is True
    if spec.num_experts:
        assert gin.query_parameter("%GROUP_SIZE") == 1024


def _search_row(config: str, title: str, **fields) -> dict:
    """A row of a run's JSON as `search` writes it (`fields` override the defaults)."""
    return {"config": config, "title": title, "gin_file": "g", "batch_size": 256,
            "feature_lengths": {"inputs": 512, "targets": 114},
            "published": "not published here", "scan_layers": False, "status": "fits",
            "reason": None, "report": None, "search_s": 0.0, "attempts": [], **fields}


def _table_from_runs(tmp_path, runs: list[dict], configs: str) -> tuple[str, str]:
    """(the markdown, its path) `--from_json` makes of these runs' JSON files."""
    paths = []
    for i, run in enumerate(runs):
        paths.append(tmp_path / f"run_{i}.json")
        paths[-1].write_text(json.dumps(run))
    out = tmp_path / "plan.md"
    assert plan_table.main([f"--from_json={','.join(map(str, paths))}", f"--output={out}",
                            f"--configs={configs}"]) == 0
    return out.read_text(), str(out)


def test_table_from_earlier_runs_lists_unfinished_models(tmp_path):
    row = _search_row("switch_base", "Switch-Base-128", report=_report(), search_s=12.0,
                      attempts=[
                          {"candidate": Candidate("v4-8", 4, 1, 4).to_json(),
                           "status": "does_not_fit", "reason": "RESOURCE_EXHAUSTED: 33G"},
                          {"candidate": Candidate("v4-32", 16, 1, 8).to_json(),
                           "status": "fits"}])
    for attempt in row["attempts"]:  # as the runs before the savers wrote them
        for key in ("remat", "microbatches", "group_size"):
            del attempt["candidate"][key]
    text, out = _table_from_runs(tmp_path, [{"made": "today", "machine": "here",
                                             "command": "python -m x", "rows": [row]}],
                                 "switch_base,switch_xxl")
    table = [line for line in text.splitlines() if line.startswith("| Switch")]
    assert len(table) == 2 and "| v4-32 |" in table[0]
    assert "not finished" in table[1] and "did not finish" in table[1]
    assert "v4-8 (data 1, expert 4, model 1): does not fit: RESOURCE_EXHAUSTED: 33G" in text
    assert "python -m x" in text and "Made today on here" in text
    assert f"python -m moe.plan_table --output={out} --configs=switch_base,switch_xxl" in text
    # Found before the savers were searched: the listing says a smaller slice with them is open.
    assert "searched before remat and microbatches were part of the search" in text


def test_a_merged_table_merges_again_with_its_runs_and_newer_rows(tmp_path):
    old = _search_row("switch_xxl", "Switch-XXL", feature_lengths={"targets": 1},
                      published="p", status="not_finished", reason="later")
    new = {**old, "status": "no_fit", "reason": "no v4 slice fits", "scan_layers": True}
    merged = {"made": "then", "machine": "here", "command": "regen",
              "merged_from": ["run a", "run b"], "rows": [old]}
    run = {"made": "now", "machine": "here", "command": "run c", "rows": [new]}
    text, _ = _table_from_runs(tmp_path, [merged, run], "switch_xxl")
    assert "from the rows of 3 runs" in text and "run a\nrun b\nrun c" in text
    assert "| no fit | no v4 slice fits |" in text and "not finished" not in text


def test_search_from_a_start_slice_lists_the_smaller_ones_as_not_tried(fake_worker):
    todo = plan_table.candidates(SPEC.num_experts, SPEC.batch_size)
    v4_16 = next(c for c in todo if c.slice_name == "v4-16")
    seen = fake_worker([[_entry(v4_16, "compiling"), _entry(v4_16, "fits", report=_report())]])
    row = plan_table.search(SPEC, timeout_s=60, log=lambda _: None, start_slice="v4-16")
    assert seen[0][0] == "v4-16:1"
    smaller = [c for c in todo if c.slice_name == "v4-8"]
    assert [a["status"] for a in row["attempts"]] == ["not_tried"] * len(smaller) + ["fits"]
    assert "(smaller: undecided, see below)" in plan_table.format_row(row)
    # The passed-over candidates are one line of the search listing.
    listing = plan_table.format_search(row).splitlines()
    assert len(listing) == 3 and f"{len(smaller)} candidates from v4-8" in listing[1]


def test_a_search_continued_from_a_bigger_slice_keeps_the_earlier_attempts(fake_worker):
    todo = plan_table.candidates(SPEC.num_experts, SPEC.batch_size)
    v4_16 = next(c for c in todo if c.slice_name == "v4-16")
    fake_worker([[_entry(v4_16, "compiling"), _entry(v4_16, "fits", report=_report())]])
    later = plan_table.search(SPEC, timeout_s=60, log=lambda _: None, start_slice="v4-16",
                              end_slice="v4-16")
    v4_8 = [c for c in todo if c.slice_name == "v4-8"]
    earlier = {"attempts": [_entry(c, "does_not_fit", reason="oom") for c in v4_8]
               + [_entry(v4_16, "timeout", reason="slow")], "search_s": 5.0}
    row = plan_table._continued(earlier, later)
    assert [a["status"] for a in row["attempts"]] == ["does_not_fit"] * len(v4_8) + ["fits"]
    assert row["status"] == "fits" and row["search_s"] == later["search_s"] + 5.0


def test_an_end_slice_bounds_the_search_and_its_verdict(fake_worker):
    todo = plan_table.candidates(SPEC.num_experts, SPEC.batch_size)
    v4_8 = [c for c in todo if c.slice_name == "v4-8"]
    seen = fake_worker([[_entry(c, "too_big", reason="params") for c in v4_8]])
    row = plan_table.search(SPEC, timeout_s=60, log=lambda _: None, end_slice="v4-8")
    assert seen == [[f"v4-8:{c.model}" for c in v4_8]]
    assert row["status"] == "no_fit" and "no v4 slice up to v4-8 fits" in row["reason"]


def test_row_of_a_model_that_fits_nowhere_names_the_closest_miss():
    near = Candidate("v4-2048", 1024, 4, 64, remat=True)
    row = {"title": "ST-MoE-32B", "status": "no_fit", "report": None, "published": "x",
           "reason": "no v4 slice up to v4-8192 fits", "attempts": [
               _entry(Candidate("v4-512", 256, 4, 64), "does_not_fit",
                      reason="RESOURCE_EXHAUSTED: ... HLO temporaries (80.22G) exceeds ..."),
               _entry(near, "does_not_fit", reason="... HLO temporaries (64.81G) exceeds ...",
                      held_bytes=29.2 * 2**30),
               _entry(Candidate("v4-8", 4, 1, 4), "too_big", reason="params 116 GiB")]}
    cells = _cells(plan_table.format_row(row))
    assert cells[3] == ("no v4 slice up to v4-8192 fits; closest: v4-2048 (data 4, expert 64, "
                        "model 4, remat), temporaries 64.81 GiB > 30.75 (parameters + "
                        "optimizer state alone 29.2 GiB per chip)")
