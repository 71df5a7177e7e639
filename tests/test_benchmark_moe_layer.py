"""The layer benchmark's command line runs end to end on a tiny config and writes its JSON."""

import json

import pytest

from moe.benchmarks import moe_layer


def test_benchmark_writes_table_rows_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    moe_layer.main([
        "--experts", "4", "--routers", "top1,expert_choice", "--dispatches", "index,dropless",
        "--batch", "2", "--length", "16", "--d_model", "8", "--d_ff", "16",
        "--group_size", "16", "--steps", "2", "--warmup", "1", "--json", str(out),
    ])
    result = json.loads(out.read_text())
    rows = {(r["router"], r["dispatch"]): r for r in result["rows"]}
    # Dense reference, the experts alone, top-1 with both dispatches, expert choice without
    # dropless.
    assert set(rows) == {("dense", "-"), ("experts_alone", "-"), ("top1", "index"),
                         ("top1", "dropless"), ("expert_choice", "index")}
    assert rows[("top1", "index")]["capacity"] == 4  # ceil(1.0 * 1 * 16 / 4)
    # The experts alone run on the top-1 buffers: 2 groups of 16 tokens, 4 slots each.
    assert rows[("experts_alone", "-")]["capacity"] == 4
    assert rows[("experts_alone", "-")]["tokens_per_s"] == pytest.approx(
        32 / rows[("experts_alone", "-")]["median_step_s"])
    for row in result["rows"]:
        assert row["median_step_s"] > 0 and row["tokens_per_s"] > 0
    assert "x dense" in capsys.readouterr().out


def test_memory_bound_limit_of_many_experts(tmp_path):
    """The limit is max(dense step, 2 x expert weight bytes / bandwidth): with a slow memory
    (1 MB/s given on the command line) the 64 experts' weights decide it."""
    out = tmp_path / "bench.json"
    moe_layer.main([
        "--experts", "64", "--routers", "top1", "--dispatches", "index", "--batch", "2",
        "--length", "16", "--d_model", "8", "--d_ff", "16", "--group_size", "16",
        "--steps", "1", "--warmup", "1", "--memory_bandwidth", "1e6", "--json", str(out),
    ])
    dense, alone, top1 = json.loads(out.read_text())["rows"]
    assert alone["router"] == "experts_alone"
    weights = 64 * (8 * 16 + 16 * 8) * 4  # relu: wi and wo, float32
    assert dense["expert_weight_bytes"] == weights
    assert dense["memory_bound_s"] == pytest.approx(2 * weights / 1e6)
    assert dense["limit_s"] == max(dense["median_step_s"], dense["memory_bound_s"])
    assert top1["fraction_of_limit"] == pytest.approx(dense["limit_s"] / top1["median_step_s"])


def test_benchmark_rejects_unknown_router():
    with pytest.raises(SystemExit):
        moe_layer.parse_args(["--routers", "top7"])


def test_benchmark_rows_for_the_modern_routers(tmp_path):
    out = tmp_path / "bench.json"
    moe_layer.main([
        "--experts", "4",
        "--routers", "sigmoid_top2_bias,top2_token_major,global_batch_top2,soft_moe",
        "--dispatches", "index,mask", "--batch", "2", "--length", "16", "--d_model", "8",
        "--d_ff", "16", "--group_size", "16", "--steps", "2", "--warmup", "1",
        "--json", str(out),
    ])
    rows = {(r["router"], r["dispatch"]): r for r in json.loads(out.read_text())["rows"]}
    routers = ("sigmoid_top2_bias", "top2_token_major", "global_batch_top2")
    assert {(r, d) for r in routers for d in ("index", "mask")} <= set(rows)
    # Soft MoE runs with the mask dispatch only (its index row is skipped, saying why);
    # slots = tokens: 16 tokens over 4 experts give 4 slots each.
    assert ("soft_moe", "mask") in rows and ("soft_moe", "index") not in rows
    assert rows[("soft_moe", "mask")]["capacity"] == 4
    assert all(r["ratio_to_dense"] > 0 for (name, _), r in rows.items() if name != "dense")


def test_benchmark_in_bfloat16(tmp_path, monkeypatch):
    """`--dtype bfloat16` runs the layer and the dense reference in bfloat16 activations: the
    modules `main` builds get that dtype, and the dense FFN computes in it (params float32)."""
    import jax
    import jax.numpy as jnp

    built = []
    for name in ("MoeLayer", "DenseFfn"):
        original = getattr(moe_layer, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            module = _original(*args, **kwargs)
            built.append((_name, module.dtype))
            return module

        monkeypatch.setattr(moe_layer, name, spy)
    out = tmp_path / "bench.json"
    moe_layer.main([
        "--experts", "4", "--routers", "top2", "--dispatches", "mask,index",
        "--batch", "2", "--length", "16", "--d_model", "8", "--d_ff", "16",
        "--group_size", "16", "--steps", "1", "--warmup", "1", "--dtype", "bfloat16",
        "--json", str(out),
    ])
    result = json.loads(out.read_text())
    assert result["meta"]["config"]["dtype"] == "bfloat16"
    assert {(r["router"], r["dispatch"]) for r in result["rows"]} == {
        ("dense", "-"), ("experts_alone", "-"), ("top2", "mask"), ("top2", "index")}
    assert sorted(built) == [("DenseFfn", jnp.bfloat16), ("MoeLayer", jnp.bfloat16),
                             ("MoeLayer", jnp.bfloat16)]
    monkeypatch.undo()
    dense = moe_layer.DenseFfn(16, "relu", jnp.bfloat16)
    x = jnp.ones((2, 16, 8), jnp.float32)
    params = dense.init(jax.random.key(0), x)["params"]
    assert params["wo"].dtype == jnp.float32
    assert dense.apply({"params": params}, x).dtype == jnp.bfloat16
