"""python_docs: a multi-MB corpus from docstrings on this machine; its splits, order, cache,
summary and seqio tasks."""

import importlib.metadata
import json
import os
import platform
import textwrap
import zlib

import pytest
import seqio

import seqio_tasks  # noqa: F401  (registers the tasks)
from seqio_tasks import pretraining, python_docs

# Small enough to build in well under a second: for the cache tests.
SMALL = ("pydoc_topics", "absl", "gin")
TASKS = ("python_docs_span_corruption", "python_docs_prefix_lm", "python_docs_lm")
TEST_DIRS = {"test", "tests", "testing", "testdata", "test_data", "idle_test"}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Every test starts with an empty memory cache and a disk cache of its own."""
    monkeypatch.setenv("MOE_CACHE_DIR", str(tmp_path))
    python_docs.clear_memory_cache()
    yield tmp_path
    python_docs.clear_memory_cache()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The full corpus, built once (cold) for the module: (cache folder, corpus)."""
    folder = tmp_path_factory.mktemp("python_docs_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOE_CACHE_DIR", str(folder))
        python_docs.clear_memory_cache()
        corpus = python_docs.load_corpus()
    python_docs.clear_memory_cache()
    return folder, corpus


@pytest.fixture
def full(built, monkeypatch):
    """The full corpus, with the module's disk cache in use (loads in a fraction of a second)."""
    folder, corpus = built
    monkeypatch.setenv("MOE_CACHE_DIR", str(folder))
    return corpus


def _bytes(texts):
    return sum(len(t.encode("utf-8")) for t in texts)


def test_splits_are_disjoint_distinct_and_held_out_by_content_hash(full):
    train = python_docs.python_docs_documents("train")
    validation = python_docs.python_docs_documents("validation")
    assert len(train) + len(validation) == len(full.documents)
    assert len(set(train + validation)) == len(train) + len(validation)  # No duplicates.
    assert all(zlib.crc32(t.encode()) % 10 == 0 for t in validation)
    assert all(zlib.crc32(t.encode()) % 10 != 0 for t in train)
    assert _bytes(train) >= 3_000_000
    assert 0.05 < _bytes(validation) / _bytes(train + validation) < 0.2
    # The pydoc texts are taken verbatim, so they fall in the split they have in pydoc_topics:
    # a model trained on python_docs never saw pydoc_topics' validation texts.
    assert set(pretraining.pydoc_topics_documents("validation")) <= set(validation)
    assert set(pretraining.pydoc_topics_documents("train")) <= set(train)
    with pytest.raises(ValueError, match="'train' and 'validation'"):
        python_docs.python_docs_documents("test")


def test_documents_are_ordered_by_source_path_and_position(full):
    order = {source: i for i, source in enumerate(python_docs.SOURCES)}
    keys = [(order[d.source], d.path, d.line) for d in full.documents]
    assert keys == sorted(keys)
    assert {d.source for d in full.documents} == set(python_docs.SOURCES)


def _reversed_walk(monkeypatch):
    """Makes the builder see every folder listed in reverse order."""
    real_walk = os.walk

    def reversed_walk(top, *args, **kwargs):
        for folder, dirs, files in real_walk(top, *args, **kwargs):
            dirs.reverse()  # In place: the builder's pruning of `dirs` still applies.
            files.reverse()
            yield folder, dirs, files

    monkeypatch.setattr(python_docs.os, "walk", reversed_walk)


def test_a_second_build_is_identical_whatever_order_the_file_system_lists(monkeypatch):
    sources = ("pydoc_topics", "stdlib", "absl", "gin")
    first = python_docs.build_corpus(sources)
    _reversed_walk(monkeypatch)
    again = python_docs.build_corpus(sources)
    assert len(first.documents) > 2000
    assert again.documents == first.documents and again.sha256 == first.sha256


@pytest.mark.slow
def test_a_second_build_of_the_whole_corpus_is_identical(full, monkeypatch):
    _reversed_walk(monkeypatch)
    again = python_docs.build_corpus()
    assert again.documents == full.documents and again.sha256 == full.sha256


