"""What `moe.eval` and `moe.infer` share (`moe.evaluation`): parameters restored from one
abstract initialization, a seqio.Evaluator quiet only about its missing result loggers,
BIG-bench tasks bound in gin resolved by name with their parent's aggregate, and data errors
reaching the user as one `error:` line."""

import logging
import shutil

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest
import seqio

from moe import checkpoints, data, evaluation
from moe import eval as moe_eval
from moe.partitioning import Partitioner
from moe.trainer import Trainer
from seqio_tasks import config
from tests.seqio_tasks.conftest import FIXTURES
from tests.seqio_tasks.test_bigbench_aggregate import write_parent_task
from tests.trainer.toy import ToyModel

BYTES = seqio.ByteVocabulary()


@pytest.fixture(autouse=True)
def _clean_configuration(monkeypatch):
    monkeypatch.delenv(config.ENV_BIGBENCH_DIR, raising=False)
    gin.clear_config()
    config.reset_data_paths()
    yield
    gin.clear_config()
    config.reset_data_paths()


class CountingToyModel(ToyModel):
    """The trainer tests' toy model, counting how often its initialization is traced or run."""

    def __init__(self):
        super().__init__()
        self.init_calls = 0

    def get_initial_variables(self, rng, input_shapes, input_types=None):
        self.init_calls += 1
        return super().get_initial_variables(rng, input_shapes, input_types)


TOY_CFG = data.DatasetConfig("toy_trainer_lm", {"targets": 8}, split="validation",
                             batch_size=8, module="tests.trainer.toy")  # fmt: skip


def _toy_checkpoint(model, directory):
    """A checkpoint of freshly initialized toy parameters; returns (CHECKPOINT_PATH, params)."""
    params = nn.meta.unbox(model.get_initial_variables(
        jax.random.key(3), {"decoder_input_tokens": (8, 8)})["params"])  # fmt: skip
    checkpoints.save_params(str(directory), params)
    return str(directory / "checkpoints"), params


def test_restore_needs_one_abstract_init_and_no_optimizer(tmp_path):
    model = CountingToyModel()
    path, saved = _toy_checkpoint(model, tmp_path)
    partitioner = Partitioner(num_expert_partitions=2)
    model.init_calls = 0
    params, _ = evaluation.load_variables(model, path, TOY_CFG, partitioner)
    assert model.init_calls == 1  # a Trainer traced it twice, the second time with Adafactor
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), saved)
    shapes = {"decoder_input_tokens": (8, 8)}
    expected = Trainer(model=ToyModel(), partitioner=partitioner, input_shapes=shapes)
    assert jax.tree.map(lambda p: p.sharding, params) == expected.param_shardings


def _records(caplog, build):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build()
    return [r.getMessage() for r in caplog.records]


def test_evaluator_drops_only_the_empty_logger_notice(caplog):
    class EncDec:
        feature_converter_cls = seqio.EncDecFeatureConverter

    config.set_data_paths(super_glue_dir=str(FIXTURES / "super_glue"))
    cfg = data.DatasetConfig("super_glue_boolq_v102", {"inputs": 256, "targets": 8},
                             split="validation")  # fmt: skip
    messages = _records(caplog, lambda: evaluation.make_evaluator(EncDec(), cfg))
    assert not any(evaluation.EMPTY_LOGGER_CLS_NOTICE in m for m in messages)
    assert any("sequence lengths are longer than necessary" in m for m in messages)
    plain = _records(caplog, lambda: seqio.Evaluator(
        cfg.mixture_or_task_name, seqio.EncDecFeatureConverter(pack=False), "validation"))
    assert any(evaluation.EMPTY_LOGGER_CLS_NOTICE in m for m in plain)  # the filter is gone


