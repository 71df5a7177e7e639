"""Sparse upcycling from the dense checkpoints researchers have: a Hugging Face T5 v1.1
(converted) into Switch top-1, GShard top-2 and expert-choice models, and the dense layers of a
T5X checkpoint read as is, with the assignment map of runs/sparse_upcycle.gin."""

import os
import subprocess
import sys

import gin
import numpy as np
import pytest

from moe import checkpoints, convert, gin_cli
from moe.checkpoint_sources import flatten_params
from moe.interop import t5x_gin
from moe.interop.model_gin import build_model
from moe.models.param_count import abstract_params
from tests.interop.fixtures import HF_T5_V1_1_TINY, T5X_TINY, require

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPARSE = ["NUM_ENCODER_SPARSE_LAYERS = 1", "NUM_DECODER_SPARSE_LAYERS = 1", "NUM_EXPERTS = 4"]
ROUTERS = {
    "switch_top1": ["NUM_SELECTED_EXPERTS = 1"],
    "gshard_top2": ["NUM_SELECTED_EXPERTS = 2", "TokenChoice.second_expert_policy = 'random'",
                    "TokenChoice.normalize_gates = True"],
    "expert_choice": ["encoder/SparseConfig.router = @encoder/ExpertChoice()"],
}


def upcycle_assignment_map():
    """`train.assignment_map` as runs/sparse_upcycle.gin sets it."""
    gin.clear_config()
    gin_cli.parse_gin(["runs/sparse_upcycle.gin"], ["INITIAL_CHECKPOINT_PATH = 'x'"],
                      finalize=False)
    try:
        return gin.query_parameter("train.assignment_map")
    finally:
        gin.clear_config()


@pytest.fixture(scope="module")
def converted_t5_v1_1(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_t5")
    convert.from_hf(str(require(HF_T5_V1_1_TINY)), str(out))
    gin.clear_config()
    return out


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_hf_t5_v1_1_upcycles_into_every_router(router, converted_t5_v1_1):
    assignment_map = upcycle_assignment_map()
    dense = flatten_params(checkpoints.restore_params_from(
        str(converted_t5_v1_1),
        abstract_params(build_model(gin_files=[str(converted_t5_v1_1 / "model.gin")])))[0])
    model = build_model(gin_files=[str(converted_t5_v1_1 / "model.gin")],
                        bindings=[*SPARSE, *ROUTERS[router]])
    params, report = checkpoints.restore_params_from(
        str(converted_t5_v1_1), abstract_params(model), assignment_map)
    params = flatten_params(params)
    sparse_layers = {"encoder/layers_1", "decoder/stack/layers_1"}
    assert {k for k, v in report.items() if v == "initialized"} == {
        f"{layer}/mlp/router/router_weights/w" for layer in sparse_layers}
    for layer in sparse_layers:
        for kernel in ("wi_0", "wi_1", "wo"):
            experts = np.asarray(params[f"{layer}/mlp/expert/{kernel}"])
            assert experts.shape[0] == 4
            dense_kernel = np.asarray(dense[f"{layer}/mlp/{kernel}"])
            for e in range(4):
                np.testing.assert_array_equal(experts[e], dense_kernel)
    # Everything else is the dense checkpoint's.
    for name, value in dense.items():
        if name in params:
            np.testing.assert_array_equal(np.asarray(params[name]), np.asarray(value))


def test_t5x_checkpoint_dense_layers_upcycle_as_is():
    """The T5X checkpoint's dense layer 0 becomes experts; its MoE layer 1 stays as trained."""
    fixture = require(T5X_TINY)
    model = build_model(t5x_gin.translate_gin_file(str(fixture / "gin" / "model.gin")),
                        bindings=["NUM_ENCODER_SPARSE_LAYERS = 2",
                                  "NUM_DECODER_SPARSE_LAYERS = 2"])
    keep_trained = [(r"(.*/layers_1/mlp/.*)", r"\1")]
    params, report = checkpoints.restore_params_from(
        str(fixture / "legacy" / "checkpoint_30"), abstract_params(model),
        keep_trained + list(upcycle_assignment_map()))
    params = flatten_params(params)
    assert sorted(k for k, v in report.items() if v == "initialized") == [
        "decoder/stack/layers_0/mlp/router/router_weights/w",
        "encoder/layers_0/mlp/router/router_weights/w"]
    from moe.interop.t5x_checkpoint import T5xCheckpoint, find_step_dir

    t5x = T5xCheckpoint.open(find_step_dir(fixture / "legacy" / "checkpoint_30"))
    dense = t5x.read(["encoder/layers_0/mlp/wi_0/kernel",
                      "encoder/layers_1/mlp/expert/wi_0/kernel"])
    experts = np.asarray(params["encoder/layers_0/mlp/expert/wi_0"])
    for e in range(8):
        np.testing.assert_array_equal(experts[e], dense["encoder/layers_0/mlp/wi_0/kernel"])
    np.testing.assert_array_equal(np.asarray(params["encoder/layers_1/mlp/expert/wi_0"]),
                                  dense["encoder/layers_1/mlp/expert/wi_0/kernel"])


@pytest.mark.slow
def test_sparse_upcycle_run_from_converted_hf_t5(converted_t5_v1_1, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "moe.train", f"--gin_file={converted_t5_v1_1 / 'model.gin'}",
         "--gin_file=runs/sparse_upcycle.gin", *[f"--gin.{b.replace(' ', '')}" for b in SPARSE],
         f"--gin.INITIAL_CHECKPOINT_PATH='{converted_t5_v1_1}'",
         f"--gin.MODEL_DIR='{tmp_path / 'upcycled'}'",
         "--gin.MIXTURE_OR_TASK_NAME='pydoc_topics_span_corruption'",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.TRAIN_STEPS=3",
         "--gin.BATCH_SIZE=8", "--gin.EVAL_PERIOD=3", "--gin.EVAL_STEPS=1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout
    assert "fresh: ['decoder/stack/layers_1/mlp/router/router_weights/w', " in proc.stdout
    assert "Training done at step 3" in proc.stdout
