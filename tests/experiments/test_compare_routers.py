"""The router comparison harness, run as a user runs it (`python -m
moe.experiments.compare_routers --preset=quick`): its outputs, the invariants of what it
measured, identical data across routers, a clear error on a bad entry, and a killed run that
resumes to the uninterrupted result."""

import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULE = "moe.experiments.compare_routers"


def run_harness(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", MODULE, *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=900)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    output = str(tmp_path_factory.mktemp("compare") / "out")
    done = run_harness("--preset=quick", f"--output={output}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(os.path.join(output, "results.json")) as f:
        return output, json.load(f), done.stdout


def test_outputs_exist_and_name_every_run(quick):
    output, results, _ = quick
    for name in ("results.json", "report.md", "comparison.png"):
        assert os.path.getsize(os.path.join(output, name)) > 0, name
    assert results["entries"] == ["dense", "gshard_top2", "ec_cf2"]
    runs = {(r["entry"], r["seed"]) for r in results["runs"]}
    assert runs == {(e, s) for e in results["entries"] for s in (0, 1)}
    with open(os.path.join(output, "report.md")) as f:
        report = f.read()
    assert "## The paper's claims at this scale" in report
    for label in ("Dense T5.1.1", "GShard top-2", "Expert choice (cf 2)"):
        assert label in report


def test_same_data_order_across_routers_and_not_across_seeds(quick):
    _, results, _ = quick
    by_seed = {}
    for run in results["runs"]:
        by_seed.setdefault(run["seed"], set()).add(run["data_fingerprint"])
    assert all(len(prints) == 1 for prints in by_seed.values()), by_seed
    assert len({next(iter(p)) for p in by_seed.values()}) == len(by_seed)


def test_curves_are_complete_and_timed(quick):
    _, results, _ = quick
    for run in results["runs"]:
        assert run["steps"] == results["settings"]["TRAIN_STEPS"]
        assert run["held_out"]["step"] == [3, 6]
        assert run["train"]["step"] == [1, 2, 4, 6]
        assert all(np.isfinite(run["train"]["cross_ent_loss"]))
        assert run["median_seconds_per_step"] > 0
        elapsed = run["train"]["elapsed_seconds"]
        assert all(b > a for a, b in itertools.pairwise(elapsed))


def test_routing_invariants(quick):
    _, results, _ = quick
    num_experts = results["settings"]["NUM_EXPERTS"]
    for run in results["runs"]:
        if not run["sparse"]:
            assert run["layers"] == {} and run["experts_per_token"] == 1.0
            continue
        assert len(run["layers"]) == results["settings"]["NUM_ENCODER_SPARSE_LAYERS"]
        tokens = {layer["num_tokens"] for layer in run["layers"].values()}
        assert len(tokens) == 1 and tokens.pop() > 0
        for layer in run["layers"].values():
            counts = layer["experts_per_token_counts"]
            assert len(counts) == num_experts + 1
            assert sum(counts) == layer["num_tokens"]
            assert sum(layer["experts_per_token_buckets"].values()) == layer["num_tokens"]
            assert 0.0 <= layer["fraction_tokens_left_behind"] <= 1.0
            assert all(0.0 <= d <= 1.0 for d in layer["drop_fraction_by_rank"])
            assert layer["fraction_tokens_left_behind"] == pytest.approx(
                counts[0] / layer["num_tokens"])
            assert sum(layer["expert_load"]) == pytest.approx(1.0)
            if run["entry"] == "ec_cf2":
                # Every expert fills the same number of slots: exactly uniform load.
                assert layer["expert_load"] == [1.0 / num_experts] * num_experts
                assert layer["max_over_mean_load"] == 1.0
            if run["entry"] == "gshard_top2":
                assert counts[3:] == [0] * (num_experts - 2)  # at most two experts a token
                assert layer["max_over_mean_load"] >= 1.0
        assert run["experts_per_token"] == 2.0


def test_rerun_reads_finished_runs_back(quick, tmp_path):
    output, results, _ = quick
    copy = str(tmp_path / "copy")
    shutil.copytree(output, copy)
    os.remove(os.path.join(copy, "results.json"))
    done = run_harness("--preset=quick", f"--output={copy}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done earlier, read back") == len(results["runs"])
    assert "[train]" not in done.stdout
    with open(os.path.join(copy, "results.json")) as f:
        assert json.load(f)["runs"] == results["runs"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(quick, tmp_path):
    """The last run loses its result and its final checkpoint, as if killed after step 3:
    rerunning trains steps 4-6 from the checkpoint and measures exactly what the
    uninterrupted run did."""
    output, results, _ = quick
    copy = str(tmp_path / "copy")
    shutil.copytree(output, copy)
    run_dir = os.path.join(copy, "runs", "ec_cf2", "seed1")
    os.remove(os.path.join(run_dir, "result.json"))
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "6"))
    done = run_harness("--preset=quick", f"--output={copy}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resuming from step 3" in done.stdout
    with open(os.path.join(run_dir, "result.json")) as f:
        resumed = json.load(f)
    original = next(r for r in results["runs"] if (r["entry"], r["seed"]) == ("ec_cf2", 1))
    for key in ("held_out", "layers", "data_fingerprint"):
        assert resumed[key] == original[key], key
    # Train rows are period means: the resumed run's row at step 4 holds step 4 alone (the
    # first step after a restart is logged by itself), the uninterrupted one steps 3-4.
    assert resumed["train"]["step"] == original["train"]["step"]
    assert resumed["train"]["cross_ent_loss"][:2] == original["train"]["cross_ent_loss"][:2]
    assert resumed["train"]["cross_ent_loss"][-1] == original["train"]["cross_ent_loss"][-1]


def test_unknown_entry_is_a_clear_error(tmp_path):
    done = run_harness("--preset=quick", f"--output={tmp_path}",
                       "--gin.ComparisonConfig.entries=['dense', 'ec_cf3']")
    assert done.returncode == 2
    assert "Unknown comparison entries ['ec_cf3']" in done.stderr
    assert "ec_cf2" in done.stderr  # the known ones are listed
    assert not os.path.exists(os.path.join(tmp_path, "runs"))
