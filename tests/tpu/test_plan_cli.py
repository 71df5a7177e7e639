"""`python -m moe.plan`: the plan of a tiny sparse T5 on a v4-8, and its errors (exit 2)."""

import json

import pytest

from moe import plan
from tests.tpu.conftest import requires_libtpu

pytestmark = [requires_libtpu, pytest.mark.usefixtures("clean_gin")]

TINY = ["--gin_file=models/tokens_choose_tiny.gin", "--gin_file=runs/pretrain.gin",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.BATCH_SIZE=16",
        "--gin.GROUP_SIZE=64", "--gin.NUM_EXPERT_PARTITIONS=4"]


def test_plan_of_tiny_sparse_t5_on_v4_8(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert plan.main([*TINY, "--topology=v4-8", f"--json={out}"]) == 0
    report = json.loads(out.read_text())
    assert report["mesh"] == {"data": 1, "expert": 4, "model": 1}
    assert (report["chips"], report["hosts"]) == (4, 1)
    assert report["fits"] and set(report["steps"]) == {"train", "eval"}
    train = report["steps"]["train"]
    assert train["collectives"]["all-to-all"]["count"] >= 4
    assert train["flops"] > 0 and train["temp_bytes"] > 0
    assert train["peak_bytes"] == (train["argument_bytes"] + train["output_bytes"]
                                   - train["alias_bytes"] + train["temp_bytes"])
    # Experts are split over the 4 chips: a chip holds less than the whole float32 model.
    assert 0 < report["parameter_bytes"] < 4 * report["total_parameters"]
    roof = train["roofline"]
    assert roof["step_s"] >= max(roof["compute_s"], roof["memory_s"]) > 0
    printed = capsys.readouterr().out
    assert "| train |" in printed and "all-to-all" in printed and "assumptions:" in printed


@pytest.mark.parametrize("argv,message", [
    (["--gin.NUM_MODEL_PARTITIONS=3", "--topology=v4-8"], "NUM_MODEL_PARTITIONS=3"),
    (["--gin.NUM_MODEL_PARTITIONS=4", "--topology=v4-8"], "not divisible by 4"),
    (["--gin.BATCH_SIZE=6", "--topology=v4-8"], "BATCH_SIZE=6"),
    (["--topology=v4-6"], "Unknown TPU slice"),
])
def test_bad_partitioning_is_exit_2_with_the_fix(argv, message, capsys):
    assert plan.main([*TINY, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_the_compilers_out_of_memory_verdict_is_exit_2(capsys):
    # A 1M-token vocabulary: the logits and their gradient need about 60 GiB per chip.
    argv = [*TINY, "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 128}",
            "--gin.BATCH_SIZE=512", "--gin.NUM_EMBEDDINGS=1000000", "--topology=v4-8",
            "--no_eval"]
    assert plan.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Does not fit on v4-8") and "exceeds available HBM" in err
    assert "NUM_MICROBATCHES" in err


def test_what_overflows_is_named():
    report = {
        "parameter_bytes": 2 * plan.GiB, "optimizer_state_bytes": 1 * plan.GiB,
        "steps": {"train": {"temp_bytes": 40 * plan.GiB, "peak_bytes": 43 * plan.GiB}},
    }
    chip = plan.tpu_topology.TPU_V4
    message = str(plan._overflow_error(report, "v4-8", chip))
    assert "43.00 GiB per chip" in message and "30.75 GiB" in message
    assert "The largest is temporaries" in message and "NUM_MICROBATCHES" in message
    report["parameter_bytes"] = 50 * plan.GiB
    assert "The largest is parameters" in str(plan._overflow_error(report, "v4-8", chip))
