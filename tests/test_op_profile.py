"""The per-op profile runs end to end on CPU, its ops are the compiled step's, and bad configs
are refused before anything compiles.

The GPU path (device planes, kernel names, events without an HLO op) runs on fake traces.
"""

import json
import re
from types import SimpleNamespace

import pytest

from moe.benchmarks import op_profile


def test_profile_of_dense_and_moe_steps(tmp_path, capsys):
    out, hlo_dir = tmp_path / "profile.json", tmp_path / "hlo"
    assert op_profile.main([
        "--configs", "dense,top1:index:4", "--d_model", "16", "--d_ff", "32", "--batch", "2",
        "--length", "32", "--steps", "1", "--top", "5", "--json", str(out),
        "--hlo_dir", str(hlo_dir),
    ]) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["platform"] == "cpu"
    assert result["meta"]["config"]["group_size"] == 32  # defaults to --length
    configs = result["configs"]
    assert list(configs) == ["dense", "top1:index:4"]
    for name, config in configs.items():
        assert config["wall_ms"] > 0 and config["busy_us"] > 0, name
        ops = config["ops"]
        assert ops, name
        times = [op["us"] for op in ops]
        assert all(t >= 0 for t in times) and times == sorted(times, reverse=True)
        assert sum(times) == pytest.approx(config["busy_us"])
        assert sum(op["share"] for op in ops) == pytest.approx(1.0)
        assert all(op["calls"] >= 1 for op in ops)  # one step traced: whole calls
        # Every op of the trace is an instruction of the HLO written for this config.
        hlo = (hlo_dir / f"{name.replace(':', '_')}.hlo.txt").read_text()
        assert config["hlo_file"] == str(hlo_dir / f"{name.replace(':', '_')}.hlo.txt")
        instructions = set(re.findall(r"%([\w.\-]+) = ", hlo))
        assert {op["hlo_op"] for op in ops} <= instructions, name
    # The MoE step runs more ops than the dense FFN's (router, dispatch, combine).
    assert len(configs["top1:index:4"]["ops"]) > len(configs["dense"]["ops"])
    printed = capsys.readouterr().out
    assert "=== dense: wall" in printed and "=== top1:index:4: wall" in printed
    top_op = configs["top1:index:4"]["ops"][0]["hlo_op"]
    assert top_op in printed and f"wrote {out}" in printed


@pytest.mark.parametrize("config, named", [
    ("top9:index:4", ["unknown router 'top9'", "top1", "expert_choice"]),
    ("top1:nope:4", ["unknown dispatch 'nope'", "mask, index, dropless"]),
    ("top1:index:x", ["experts 'x'", "positive integer"]),
    ("top1:index:0", ["experts '0'"]),
    ("expert_choice:dropless:4", ["no 'dropless' dispatch", "choose from mask, index"]),
    ("top1:index", ["router:dispatch:experts"]),
])
def test_bad_config_is_refused_before_compiling(config, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        op_profile.main(["--configs", f"dense,{config}", "--steps", "1"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "=== dense" not in captured.out  # nothing ran
    assert f"config {config!r}" in captured.err
    for text in named:
        assert text in captured.err


def _event(op, name, start, duration):
    stats = [("hlo_op", op)] if op is not None else []
    return SimpleNamespace(name=name, start_ns=start, duration_ns=duration, stats=stats)


def _profile(*planes):
    return SimpleNamespace(planes=[
        SimpleNamespace(name=name, lines=[SimpleNamespace(name=f"line {i}", events=events)
                                          for i, events in enumerate(lines)])
        for name, lines in planes
    ])


def test_nested_events_count_their_time_once():
    """A CPU `while` thunk's event encloses its body's: the loop counts its self time only."""
    host = _profile(("/host:CPU", [[
        _event("while.1", "while.1", 0, 100),
        _event("add.2", "add.2", 10, 30),
        _event("add.2", "add.2", 50, 30),
        _event(None, "end: add.2", 80, 5),  # no HLO op: not an op of the step
        _event("copy.3", "copy.3", 200, 20),
    ], [
        _event("add.2", "add.2", 5, 40),  # another thread: overlaps, counted
    ]]))
    totals = op_profile.op_totals(op_profile.op_events(host), steps=2)
    ops = {op["hlo_op"]: op for op in totals["ops"]}
    assert set(ops) == {"while.1", "add.2", "copy.3"}
    assert ops["add.2"]["us"] == pytest.approx(100 / 2 / 1e3)
    assert ops["add.2"]["calls"] == 1.5
    assert ops["while.1"]["us"] == pytest.approx(40 / 2 / 1e3)
    assert ops["copy.3"]["us"] == pytest.approx(20 / 2 / 1e3)
    assert totals["busy_us"] == pytest.approx(160 / 2 / 1e3)
    assert [op["hlo_op"] for op in totals["ops"]] == ["add.2", "while.1", "copy.3"]


def test_on_a_gpu_only_device_planes_count_keyed_by_kernel():
    gpu = _profile(
        ("/host:CPU", [[_event("fusion.1", "fusion.1", 0, 1000)]]),  # host launches: ignored
        ("/device:GPU:0", [[
            _event("command_buffer_1", "gemm_fusion_dot_3", 0, 400),
            _event("command_buffer_1", "loop_add_fusion", 400, 100),
            _event(None, "MemcpyD2D", 600, 50),  # no HLO op, still device time
        ]]),
    )
    totals = op_profile.op_totals(op_profile.op_events(gpu), steps=1)
    assert [(op["hlo_op"], op["name"]) for op in totals["ops"]] == [
        ("command_buffer_1", "gemm_fusion_dot_3"), ("command_buffer_1", "loop_add_fusion"),
        (None, "MemcpyD2D")]
    assert totals["busy_us"] == pytest.approx(0.55)
    assert op_profile._op_label(totals["ops"][0]) == "command_buffer_1 | gemm_fusion_dot_3"
    assert op_profile._op_label(totals["ops"][2]) == "- | MemcpyD2D"
