"""Starting from a real T5X checkpoint as a T5X user would: converted (`moe.convert
from_t5x`) or as is (INITIAL_CHECKPOINT_PATH / CHECKPOINT_PATH with the T5X model gin), restored
onto a (data 2, expert 4) mesh, fine-tuned on SuperGLUE from local files and evaluated."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from moe import checkpoints, convert
from moe.interop import t5x_gin
from moe.interop.model_gin import build_model
from moe.models.param_count import abstract_params
from moe.partitioning import Partitioner
from moe.trainer import Trainer
from tests.interop.fixtures import T5X_TINY, require

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUPER_GLUE = os.path.join(ROOT, "tests", "seqio_tasks", "fixtures", "super_glue")
FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")


def test_converted_checkpoint_restores_onto_a_data2_expert4_mesh(tmp_path):
    fixture = require(T5X_TINY)
    out = tmp_path / "converted"
    convert.from_t5x(str(fixture / "legacy" / "checkpoint_30"), str(out),
                     gin_file=str(fixture / "gin" / "model.gin"))
    assert (out / "model.gin").is_file() and (out / "checkpoints" / "30").is_dir()

    model = build_model(gin_files=[str(out / "model.gin")],
                        bindings=["ACTIVATION_DTYPE = 'float32'", "MOE_TRUNCATED_DTYPE = 'float32'",
                                  "NUM_EXPERT_PARTITIONS = 4"])
    ref = np.load(fixture / "logits.npz")
    batch = {k: ref[k] for k in FEATURES}
    partitioner = Partitioner(num_expert_partitions=4, num_model_partitions=1)
    assert dict(partitioner.mesh.shape) == {"data": 2, "expert": 4, "model": 1}
    trainer = Trainer(model=model, partitioner=partitioner,
                      input_shapes={k: v.shape for k, v in batch.items()})
    params, report = checkpoints.restore_params_from(str(out), trainer.abstract_state["params"])
    assert "initialized" not in report.values()
    expert = params["encoder"]["layers_1"]["mlp"]["expert"]["wi_0"]
    assert expert.sharding.spec[0] == "expert"
    assert {s.data.shape for s in expert.addressable_shards} == {(2, 32, 64)}
    with partitioner.context():
        logits, _ = jax.jit(model.compute_logits)(params, batch)
    targets = ref["decoder_loss_weights"] > 0
    assert np.abs(np.asarray(logits) - ref["logits_fp32act"])[targets].max() < 1e-4


def _run(module, args):
    env = {**os.environ, "MOE_SUPER_GLUE_DIR": SUPER_GLUE}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout
    return proc.stdout


BOOLQ = ["--gin.MIXTURE_OR_TASK_NAME='super_glue_boolq_v102'",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}", "--gin.BATCH_SIZE=8"]


@pytest.mark.slow
def test_finetune_on_super_glue_then_evaluate_from_a_t5x_checkpoint(tmp_path):
    fixture = require(T5X_TINY)
    t5x_model_gin = f"--gin_file={fixture / 'gin' / 'model.gin'}"
    # 1. As a T5X user passes it: the T5X gin and checkpoint_N directly, on (data 2, expert 4).
    out = _run("moe.train", [
        t5x_model_gin, "--gin_file=runs/finetune.gin", *BOOLQ,
        f"--gin.MODEL_DIR='{tmp_path / 'ft_direct'}'",
        f"--gin.INITIAL_CHECKPOINT_PATH='{fixture / 'legacy' / 'checkpoint_30'}'",
        "--gin.TRAIN_STEPS=2", "--gin.EVAL_PERIOD=2", "--gin.EVAL_STEPS=1",
        "--gin.NUM_EXPERT_PARTITIONS=4"])
    assert "54 parameters restored, fresh: []" in out
    assert "on mesh {'data': 2, 'expert': 4, 'model': 1}" in out

    # 2. Converted first (a standalone copy), fine-tuned, then evaluated with its metrics.
    converted = tmp_path / "converted"
    _run("moe.convert", ["from_t5x", f"--checkpoint={fixture / 'checkpoint_30'}",
                         f"--gin_file={fixture / 'gin' / 'model.gin'}", f"--output={converted}"])
    model_gin = f"--gin_file={converted / 'model.gin'}"
    _run("moe.train", [model_gin, "--gin_file=runs/finetune.gin", *BOOLQ,
                       f"--gin.MODEL_DIR='{tmp_path / 'ft'}'",
                       f"--gin.INITIAL_CHECKPOINT_PATH='{converted}'", "--gin.TRAIN_STEPS=3",
                       "--gin.EVAL_PERIOD=3", "--gin.EVAL_STEPS=1"])
    log = (tmp_path / "ft" / "training_eval" / "super_glue_boolq_v102" / "metrics.jsonl")
    last = json.loads(log.read_text().splitlines()[-1])
    assert 0.0 <= last["inference_eval/super_glue_boolq_v102/accuracy"] <= 100.0
    _run("moe.eval", [model_gin, "--gin_file=runs/eval.gin", *BOOLQ,
                      f"--gin.CHECKPOINT_PATH='{tmp_path / 'ft' / 'checkpoints'}'",
                      f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval'}'"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["super_glue_boolq_v102/accuracy"] <= 100.0

    # 3. The T5X checkpoint as CHECKPOINT_PATH of moe.eval, with the T5X gin.
    _run("moe.eval", [t5x_model_gin, "--gin_file=runs/eval.gin", *BOOLQ,
                      f"--gin.CHECKPOINT_PATH='{fixture}'",
                      f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval_t5x'}'"])
    assert (tmp_path / "eval_t5x" / "metrics.json").is_file()


def test_translated_gin_builds_the_fixture_network():
    fixture = require(T5X_TINY)
    model = build_model(t5x_gin.translate_gin_file(str(fixture / "gin" / "model.gin")))
    abstract = abstract_params(model)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    assert count == json.loads((fixture / "logits_info.json").read_text())["num_params"]
