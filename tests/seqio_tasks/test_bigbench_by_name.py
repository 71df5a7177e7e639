"""BIG-bench tasks resolvable by name from a folder bound in gin after `import seqio_tasks`,
and the errors that say how to point at BIG-bench tasks."""

import gin
import pytest
import seqio

import seqio_tasks
from moe.errors import ConfigurationError
from seqio_tasks import config
from seqio_tasks.bigbench import by_name

from .test_bigbench import FIXTURES, SHARED_BIGBENCH, needs_real_tasks


@pytest.fixture(autouse=True)
def _no_configured_folder(monkeypatch):
    """No BIG-bench folder from the environment, the installed package or an earlier test."""
    monkeypatch.delenv(config.ENV_BIGBENCH_DIR, raising=False)
    monkeypatch.setattr(by_name.reader, "installed_benchmark_dir", lambda: None)
    gin.clear_config()
    config.reset_data_paths()
    yield
    gin.clear_config()
    config.reset_data_paths()


def _folder_with(tmp_path, task_name, fixture="tiny_gen"):
    """A BIG-bench folder holding the fixture task `fixture` under the name `task_name`."""
    (tmp_path / task_name).mkdir(parents=True)
    (tmp_path / task_name / "task.json").write_text((FIXTURES / fixture / "task.json").read_text())
    return tmp_path


def _bind_bigbench_dir(path):
    with gin.unlock_config():
        gin.parse_config(f"seqio_tasks.config.data_paths.bigbench_dir = '{path}'")


def test_gin_binding_makes_a_task_resolvable_by_name(tmp_path):
    name = "bigbench:gin_bound_task.gen.byte_vocab.2_shot.all_examples"
    _bind_bigbench_dir(_folder_with(tmp_path, "gin_bound_task"))
    with pytest.raises(ValueError):
        seqio.get_mixture_or_task(name)  # the import could not know the binding
    seqio_tasks.ensure_registered(name)
    rows = list(seqio.get_mixture_or_task(name).get_dataset(None, split="all").as_numpy_iterator())
    assert len(rows) == 6
    assert rows[0]["inputs_pretokenized"].decode().count("\nIn: ") == 3  # two shots + the query


def test_the_name_decides_shots_examples_and_vocabulary(tmp_path):
    _bind_bigbench_dir(_folder_with(tmp_path, "sized_task"))
    name = "bigbench:sized_task.scr.t5_vocab.0_shot.4_examples"
    seqio_tasks.ensure_registered(name)
    task = seqio.get_mixture_or_task(name)
    assert isinstance(task.output_features["targets"].vocabulary, seqio.SentencePieceVocabulary)
    assert not any("sized_task" in n and "3_shot" in n for n in seqio.TaskRegistry.names())
    seqio_tasks.ensure_registered(name.replace("0_shot", "1_shot"))
    seqio.get_mixture_or_task(name)  # the same folder's other forms stay registered


def test_a_newly_bound_folder_replaces_the_tasks_of_another(tmp_path):
    name = "bigbench:moved_task.gen.byte_vocab.0_shot.all_examples"
    first = _folder_with(tmp_path / "first", "moved_task")
    second = _folder_with(tmp_path / "second", "moved_task", fixture="tiny_choice")
    _bind_bigbench_dir(first)
    seqio_tasks.ensure_registered(name)
    _bind_bigbench_dir(second)
    with pytest.raises(by_name.UnregisteredBigbenchTaskError, match="has no such form"):
        seqio_tasks.ensure_registered(name)  # tiny_choice has no generative form
    seqio_tasks.ensure_registered(name.replace(".gen.", ".mul."))


@needs_real_tasks
def test_gin_binding_resolves_a_real_subtask_and_its_parent():
    _bind_bigbench_dir(SHARED_BIGBENCH)
    parent = "bigbench:simple_arithmetic_json_subtasks.gen.byte_vocab.2_shot.12_examples"
    seqio_tasks.ensure_registered(parent)
    assert {t.name for t in seqio.get_mixture_or_task(parent).tasks} == {
        f"{parent}.{d}" for d in ("one_digit", "two_digit", "three_digit")
    }
    seqio_tasks.ensure_registered(f"{parent}.two_digit")


def test_no_folder_configured_says_how_to_point_at_bigbench():
    with pytest.raises(ConfigurationError) as error:
        seqio_tasks.ensure_registered("bigbench:nowhere_task.gen.byte_vocab.0_shot.all_examples")
    message = str(error.value)
    assert "no BIG-bench folder is configured" in message
    assert "MOE_BIGBENCH_DIR=<dir>" in message
    assert "--gin.seqio_tasks.config.data_paths.bigbench_dir=" in message


def test_unknown_task_in_the_folder_lists_close_names(tmp_path):
    _bind_bigbench_dir(_folder_with(tmp_path, "present_task"))
    with pytest.raises(ConfigurationError, match=r"no JSON task 'presnt_task'.*\['present_task'\]"):
        seqio_tasks.ensure_registered("bigbench:presnt_task.gen.byte_vocab.0_shot.all_examples")


@pytest.mark.parametrize(
    "name,message",
    [
        ("bigbench:some_task.gen.byte_vocab", "is not a BIG-bench task name"),
        ("bigbench:some_task.gen.spm_vocab.0_shot.all_examples", "unknown vocabulary 'spm'"),
    ],
)
def test_malformed_names_are_configuration_errors(tmp_path, name, message):
    _bind_bigbench_dir(_folder_with(tmp_path, "some_task"))
    with pytest.raises(ConfigurationError, match=message):
        seqio_tasks.ensure_registered(name)


def test_other_names_are_left_alone():
    seqio_tasks.ensure_registered("no_such_task")  # the caller's lookup reports it
    seqio_tasks.ensure_registered("glue_cola_v002")


def test_the_trainers_task_lookup_resolves_a_gin_bound_task(tmp_path):
    from moe import data

    name = "bigbench:trainer_bound_task.gen.byte_vocab.0_shot.all_examples"
    _bind_bigbench_dir(_folder_with(tmp_path, "trainer_bound_task"))
    cfg = data.DatasetConfig(mixture_or_task_name=name, task_feature_lengths={"targets": 8},
                             module="seqio_tasks")
    task = data.get_task(cfg)
    assert task.name == name
