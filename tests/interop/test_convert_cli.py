"""`python -m moe.convert`: Hugging Face -> ours -> Hugging Face through the command line gives
back the fixture's tensors; user errors exit with status 2 and say what to do."""

import json
import shutil

import gin
import numpy as np
import pytest
from safetensors.numpy import load_file

from moe import convert
from tests.interop.fixtures import HF_SWITCH_TINY, HF_T5_V1_1_TINY, T5X_TINY, require


@pytest.mark.parametrize("fixture", [HF_SWITCH_TINY, HF_T5_V1_1_TINY], ids=["switch", "t5"])
def test_from_hf_then_to_hf_gives_back_the_fixture(fixture, tmp_path, capsys):
    source = require(fixture)
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert convert.main(["from_hf", f"--model_dir={source}", f"--output={ours}"]) == 0
    assert (ours / "model.gin").is_file() and (ours / "checkpoints" / "0").is_dir()
    gin.clear_config()
    assert convert.main(["to_hf", f"--gin_file={ours / 'model.gin'}", f"--checkpoint={ours}",
                         f"--output={back}"]) == 0
    capsys.readouterr()
    original, exported = load_file(source / "model.safetensors"), load_file(
        back / "model.safetensors")
    assert sorted(original) == sorted(exported)
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    config = json.loads((back / "config.json").read_text())
    assert config["architectures"] == json.loads((source / "config.json").read_text())[
        "architectures"]


def test_unsupported_architecture_exits_2(tmp_path, capsys):
    source = require(HF_T5_V1_1_TINY)
    model_dir = tmp_path / "bart"
    shutil.copytree(source, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["BartForConditionalGeneration"]
    (model_dir / "config.json").write_text(json.dumps(config))
    code = convert.main(["from_hf", f"--model_dir={model_dir}", f"--output={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "'BartForConditionalGeneration' is not supported" in err
    for supported in ("SwitchTransformersForConditionalGeneration", "T5ForConditionalGeneration"):
        assert supported in err


def test_t5x_without_its_gin_and_empty_directories_exit_2(tmp_path, capsys):
    fixture = require(T5X_TINY)
    code = convert.main(["from_t5x", f"--checkpoint={fixture / 'checkpoint_30'}",
                         f"--output={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert code == 2 and "no config.gin" in err and "--gin_file" in err
    (tmp_path / "empty").mkdir()
    code = convert.main(["from_t5x", f"--checkpoint={tmp_path / 'empty'}",
                         f"--output={tmp_path / 'o'}"])
    assert code == 2 and "No T5X checkpoint" in capsys.readouterr().err
    code = convert.main(["from_hf", f"--model_dir={tmp_path / 'empty'}",
                         f"--output={tmp_path / 'o'}"])
    assert code == 2 and "config.json does not exist" in capsys.readouterr().err
    assert convert.main(["to_onnx"]) == 2
    assert "from_hf" in capsys.readouterr().err
