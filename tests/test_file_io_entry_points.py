"""The entry points with their outputs under a URL (TensorFlow's in-memory `ram://`, standing
in for a `gs://` MODEL_DIR on a pod): every file lands there and nothing on the local disk.

Orbax reaches storage through etils' epath and TensorStore, neither of which has a `ram://`
filesystem, so the checkpoints of these tests stay in a local folder; a `gs://` MODEL_DIR
keeps them in the bucket (`moe.checkpoint_sources.absolute_path`)."""

import io
import json
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from moe import checkpoints, convert, data, evaluation, file_io, infer, logits, train
from moe import eval as moe_eval
from moe.experiments import report
from tests.experiments.test_claims import layer, results, run
from tests.test_file_io import ram_root
from tests.trainer.toy import TOY_TASK, VOCAB, ToyModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXACT_TASK = "toy_file_io_exact"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _exact_match(targets, predictions):
    return {"exact": 100.0 * float(np.mean([list(t) == list(p)
                                            for t, p in zip(targets, predictions, strict=True)]))}


if EXACT_TASK not in seqio.TaskRegistry.names():
    toy = seqio.get_mixture_or_task(TOY_TASK)
    seqio.TaskRegistry.add(EXACT_TASK, source=toy.source, preprocessors=toy.preprocessors,
                           output_features=toy.output_features, metric_fns=[_exact_match])


class PredictingToyModel(ToyModel):
    """The trainer tests' toy model with a stand-in decoder (it answers the targets) and the
    logits API of `moe.logits`."""

    module_inputs = ("decoder_input_tokens", "decoder_target_tokens")

    def predict_batch(self, params, batch, **kwargs):
        return batch["decoder_target_tokens"]

    def compute_logits(self, params, batch, router_state=None):
        logits, _ = self.module.apply({"params": params}, batch["decoder_input_tokens"],
                                      mutable=["moe"])
        return logits.astype(jnp.float32), {}

    def sequence_log_likelihood(self, logits, batch):
        log_probs = jax.nn.log_softmax(logits)
        targets = batch["decoder_target_tokens"][..., None]
        return jnp.take_along_axis(log_probs, targets, -1)[..., 0].sum(-1)


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _local_checkpoints(monkeypatch, folder) -> list[str]:
    """Send the trainer's checkpoints to `folder`; returns the directories it asked for."""
    real, asked = checkpoints.Checkpointer, []

    def local_checkpointer(directory, *args, **kwargs):
        asked.append(directory)
        return real(str(folder), *args, **kwargs)

    monkeypatch.setattr(checkpoints, "Checkpointer", local_checkpointer)
    return asked


def _steps(path):
    return [json.loads(line)["step"] for line in file_io.read_text(path).splitlines()]


def test_training_writes_its_model_dir_files_under_a_url(tmp_path, local_cwd, monkeypatch):
    model_dir = f"{ram_root()}/run"
    gin_dir = ram_root()  # the model gin is read from a URL too
    file_io.makedirs(gin_dir)
    with open(os.path.join(ROOT, "tests", "trainer", "toy_model.gin")) as f:
        file_io.write_text(f"{gin_dir}/toy_model.gin", f.read())
    asked = _local_checkpoints(monkeypatch, tmp_path / "checkpoints")
    code = train.main([
        f"--gin_file={gin_dir}/toy_model.gin", "--gin_file=runs/pretrain.gin",
        f"--gin.MODEL_DIR='{model_dir}'", f"--gin.MIXTURE_OR_TASK_NAME='{TOY_TASK}'",
        "--gin.TASK_FEATURE_LENGTHS={'targets': 16}", "--gin.BATCH_SIZE=8",
        "--gin.TRAIN_STEPS=2", "--gin.LOG_PERIOD=1", "--gin.EVAL_PERIOD=2", "--gin.EVAL_STEPS=1",
    ])
    assert code == 0
    assert asked == [f"{model_dir}/checkpoints"]
    assert file_io.listdir(model_dir) == ["config.gin", "operative_config.gin", "parameters.txt",
                                          "train", "training.png", "training_eval"]
    assert "TRAIN_STEPS = 2" in file_io.read_text(f"{model_dir}/config.gin")
    assert f"MODEL_DIR = '{model_dir}'" in file_io.read_text(f"{model_dir}/operative_config.gin")
    assert file_io.read_text(f"{model_dir}/parameters.txt").startswith("mesh {")
    assert _steps(f"{model_dir}/train/metrics.jsonl") == [1, 2]
    assert _steps(f"{model_dir}/training_eval/{TOY_TASK}/metrics.jsonl") == [2]
    assert any(n.startswith("events.out.tfevents") for n in file_io.listdir(f"{model_dir}/train"))
    assert file_io.read_bytes(f"{model_dir}/training.png").startswith(PNG_MAGIC)
    assert os.listdir(local_cwd) == []


def _toy_checkpoint(model, folder) -> tuple[str, dict]:
    params = nn.meta.unbox(model.get_initial_variables(
        jax.random.key(3), {"decoder_input_tokens": (8, 8)})["params"])
    checkpoints.save_params(str(folder), params)
    return str(folder / "checkpoints"), params


