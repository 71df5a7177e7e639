"""Orbax checkpoints: period/keep, restore latest or a step, other meshes, dtype casts,
partial restore with assignment maps, fallback to scratch, sparse upcycling."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from moe import checkpoints
from moe.partitioning import Partitioner


def _state(mesh=None):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    state = {
        "step": jnp.asarray(3, jnp.int32),
        "params": {
            "mlp": {"expert": {"wi": jax.random.normal(k1, (8, 4, 6))}},
            "dense": {"wi": jax.random.normal(k2, (4, 6))},
            "embed": jax.random.normal(k3, (16, 4)),
        },
        "opt_state": {"count": jnp.asarray(3, jnp.int32)},
    }
    if mesh is not None:
        expert = NamedSharding(mesh, PartitionSpec("expert", None, None))
        state["params"]["mlp"]["expert"]["wi"] = jax.device_put(
            state["params"]["mlp"]["expert"]["wi"], expert)
    return state


def _abstract(state, sharding_for, dtype=None):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, dtype if dtype and x.ndim else x.dtype,
                                       sharding=sharding_for(x)), state)


def test_period_keep_and_latest(tmp_path):
    ckpt = checkpoints.Checkpointer(str(tmp_path / "c"), period=2, keep=2, async_save=True)
    state = _state()
    saved = [ckpt.save(s, state, {"batches": s}) for s in range(1, 8)]
    ckpt.wait_until_finished()
    assert saved == [False, True, False, True, False, True, False]
    assert ckpt.all_steps() == [4, 6]
    ckpt.save(7, state, {"batches": 7}, force=True)
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 7
    _, data = ckpt.restore(_abstract(state, lambda x: None), step=6)
    assert data == {"batches": 6}
    with pytest.raises(checkpoints.CheckpointError, match="available steps"):
        ckpt.restore(_abstract(state, lambda x: None), step=5)
    assert ckpt.delete_after(6) == [7]
    assert ckpt.all_steps() == [6]  # keep=2 had dropped step 4 when 7 was saved
    ckpt.close()


def test_relative_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = _state()
    ckpt = checkpoints.Checkpointer("relative/ckpt", period=1)
    ckpt.save(1, state, {})
    ckpt.close()
    params, _ = checkpoints.restore_params_from("relative/ckpt", state["params"])
    np.testing.assert_array_equal(params["embed"], state["params"]["embed"])


def test_temporary_directories_are_not_checkpoints(tmp_path):
    ckpt = checkpoints.Checkpointer(str(tmp_path / "c"), period=1)
    ckpt.save(1, _state(), {}, force=True)
    ckpt.wait_until_finished()
    # What a kill during a save leaves: an unfinished temporary step directory.
    (tmp_path / "c" / "2.orbax-checkpoint-tmp-123").mkdir()
    ckpt.close()
    reopened = checkpoints.Checkpointer(str(tmp_path / "c"), period=1)
    assert reopened.latest_step() == 1
    reopened.close()


@pytest.mark.parametrize("target", ["expert8", "one_device"])
def test_restore_onto_another_mesh_and_dtype(tmp_path, target):
    saved_on = Partitioner(num_expert_partitions=4)  # 8 devices: data 2 x expert 4
    assert dict(saved_on.mesh.shape) == {"data": 2, "expert": 4, "model": 1}
    state = _state(saved_on.mesh)
    ckpt = checkpoints.Checkpointer(str(tmp_path / "c"), period=1)
    ckpt.save(3, state, {"batches": 3})
    ckpt.close()

    devices = None if target == "expert8" else jax.devices()[:1]
    mesh = Partitioner(num_expert_partitions=8, devices=devices).mesh
    def sharding_for(x):
        spec = PartitionSpec("expert", None, None) if x.shape == (8, 4, 6) else PartitionSpec()
        return NamedSharding(mesh, spec)
    restored, data = checkpoints.Checkpointer(str(tmp_path / "c")).restore(
        _abstract(state, sharding_for))
    assert data == {"batches": 3}
    wi = restored["params"]["mlp"]["expert"]["wi"]
    assert wi.sharding.mesh.shape["expert"] == (8 if target == "expert8" else 1)
    jax.tree.map(np.testing.assert_array_equal, restored, state)

    as_bf16, _ = checkpoints.Checkpointer(str(tmp_path / "c")).restore(
        _abstract(state, sharding_for, dtype=jnp.bfloat16))
    assert as_bf16["params"]["embed"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(as_bf16["params"]["embed"],
                                  state["params"]["embed"].astype(jnp.bfloat16))


def _save_dense(tmp_path):
    state = _state()
    ckpt = checkpoints.Checkpointer(str(tmp_path / "pre"), period=1)
    ckpt.save(5, state, {})
    ckpt.close()
    return state


def test_partial_restore_with_assignment_map_and_fallback(tmp_path):
    pre = _save_dense(tmp_path)
    new = {"embed": jnp.zeros((16, 4), jnp.bfloat16), "head": jnp.ones((4, 3)),
           "renamed": {"wi": jnp.zeros((4, 6))}}
    with pytest.raises(checkpoints.CheckpointError, match=r"head.*not in the checkpoint"):
        checkpoints.restore_params_from(str(tmp_path / "pre"), new,
                                        [(r"renamed/(.*)", r"dense/\1")])
    params, report = checkpoints.restore_params_from(
        str(tmp_path / "pre"), new, [(r"renamed/(.*)", r"dense/\1")], fallback_to_scratch=True,
        strict=False)
    assert report == {"embed": "embed", "head": "initialized", "renamed/wi": "dense/wi"}
    assert params["embed"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(params["embed"], pre["params"]["embed"].astype(jnp.bfloat16))
    np.testing.assert_array_equal(params["renamed"]["wi"], pre["params"]["dense"]["wi"])
    np.testing.assert_array_equal(params["head"], 1.0)
    # A None source keeps the initialization even when the checkpoint has the parameter.
    params, report = checkpoints.restore_params_from(
        str(tmp_path / "pre") + "/5", new, [(r"embed", None), (r"renamed/(.*)", r"dense/\1")],
        fallback_to_scratch=True, strict=False)
    assert report["embed"] == "initialized"
    np.testing.assert_array_equal(params["embed"], 0.0)


def test_shape_mismatch_is_named(tmp_path):
    _save_dense(tmp_path)
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"embed: the model's shape is \(3, 4\), the checkpoint's embed has "
                             r"\(16, 4\)"):
        checkpoints.restore_params_from(str(tmp_path / "pre"), {"embed": jnp.zeros((3, 4))},
                                        strict=False)


def test_checkpoint_parameters_the_model_lacks_are_an_error(tmp_path):
    """A model gin with fewer parameters than the checkpoint (fewer layers, tied logits...)
    would silently drop weights: strict restores refuse, naming them."""
    _save_dense(tmp_path)
    with pytest.raises(checkpoints.CheckpointError, match=r"no model parameter takes.*dense/wi"):
        checkpoints.restore_params_from(str(tmp_path / "pre"), {"embed": jnp.zeros((16, 4))})


def test_sparse_upcycling_copies_dense_into_every_expert(tmp_path):
    pre = _save_dense(tmp_path)
    moe = {"moe": {"expert": {"wi": jnp.zeros((8, 4, 6))}, "router": jnp.zeros((4, 8))}}
    params, report = checkpoints.restore_params_from(
        str(tmp_path / "pre"), moe, [(r"moe/router", None), (r"moe/expert/(.*)", r"dense/\1")],
        strict=False)
    assert report["moe/router"] == "initialized"
    for e in range(8):
        np.testing.assert_array_equal(
            params["moe"]["expert"]["wi"][e], pre["params"]["dense"]["wi"])


def test_missing_checkpoint_and_unwritable_dir(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="INITIAL_CHECKPOINT_PATH"):
        checkpoints.restore_params_from(str(tmp_path / "none"), {"a": jnp.zeros(2)})
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(checkpoints.CheckpointError, match="not writable"):
        checkpoints.directory_is_writable(str(blocker / "sub"))


def test_checkpoint_paths_are_made_absolute_but_urls_stay_urls(tmp_path, monkeypatch):
    """Orbax needs absolute paths; a gs:// MODEL_DIR or checkpoint must reach TensorStore as the
    URL it is (os.path.abspath would turn it into a local folder named 'gs:')."""
    from moe.checkpoint_sources import absolute_path

    monkeypatch.chdir(tmp_path)
    assert str(absolute_path("gs://bucket/run/checkpoints")) == "gs://bucket/run/checkpoints"
    assert str(absolute_path("run")) == str(tmp_path / "run")


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_sparse_upcycling_builds_each_expert_shard_on_its_device(tmp_path):
    """Upcycling a dense kernel into 64 expert-sharded copies never stages the 64 copies on the
    host: each of the 8 devices builds its own 8 experts. On CPU the devices' buffers are host
    memory too, so the process's peak resident memory during the restore is measured (Linux
    resets the peak through /proc/self/clear_refs): the final array plus at most a fraction
    more, where staging every copy first would double it."""
    dense = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)  # 1 MiB
    ckpt = checkpoints.Checkpointer(str(tmp_path / "dense"), period=1)
    ckpt.save(1, {"step": 1, "params": {"mlp": {"wi": jnp.asarray(dense)}}}, {})
    ckpt.close()
    mesh = Partitioner(num_expert_partitions=8).mesh
    experts = 64
    sharding = NamedSharding(mesh, PartitionSpec("expert", None, None))
    target = {"moe": {"expert": {"wi": jax.ShapeDtypeStruct((experts, 256, 1024), jnp.float32,
                                                            sharding=sharding)}}}
    checkpoints.restore_params_from(  # warm-up: Orbax and JAX allocate their own state once
        str(tmp_path / "dense"), {"mlp": {"wi": jax.ShapeDtypeStruct(dense.shape, jnp.float32)}})
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _resident_kib("VmRSS")
    params, report = checkpoints.restore_params_from(
        str(tmp_path / "dense"), target, [(r"moe/expert/(.*)", r"mlp/\1")])
    peak = _resident_kib("VmHWM") - before
    wi = params["moe"]["expert"]["wi"]
    assert report == {"moe/expert/wi": "mlp/wi"} and wi.sharding == sharding
    assert {s.data.shape for s in wi.addressable_shards} == {(experts // 8, 256, 1024)}
    all_copies = experts * dense.nbytes // 1024
    assert peak < 1.5 * all_copies, f"peak +{peak} KiB; the expert array is {all_copies} KiB"
    for shard in wi.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data)[3], dense)
