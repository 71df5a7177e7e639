"""The persistent compilation cache: where `MOE_COMPILATION_CACHE_DIR` puts it, that the entry
points turn it on before anything compiles, that a second process reads what the first wrote,
that a resumed `moe.train` run finds its train step there, and that a train step compiled in
the background is the one the first step runs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from moe import compilation_cache, data
from moe.entry_point import run_entry_point
from moe.partitioning import Partitioner
from moe.trainer import Trainer
from tests.trainer import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture
def jax_cache_settings():
    """Put JAX's cache settings back as they were (nothing compiles while they are changed)."""
    saved = {name: getattr(jax.config, name) for name in SETTINGS}
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_directory_default_moves_with_the_cache_root_and_the_variable(tmp_path):
    home = os.path.expanduser("~")
    assert compilation_cache.cache_directory({}) == os.path.join(
        home, ".cache", "moe", "jax_compilation_cache")
    assert compilation_cache.cache_directory({"MOE_COMPILATION_CACHE_DIR": ""}) == os.path.join(
        home, ".cache", "moe", "jax_compilation_cache")
    assert compilation_cache.cache_directory({"MOE_CACHE_DIR": str(tmp_path)}) == str(
        tmp_path / "jax_compilation_cache")
    assert compilation_cache.cache_directory(
        {"MOE_CACHE_DIR": str(tmp_path), "MOE_COMPILATION_CACHE_DIR": "~/elsewhere"}
    ) == os.path.join(home, "elsewhere")
    for off in ("off", "OFF", "0", "false", "no", "none"):
        assert compilation_cache.cache_directory({"MOE_COMPILATION_CACHE_DIR": off}) is None


def test_enable_sets_the_directory_and_thresholds(tmp_path, jax_cache_settings):
    directory = compilation_cache.enable({"MOE_CACHE_DIR": str(tmp_path)})
    assert directory == str(tmp_path / "jax_compilation_cache")
    assert jax.config.jax_compilation_cache_dir == directory
    assert (jax.config.jax_persistent_cache_min_compile_time_secs
            == compilation_cache.MIN_COMPILE_TIME_SECS < 1.0)  # JAX's default skips CPU programs
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1


def test_enable_leaves_jax_settings_and_off_alone(tmp_path, jax_cache_settings):
    assert compilation_cache.enable({"MOE_COMPILATION_CACHE_DIR": "off"}) is None
    assert jax.config.jax_compilation_cache_dir is None
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.5)
    compilation_cache.enable({"MOE_COMPILATION_CACHE_DIR": str(tmp_path),
                              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "2.5"})
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.5
    # A directory JAX was given (JAX_COMPILATION_CACHE_DIR or the program) wins.
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_own"))
    assert compilation_cache.enable({"MOE_COMPILATION_CACHE_DIR": str(tmp_path / "ours")}) == str(
        tmp_path / "jax_own")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax_own")


def test_entry_points_turn_the_cache_on_before_running(tmp_path, monkeypatch, jax_cache_settings):
    monkeypatch.setenv("MOE_COMPILATION_CACHE_DIR", str(tmp_path / "cache"))
    code, seen = run_entry_point("test", lambda: jax.config.jax_compilation_cache_dir, argv=[])
    assert (code, seen) == (0, str(tmp_path / "cache"))


SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from moe import compilation_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
directory = compilation_cache.enable()
jax.jit(lambda x: jnp.sin(x) @ x.T + 1).lower(jnp.ones((8, 8))).compile()
print(json.dumps({"directory": directory, "hits": events.count(
    "/jax/compilation_cache/cache_hits")}))
"""


def _compile_in_a_process(cache_dir):
    env = {**os.environ, "MOE_COMPILATION_CACHE_DIR": str(cache_dir),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # this tiny program too
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_a_second_process_reads_what_the_first_wrote(tmp_path):
    cache = tmp_path / "cache"
    first = _compile_in_a_process(cache)
    assert first == {"directory": str(cache), "hits": 0}
    entries = sorted(os.listdir(cache))
    assert entries and all(e.startswith("jit_") for e in entries)
    second = _compile_in_a_process(cache)
    assert second["hits"] >= 1
    assert sorted(os.listdir(cache)) == entries  # found, so nothing new was written


def test_background_compilation_is_the_one_the_first_step_runs():
    shapes = {k: (8, 16) for k in ("decoder_input_tokens", "decoder_target_tokens",
                                   "decoder_loss_weights")}
    trainer = Trainer(toy.ToyModel(), Partitioner(num_expert_partitions=2), shapes)
    compilation_cache.compile_in_background(trainer.lower_train_step()).result()
    state = trainer.init_state()
    cfg = data.DatasetConfig(toy.TOY_TASK, {"targets": 16}, batch_size=8, module=None)
    converter = toy.ToyModel.feature_converter_cls(pack=False)
    batch = next(data.get_dataset(cfg, converter).as_numpy_iterator())
    assert set(batch) == set(shapes) and all(v.dtype == np.int32 for v in batch.values())
    compiles = []

    def listener(name, duration, **kw):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        sharded = trainer.partitioner.shard_batch(batch)
        compiles.clear()
        state, metrics = trainer.train_step(state, sharded)
        jax.block_until_ready(metrics)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []  # the step ran the executable compiled in the background
    assert int(state["step"]) == 1 and np.isfinite(float(metrics["loss"]))


def test_a_background_compilation_error_reaches_the_waiter():
    class Broken:
        def compile(self):
            raise RuntimeError("no backend")

    future = compilation_cache.compile_in_background(Broken())
    with pytest.raises(RuntimeError, match="no backend"):
        future.result(timeout=60)


TOY = ["--gin_file=tests/trainer/toy_model.gin", "--gin_file=runs/pretrain.gin",
       "--gin.MIXTURE_OR_TASK_NAME='toy_trainer_lm'", "--gin.TASK_FEATURE_LENGTHS={'targets': 16}",
       "--gin.BATCH_SIZE=8", "--gin.LOG_PERIOD=1", "--gin.CHECKPOINT_PERIOD=3",
       "--gin.EVAL_PERIOD=1000", "--gin.train.write_plots=False"]


def _train(model_dir, steps, cache):
    env = {**os.environ, "MOE_COMPILATION_CACHE_DIR": str(cache)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    subprocess.run([sys.executable, "-m", "moe.train", *TOY, f"--gin.TRAIN_STEPS={steps}",
                    f"--gin.MODEL_DIR='{model_dir}'"], cwd=ROOT, env=env, check=True,
                   capture_output=True, text=True, timeout=600)
    with open(os.path.join(model_dir, "train", "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.slow
def test_a_resumed_run_loads_its_train_step_and_matches_the_uninterrupted_one(tmp_path):
    cache = tmp_path / "cache"
    straight = _train(tmp_path / "straight", 6, cache)
    steps = [e for e in os.listdir(cache) if e.startswith("jit__train_step-")]
    assert len(steps) == 1
    _train(tmp_path / "resumed", 3, cache)
    resumed = _train(tmp_path / "resumed", 6, cache)
    # Same program, same key: the resumed runs wrote no second train step.
    assert [e for e in os.listdir(cache) if e.startswith("jit__train_step-")] == steps
    assert sorted(resumed) == sorted(straight) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step