def test_docstrings_are_normalized_long_and_not_from_tests(full):
    docstrings = [d for d in full.documents if d.source != "pydoc_topics"]
    assert len(docstrings) > 1000
    for d in docstrings:
        lines = d.text.split("\n")
        assert len(d.text) >= python_docs.MIN_DOCSTRING_CHARS, d
        assert lines[0].strip() and lines[-1].strip(), d  # No blank first or last line.
        assert all(line == line.rstrip() for line in lines), d
        assert "\n\n\n" not in d.text and "\t" not in d.text, d
        assert textwrap.dedent(d.text) == d.text, d  # No indentation shared by every line.
        folders = d.path.split("/")[:-1]
        assert not TEST_DIRS & set(folders), d
        assert not d.path.rsplit("/", 1)[-1].startswith("test_"), d


def test_docstrings_come_dedented_in_source_order_and_short_ones_are_dropped():
    body = "Explains the thing at length. " * 8
    source = f'''"""Module: {body}"""
import os


class Thing:
    """Short: dropped."""

    async def later(self):
        """Method: {body}

            Indented example
        Back at the margin.
        """

    def earlier_name_later_line(self):
        """Second method: {body}"""


def function():
    """Function: {body}"""
    def inner():
        """Inner: {body}"""
'''.encode()
    found = python_docs._docstrings(source)
    assert [text.split(":")[0] for _, text in found] == [
        "Module", "Method", "Second method", "Function", "Inner",
    ]  # fmt: skip
    assert [line for line, _ in found] == [1, 9, 16, 20, 22]
    method = found[1][1].split("\n")
    assert method[1:] == ["", "    Indented example", "Back at the margin."]
    assert all(len(text) >= python_docs.MIN_DOCSTRING_CHARS for _, text in found)


def test_summary_counts_add_up_and_name_the_versions(full):
    summary = python_docs.corpus_summary()
    train = python_docs.python_docs_documents("train")
    validation = python_docs.python_docs_documents("validation")
    splits, sources = summary["splits"], summary["sources"]
    assert splits["train"]["bytes"] == _bytes(train) >= 3_000_000
    assert splits["validation"]["documents"] == len(validation)
    assert summary["total"]["bytes"] == splits["train"]["bytes"] + splits["validation"]["bytes"]
    assert summary["total"]["bytes"] == sum(s["bytes"] for s in sources.values())
    assert summary["total"]["documents"] == sum(s["documents"] for s in sources.values())
    for split in ("train", "validation"):
        assert splits[split]["bytes"] == sum(s[f"{split}_bytes"] for s in sources.values())
        assert splits[split]["documents"] == sum(s[f"{split}_documents"] for s in sources.values())
    assert splits["train"]["sha256"] == python_docs.content_sha256(train)
    assert splits["validation"]["sha256"] == python_docs.content_sha256(validation)
    assert summary["sha256"] == python_docs.content_sha256(full.documents) == full.sha256
    assert list(sources) == list(python_docs.SOURCES)
    assert summary["python"] == sources["stdlib"]["version"] == platform.python_version()
    for package, distribution in python_docs.PACKAGE_DISTRIBUTIONS.items():
        if package not in summary["missing_packages"]:
            assert sources[package]["version"] == importlib.metadata.version(distribution)
    json.dumps(summary)  # Writable into a report as it is.


def test_the_second_load_reads_the_disk_cache_and_then_memory(own_cache, monkeypatch):
    first = python_docs.load_corpus(SMALL)
    path = python_docs.cache_path(python_docs.cache_key(SMALL))
    assert path.parent.parent == own_cache and path.is_file()
    python_docs.clear_memory_cache()

    def no_build(*args, **kwargs):
        raise AssertionError("built although cached")

    monkeypatch.setattr(python_docs, "build_corpus", no_build)
    from_disk = python_docs.load_corpus(SMALL)
    assert from_disk.documents == first.documents and from_disk.sha256 == first.sha256
    path.unlink()
    assert python_docs.load_corpus(SMALL) is from_disk  # Memory, the file no longer exists.