def test_eval_and_infer_write_their_outputs_under_a_url(tmp_path, local_cwd):
    model = PredictingToyModel()
    checkpoint, _ = _toy_checkpoint(model, tmp_path / "run")
    cfg = data.DatasetConfig(EXACT_TASK, {"targets": 8}, split="validation", batch_size=8,
                             module=None)
    out = ram_root()
    metrics = moe_eval.evaluate(model=model, checkpoint_path=checkpoint, dataset_cfg=cfg,
                                output_dir=f"{out}/eval")
    assert metrics == {f"{EXACT_TASK}/exact": 100.0}
    assert json.loads(file_io.read_text(f"{out}/eval/metrics.json")) == metrics

    path = infer.infer(model=model, checkpoint_path=checkpoint, dataset_cfg=cfg,
                       output_dir=f"{out}/infer")
    assert path == f"{out}/infer/{EXACT_TASK}-validation.jsonl"
    records = [json.loads(line) for line in file_io.read_text(path).splitlines()]
    assert len(records) == 12  # the toy task's validation split
    assert all(r["task"] == EXACT_TASK and r["prediction"] == r["targets"] for r in records)
    assert os.listdir(local_cwd) == []


def test_infer_killed_while_decoding_leaves_no_predictions_file(tmp_path, monkeypatch):
    """Predictions are complete or absent: a failure in the middle of decoding writes
    nothing (the file is written once, atomically, after the last example)."""
    model = PredictingToyModel()
    checkpoint, _ = _toy_checkpoint(model, tmp_path / "run")
    cfg = data.DatasetConfig(EXACT_TASK, {"targets": 8}, split="validation", batch_size=8,
                             module=None)
    make_predict_fn = evaluation.make_predict_fn

    def dying_predict_fn(*args, **kwargs):
        predict = make_predict_fn(*args, **kwargs)

        def predict_then_die(ds):
            yield next(iter(predict(ds)))
            raise KeyboardInterrupt("killed while decoding")

        return predict_then_die

    monkeypatch.setattr(evaluation, "make_predict_fn", dying_predict_fn)
    with pytest.raises(KeyboardInterrupt):
        infer.infer(model=model, checkpoint_path=checkpoint, dataset_cfg=cfg,
                    output_dir=str(tmp_path / "infer"))
    assert not list((tmp_path / "infer").glob("*.jsonl"))


def test_logits_read_features_and_write_arrays_under_a_url(tmp_path, local_cwd):
    model = PredictingToyModel()
    checkpoint, params = _toy_checkpoint(model, tmp_path / "run")
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % VOCAB.vocab_size
    features = {"decoder_input_tokens": tokens, "decoder_target_tokens": (tokens + 1) % 32}
    root = ram_root()
    file_io.makedirs(root)
    buffer = io.BytesIO()
    np.savez(buffer, **features)
    file_io.write_bytes(f"{root}/in.npz", buffer.getvalue())
    arrays = logits.compute_logits(model=model, checkpoint_path=checkpoint,
                                   features_path=f"{root}/in.npz",
                                   output_path=f"{root}/out/logits.npz")
    assert file_io.listdir(f"{root}/out") == ["logits.npz"]  # no temporary left
    written = np.load(io.BytesIO(file_io.read_bytes(f"{root}/out/logits.npz")))
    assert sorted(written.files) == ["logits", "sequence_log_likelihood"]
    expected, _ = model.compute_logits(params, features)
    np.testing.assert_allclose(written["logits"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(written["logits"], arrays["logits"])
    assert os.listdir(local_cwd) == []


def test_a_conversion_writes_its_model_gin_under_a_url(monkeypatch, local_cwd):
    saved = []
    monkeypatch.setattr(checkpoints, "save_params",  # Orbax: see the module doc
                        lambda output, params, step: saved.append(output) or f"{output}/ckpt")
    out = f"{ram_root()}/converted"
    convert._write_converted(out, "NUM_HEADS = 2\n", {"w": np.zeros(3)}, 0)
    assert file_io.read_text(f"{out}/model.gin") == "NUM_HEADS = 2\n"
    assert file_io.listdir(out) == ["model.gin"] and saved == [out]
    assert os.listdir(local_cwd) == []


def test_a_comparison_report_is_redrawn_from_results_under_a_url(local_cwd):
    full = layer({"0": 1, "1": 30, "2": 40, "3-4": 25, ">4": 4})
    summary = results(*(run("dense", s, [4.0, 3.0, 2.5, 2.0], sparse=False) for s in (0, 1)),
                      *(run("ec_cf2", s, [4.0, 2.9, 2.3, 1.8], layers={"a": full})
                        for s in (0, 1)))
    out = ram_root()
    file_io.makedirs(out)
    file_io.write_text(f"{out}/results.json", json.dumps(summary))
    assert report.main([out]) == 0
    assert file_io.listdir(out) == ["comparison.png", "report.md", "results.json"]
    assert "![comparison](comparison.png)" in file_io.read_text(f"{out}/report.md")
    assert file_io.read_bytes(f"{out}/comparison.png").startswith(PNG_MAGIC)
    assert os.listdir(local_cwd) == []
