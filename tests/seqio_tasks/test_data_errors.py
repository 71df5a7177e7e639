"""Bad local benchmark files and missing data: errors naming file, line, field or value, raised
through the paths users take (a seqio task's dataset, seqio.Evaluator, the trainer's iterator),
and the log notices seqio prints while building datasets."""

import logging
import shutil

import pytest
import seqio

from moe import data
from moe.errors import ConfigurationError
from seqio_tasks import config, glue_files, sources
from seqio_tasks.errors import DataFileError

from .conftest import FIXTURES


def _configured_copy(tmp_path, benchmark):
    """An editable copy of a benchmark's fixture files, configured as its data directory."""
    directory = tmp_path / benchmark
    shutil.copytree(FIXTURES / benchmark, directory)
    config.set_data_paths(**{f"{benchmark}_dir": str(directory)})
    yield directory
    config.reset_data_paths()


@pytest.fixture
def glue_copy(tmp_path):
    yield from _configured_copy(tmp_path, "glue")


@pytest.fixture
def super_glue_copy(tmp_path):
    yield from _configured_copy(tmp_path, "super_glue")


def _examples(task_name, split):
    ds = seqio.get_mixture_or_task(task_name).get_dataset(None, split=split, shuffle=False)
    return list(ds.as_numpy_iterator())