class RightOnlyForEasyInputs:
    """A stand-in model: decodes the targets of inputs holding an 'E', a wrong answer else."""

    feature_converter_cls = seqio.EncDecFeatureConverter

    def predict_batch(self, params, batch, **kwargs):
        targets = batch["decoder_target_tokens"]
        wrong = np.zeros_like(targets)
        wrong[:, :3] = [*BYTES.encode("no"), 1]
        right = (batch["encoder_input_tokens"] == BYTES.encode("E")[0]).any(axis=1)
        return np.where(right[:, None], targets, wrong)


def test_eval_resolves_a_gin_bound_bigbench_task_and_reports_its_aggregate(tmp_path):
    write_parent_task(tmp_path, "gin_parent")
    with gin.unlock_config():
        gin.parse_config(f"seqio_tasks.config.data_paths.bigbench_dir = '{tmp_path}'")
    name = "bigbench:gin_parent.gen.byte_vocab.0_shot.all_examples"
    cfg = data.DatasetConfig(name, {"inputs": 32, "targets": 8}, split="all", batch_size=8)
    metrics = moe_eval.inference_metrics(RightOnlyForEasyInputs(), None, Partitioner(), cfg)
    assert metrics == pytest.approx({
        f"{name}.easy/exact_str_match": 1.0,  # 5 examples
        f"{name}.hard/exact_str_match": 0.0,  # 10 examples
        f"{name}/exact_str_match": 0.5,  # BIG-bench's unweighted mean over subtasks
        f"{name}/normalized_aggregate_score": 50.0,
    })  # fmt: skip


def _eval_main(capsys, *bindings):
    args = ["--gin_file=tests/trainer/toy_model.gin", "--gin_file=runs/eval.gin",
            "--gin.TASK_FEATURE_LENGTHS={'targets': 8}", "--gin.BATCH_SIZE=8", *bindings]
    code = moe_eval.main(args)
    return code, capsys.readouterr().err


def test_eval_entry_point_prints_a_bad_data_row_as_one_error_line(tmp_path, capsys):
    path, _ = _toy_checkpoint(ToyModel(), tmp_path / "run")
    super_glue = tmp_path / "super_glue"
    shutil.copytree(FIXTURES / "super_glue", super_glue)
    (super_glue / "BoolQ" / "val.jsonl").write_text('{"question": "q", "idx": 0, "label": true}\n')
    code, err = _eval_main(
        capsys, f"--gin.CHECKPOINT_PATH='{path}'", f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval'}'",
        "--gin.MIXTURE_OR_TASK_NAME='super_glue_boolq_v102'",
        f"--gin.seqio_tasks.config.data_paths.super_glue_dir='{super_glue}'",
    )  # fmt: skip
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err
    assert "BoolQ/val.jsonl:1: the row has no field 'passage'" in err


def test_eval_entry_point_says_how_to_point_at_bigbench(tmp_path, capsys, monkeypatch):
    from seqio_tasks.bigbench import by_name

    monkeypatch.setattr(by_name.reader, "installed_benchmark_dir", lambda: None)
    code, err = _eval_main(
        capsys, "--gin.CHECKPOINT_PATH='/nowhere'", f"--gin.EVAL_OUTPUT_DIR='{tmp_path}'",
        "--gin.MIXTURE_OR_TASK_NAME='bigbench:unset_task.gen.byte_vocab.0_shot.all_examples'",
        "--gin.eval/DatasetConfig.module='seqio_tasks'",
    )  # fmt: skip
    assert code == 2
    assert "no BIG-bench folder is configured" in err
    assert "--gin.seqio_tasks.config.data_paths.bigbench_dir=" in err


def test_eval_of_a_task_without_metrics_is_an_error_before_the_restore(tmp_path, capsys):
    code, err = _eval_main(
        capsys, "--gin.CHECKPOINT_PATH='/nowhere'", f"--gin.EVAL_OUTPUT_DIR='{tmp_path}'",
        "--gin.MIXTURE_OR_TASK_NAME='pydoc_topics_span_corruption'",
        "--gin.eval/DatasetConfig.module='seqio_tasks'",
    )  # fmt: skip
    assert code == 2 and err.startswith("error: ")
    assert "pydoc_topics_span_corruption" in err and "no task with metric functions" in err
