"""The accelerator check runs end to end on CPU (--quick), and a broken dispatch makes it fail.

Accelerator time is rare: the command must work the first time it meets a GPU, so its whole
path (correctness, device equivalence, speed rows, torch skip, JSON) runs here on 8 emulated
devices.
"""

import json

import pytest

from moe import dispatch as dispatch_module
from moe.benchmarks import gpu_check


def _rows(path):
    result = json.loads(path.read_text())
    return result, result["rows"]


@pytest.mark.slow  # ~30 s on two CPU cores: every row is a compilation
def test_quick_check_passes_and_writes_every_kind_of_row(tmp_path, capsys, monkeypatch):
    # One E of the quick pair keeps the test fast (each speed row is a compilation).
    monkeypatch.setitem(gpu_check.SIZES, "quick", {**gpu_check.SIZES["quick"], "experts": [8]})
    out = tmp_path / "check.json"
    assert gpu_check.main(["--quick", "--json", str(out)]) == 0
    result, rows = _rows(out)
    assert result["meta"]["platform"] == "cpu" and result["meta"]["device_count"] == 8
    assert result["meta"]["sizes"]["experts"] == [8]

    dispatch_rows = {(r["router"], r["pair"]): r for r in rows if r["check"] == "dispatch"}
    assert set(dispatch_rows) == {
        ("top1", "mask vs index"), ("top1", "dropless vs index"),
        ("top2", "mask vs index"), ("top2", "dropless vs index"),
        ("expert_choice", "mask vs index"),  # expert choice has no dropless form
        ("top2", "mask vs index, default"),  # outputs at the default matmul precision
    }
    for row in dispatch_rows.values():
        assert row["status"] == "PASS", row
        assert row["max_rel"] <= row["rtol"]
    # One-hot einsums at full precision move values exactly.
    assert dispatch_rows[("top2", "mask vs index")]["max_abs_out"] < 1e-5

    (devices,) = [r for r in rows if r["check"] == "devices"]
    assert devices["pair"] == "8 devices vs 1 device" and devices["status"] == "PASS"
    assert devices["expert_partitions"] == 8

    speed = {(r["experts"], r["router"], r["dispatch"]): r for r in rows
             if r["check"] == "speed" and r["router"] != "dense"}
    dense = [r for r in rows if r["router"] == "dense"]
    # Dense of the expert d_ff, and the equal-FLOPs reference of top-2: twice as wide.
    assert sorted(r["d_ff"] for r in dense) == [32, 64]
    assert all(r["status"] == "ok" and r["median_step_s"] > 0 for r in dense)
    for experts in (8,):
        top2 = speed[(experts, "top2", "index")]
        assert top2["status"] == "ok" and top2["median_step_s"] > 0
        assert top2["equal_flops_d_ff"] == 64
        assert top2["x_dense"] > 0 and top2["x_eqflops"] > 0
        assert {(experts, "top2", d) for d in ("mask", "dropless")} <= set(speed)

    (torch_row,) = [r for r in rows if r["check"] == "torch"]
    assert torch_row["status"] == "SKIPPED" and torch_row["reason"]

    printed = capsys.readouterr().out
    assert "device: cpu" in printed and "checks PASS" in printed and "SKIPPED" in printed


def test_a_dispatch_that_disagrees_fails_the_check(tmp_path, monkeypatch):
    routers = gpu_check.correctness_routers
    monkeypatch.setattr(gpu_check, "correctness_routers",
                        lambda e: {"top2": routers(e)["top2"]})  # fewer compilations
    dispatch, combine = dispatch_module.BUFFERED_DISPATCH["mask"]
    monkeypatch.setitem(dispatch_module.BUFFERED_DISPATCH, "mask",
                        (dispatch, lambda out, plan: combine(out, plan) + 1e-3))
    out = tmp_path / "check.json"
    assert gpu_check.main(["--quick", "--skip_speed", "--json", str(out)]) == 1
    _, rows = _rows(out)
    status = {(r["router"], r["pair"]): r["status"] for r in rows}
    assert status[("top2", "mask vs index")] == "FAIL"
    assert status[("top2", "dropless vs index")] == "PASS"


def test_a_grouped_matmul_that_computes_rows_past_the_groups_fails(monkeypatch):
    """The grouped rows' check puts rows holding 1e4 past the groups: a form that runs them
    with the last group (output there, and their share of the last weight gradient) fails,
    the exact 'blocked' form passes."""
    from moe import grouped_matmul as gm

    def leaky(x, w, group_sizes):
        return gm.blocked_grouped_matmul(x, w, group_sizes.at[-1].add(
            x.shape[0] - group_sizes.sum()))

    monkeypatch.setitem(gm.IMPLEMENTATIONS, "leaky", leaky)
    sizes = {**gpu_check.SIZES["quick"], "experts": [4], "steps": 1, "warmup": 0}
    args = gpu_check.parse_args(["--quick", "--grouped_matmuls", "blocked,leaky"])
    checks = {r["router"]: r["status"] for r in gpu_check.grouped_rows(args, sizes)
              if r.get("pair") == "bf16 vs f32 blocked"}
    assert checks == {"blocked": "PASS", "leaky": "FAIL"}


def test_speed_rows_compare_top2_with_dense_references(monkeypatch):
    """The speed path alone (fast): top-2 index at E=8 against dense d_ff and 2 * d_ff."""
    monkeypatch.setattr(gpu_check, "DISPATCHES", ("index",))
    sizes = {**gpu_check.SIZES["quick"], "experts": [8]}
    args = gpu_check.parse_args(["--quick"])
    rows = gpu_check.speed_rows(args, sizes)
    dense = {r["d_ff"]: r for r in rows if r["router"] == "dense"}
    (top2,) = [r for r in rows if r["router"] == "top2"]
    assert set(dense) == {32, 64} and all(r["status"] == "ok" for r in dense.values())
    assert top2["status"] == "ok" and top2["equal_flops_d_ff"] == 64
    assert top2["x_eqflops"] == pytest.approx(
        dense[64]["median_step_s"] / top2["median_step_s"])
    assert gpu_check.torch_rows(args, sizes)[0]["status"] == "SKIPPED"


def test_one_device_is_skipped_not_failed(monkeypatch):
    import jax

    monkeypatch.setattr(jax, "local_devices", lambda: jax.devices()[:1])
    row = gpu_check.check_devices(gpu_check.SIZES["quick"], 1e-5, batch=8)
    assert row["status"] == "SKIPPED" and row["reason"] == "only one device"


def test_unknown_router_is_refused():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--routers", "top7"])


def test_steps_flag_sets_the_timed_steps():
    # A count below 1 is refused while parsing: test_benchmark_flags.py.
    assert gpu_check.run_sizes(gpu_check.parse_args([]))["steps"] == 5
    assert gpu_check.run_sizes(gpu_check.parse_args(["--quick"]))["steps"] == 1
    sizes = gpu_check.run_sizes(gpu_check.parse_args(["--steps", "20", "--routers", "top1"]))
    assert sizes["steps"] == 20 and sizes["routers"] == ["top1"]
    assert gpu_check.SIZES["full"]["steps"] == 5  # the preset itself is not changed