def _replace_line(path, number, new_line):
    """Line `number` (1-based) of `path` becomes `new_line`; one past the end appends it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[number - 1 : number] = [new_line]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_jsonl_row_missing_a_field_names_file_line_and_field(super_glue_copy):
    path = super_glue_copy / "BoolQ" / "val.jsonl"
    _replace_line(path, 2, '{"question": "is it", "idx": 1, "label": true}')
    with pytest.raises(DataFileError, match=r"BoolQ/val\.jsonl:2: the row has no field "
                       r"'passage'; SuperGLUE boolq rows need question, passage") as error:
        _examples("super_glue_boolq_v102", "validation")
    assert isinstance(error.value, ConfigurationError)


def test_jsonl_nested_field_and_label_of_a_labeled_split(super_glue_copy):
    path = super_glue_copy / "MultiRC" / "train.jsonl"
    row = path.read_text().splitlines()[0].replace('"text"', '"txt"', 1)
    _replace_line(path, 1, row)
    with pytest.raises(DataFileError, match=r"MultiRC/train\.jsonl:1: the row has no field"):
        _examples("super_glue_multirc_v102", "train")
    cb = super_glue_copy / "CB" / "train.jsonl"
    _replace_line(cb, 1, '{"premise": "p", "hypothesis": "h", "idx": 0}')
    with pytest.raises(DataFileError, match=r"CB/train\.jsonl:1: the row has no field 'label'"):
        _examples("super_glue_cb_v102", "train")


def test_jsonl_unknown_label_lists_the_known_ones(super_glue_copy):
    cb = super_glue_copy / "CB" / "train.jsonl"
    _replace_line(cb, 1, '{"premise": "p", "hypothesis": "h", "idx": 0, "label": "maybe"}')
    with pytest.raises(DataFileError, match=r"CB/train\.jsonl:1: unknown label 'maybe'; a label "
                       r"here is one of \['entailment', 'contradiction', 'neutral'\]"):
        _examples("super_glue_cb_v102", "train")


def test_glue_tsv_with_a_byte_order_mark_keeps_its_labels(glue_copy):
    path = glue_copy / "MRPC" / "train.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    targets = [e["targets_pretokenized"].decode() for e in _examples("glue_mrpc_v002", "train")]
    assert targets and "<unk>" not in targets
    assert targets[:2] == ["equivalent", "not_equivalent"]


@pytest.mark.parametrize(
    "task,folder,value,known",
    [
        ("glue_mrpc_v002", "MRPC", "yes", r"\['not_equivalent', 'equivalent'\] or their index 0"),
        ("glue_mrpc_v002", "MRPC", "2", r"\['not_equivalent', 'equivalent'\]"),
        ("glue_mnli_v002", "MNLI", "entailmnt", r"\['entailment', 'neutral', 'contradiction'\]"),
    ],
)  # fmt: skip
def test_glue_unknown_label_names_file_line_value_and_labels(glue_copy, task, folder, value,
                                                             known):  # fmt: skip
    path = glue_copy / folder / "train.tsv"
    header, first, *_ = path.read_text().splitlines()
    label_column = glue_files.GLUE_COLUMNS[task.split("_")[1]][2]
    cells = first.split("\t")
    cells[header.split("\t").index(label_column)] = value
    _replace_line(path, 2, "\t".join(cells))
    with pytest.raises(DataFileError, match=rf"{folder}/train\.tsv:2: unknown label '{value}'; "
                       rf"a label here is one of {known}"):  # fmt: skip
        _examples(task, "train")


def test_glue_tsv_without_the_label_column_is_an_error(glue_copy):
    path = glue_copy / "RTE" / "dev.tsv"
    header = path.read_text().splitlines()[0]
    _replace_line(path, 1, header.replace("label", "lable"))
    with pytest.raises(DataFileError, match=r"RTE/dev\.tsv:1: the header has no column 'label'"):
        _examples("glue_rte_v002", "validation")


def test_missing_tfds_data_names_the_local_file_settings(no_local_benchmark_files):
    with pytest.raises(sources.MissingDataError) as error:
        _examples("glue_cola_v002", "validation")
    message = str(error.value)
    for expected in ("MOE_GLUE_DIR=<dir>", "seqio_tasks.config.data_paths.glue_dir = '<dir>'",
                     "--gin.seqio_tasks.config.data_paths.glue_dir=", "tfds build glue/cola",
                     "TFDS_DATA_DIR=<dir>"):  # fmt: skip
        assert expected in message
    with pytest.raises(sources.MissingDataError, match="MOE_SUPER_GLUE_DIR=<dir>"):
        _examples("super_glue_boolq_v102", "validation")


def test_missing_local_file_is_a_configuration_error(tmp_path):
    config.set_data_paths(super_glue_dir=str(tmp_path))
    try:
        with pytest.raises(sources.MissingDataError, match=r"BoolQ/val\.jsonl.*MOE_SUPER_GLUE_DIR"):
            _examples("super_glue_boolq_v102", "validation")
    finally:
        config.reset_data_paths()


def test_errors_reach_the_evaluator_and_the_training_iterator(super_glue_copy):
    _replace_line(super_glue_copy / "BoolQ" / "val.jsonl", 1, '{"passage": "p", "idx": 0}')
    with pytest.raises(DataFileError, match=r"val\.jsonl:1: the row has no field 'question'"):
        seqio.Evaluator("super_glue_boolq_v102", seqio.EncDecFeatureConverter(pack=False),
                        eval_split="validation")  # fmt: skip
    cfg = data.DatasetConfig("super_glue_boolq_v102", {"inputs": 32, "targets": 4},
                             split="validation", batch_size=2)  # fmt: skip
    batches = data.ResumableIterator(
        lambda: data.get_dataset(cfg, seqio.EncDecFeatureConverter(pack=False))
    )
    with pytest.raises(DataFileError, match=r"val\.jsonl:1: the row has no field 'question'"):
        next(batches)


def _uncached_warnings(caplog, **get_dataset_kwargs):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        seqio.get_mixture_or_task("glue_sst2_v002").get_dataset(
            None, split="train", shuffle=True, **get_dataset_kwargs
        )
    return [r for r in caplog.records if sources.UNCACHED_FUNCTION_DATASET in r.getMessage()]


def test_seeded_shuffle_drops_only_the_uncached_function_dataset_warning(local_benchmark_files,
                                                                         caplog):  # fmt: skip
    assert _uncached_warnings(caplog, seed=0) == []
    assert len(_uncached_warnings(caplog, seed=None)) == 1  # an unseeded shuffle still warns
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("absl").warning("another warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]