@pytest.mark.parametrize("corruption", ["truncated", "not_json", "edited_text", "no_documents"])
def test_a_bad_cache_file_is_rebuilt(own_cache, monkeypatch, caplog, corruption):
    first = python_docs.load_corpus(SMALL)
    path = python_docs.cache_path(first.key)
    content = path.read_text(encoding="utf-8")
    if corruption == "truncated":
        path.write_text(content[: len(content) // 2], encoding="utf-8")
    elif corruption == "not_json":
        path.write_bytes(b"\x00\xff garbage")
    else:
        payload = json.loads(content)
        if corruption == "edited_text":
            payload["documents"][3][3] += " (edited)"
        else:
            del payload["documents"]
        path.write_text(json.dumps(payload), encoding="utf-8")
    python_docs.clear_memory_cache()
    builds = []
    real_build = python_docs.build_corpus
    monkeypatch.setattr(python_docs, "build_corpus", lambda *a: builds.append(1) or real_build(*a))
    again = python_docs.load_corpus(SMALL)
    assert builds == [1]
    assert again.documents == first.documents
    assert "rebuilding" in caplog.text and str(path) in caplog.text
    python_docs.clear_memory_cache()
    assert python_docs.load_corpus(SMALL).documents == first.documents  # Rewritten, readable.
    assert builds == [1]
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_missing_package_is_skipped_named_and_changes_the_key(monkeypatch, caplog):
    installed = python_docs.corpus_summary(SMALL)
    real_root = python_docs._source_root
    monkeypatch.setattr(python_docs, "_source_root", lambda s: None if s == "gin" else real_root(s))
    summary = python_docs.corpus_summary(SMALL)
    assert summary["missing_packages"] == ["gin"]
    assert summary["sources"]["gin"]["installed"] is False
    assert summary["sources"]["gin"]["version"] is None
    assert summary["sources"]["gin"]["documents"] == 0
    assert summary["cache_key"] != installed["cache_key"]
    assert summary["sha256"] != installed["sha256"]
    assert summary["sources"]["absl"] == installed["sources"]["absl"]
    assert "'gin' is not installed" in caplog.text
    unknown = python_docs.corpus_summary(("pydoc_topics", "no_such_package_for_python_docs"))
    assert unknown["missing_packages"] == ["no_such_package_for_python_docs"]


def test_registering_the_tasks_reads_no_data(monkeypatch):
    def no_corpus(*args, **kwargs):
        raise AssertionError("corpus read at registration")

    monkeypatch.setattr(python_docs, "load_corpus", no_corpus)
    names = pretraining.register_default_pretraining_tasks()
    assert set(TASKS) <= set(names)
    for name in TASKS:
        task = seqio.get_mixture_or_task(name)
        assert task.source.splits == ("train", "validation")


def test_the_tasks_yield_byte_vocabulary_examples_of_the_corpus(full):
    validation = "".join(python_docs.python_docs_documents("validation")).encode()
    lm = seqio.get_mixture_or_task("python_docs_lm")
    assert isinstance(lm.output_features["targets"].vocabulary, seqio.ByteVocabulary)
    ds = lm.get_dataset({"targets": 128}, split="validation", shuffle=False)
    for example in ds.take(3).as_numpy_iterator():
        targets = example["targets"]
        assert targets.shape == (128,) and ((targets >= 0) & (targets < 259)).all()
        # Unshuffled, the first example starts at the start of the validation corpus.
        assert bytes(t - 3 for t in targets if t >= 3) in validation
    span = seqio.get_mixture_or_task("python_docs_span_corruption")
    ds = span.get_dataset({"inputs": 128, "targets": 32}, split="train", shuffle=True, seed=3)
    examples = list(ds.take(4).as_numpy_iterator())
    assert len(examples) == 4
    for example in examples:
        assert example["inputs"].shape == (128,) and example["targets"].shape[0] <= 32
        for ids in (example["inputs"], example["targets"]):
            assert ((ids >= 0) & (ids < 259)).all() and ids[-1] == 1  # EOS
    prefix = seqio.get_mixture_or_task("python_docs_prefix_lm")
    ds = prefix.get_dataset({"inputs": 64, "targets": 64}, split="train", shuffle=False)
    example = next(ds.as_numpy_iterator())
    for ids in (example["inputs"], example["targets"]):
        # Text bytes (ids 3..258) then EOS: nothing from the corpus is lost to padding.
        assert len(ids) >= 2 and ids[-1] == 1 and ((ids[:-1] >= 3) & (ids[:-1] < 259)).all()
