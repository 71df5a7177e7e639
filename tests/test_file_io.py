"""`moe.file_io`, the one path layer: the same behaviour on a local folder and on a filesystem
named by URL (TensorFlow's in-memory `ram://`, standing in for a `gs://` bucket), and gin
files (with their includes) read from a URL."""

import os
import re
import uuid

import gin
import pytest

from moe import file_io, gin_cli
from moe.interop import t5x_gin


def ram_root() -> str:
    """A fresh folder of the process-wide in-memory filesystem."""
    return f"ram://file_io_{uuid.uuid4().hex}"


@pytest.fixture(params=["local", "url"])
def root(request, tmp_path, local_cwd):
    return str(tmp_path / "root") if request.param == "local" else ram_root()


def test_urls_are_kept_and_local_paths_made_absolute(local_cwd):
    assert file_io.is_url("gs://bucket/run") and file_io.is_url("ram://x")
    assert not file_io.is_url("/tmp/run") and not file_io.is_url("run")
    assert file_io.absolute("gs://bucket/run") == "gs://bucket/run"
    assert file_io.absolute("run") == str(local_cwd / "run")
    assert file_io.join("gs://bucket/run", "train", "metrics.jsonl") == \
        "gs://bucket/run/train/metrics.jsonl"


def test_files_and_folders_behave_alike_on_both_filesystems(root, local_cwd):
    folder = file_io.join(root, "a", "b")
    assert not file_io.exists(folder)
    file_io.makedirs(folder)
    file_io.makedirs(folder)  # already there: fine
    assert file_io.isdir(folder) and not file_io.isfile(folder)

    text = file_io.join(folder, "notes.txt")
    file_io.write_text(text, "ünïcode\nline 2\n")
    assert file_io.read_text(text) == "ünïcode\nline 2\n"
    assert file_io.isfile(text) and not file_io.isdir(text)
    with file_io.open_file(text, "a") as f:
        f.write("line 3\n")
    with file_io.open_file(text) as f:
        assert list(f) == ["ünïcode\n", "line 2\n", "line 3\n"]

    file_io.write_bytes(file_io.join(folder, "blob.bin"), b"\x00\xff")
    with file_io.open_file(file_io.join(folder, "blob.bin"), "rb") as f:
        assert f.read() == b"\x00\xff"
    assert file_io.listdir(folder) == ["blob.bin", "notes.txt"]
    assert file_io.listdir(file_io.join(root, "a")) == ["b"]  # no trailing '/'
    assert file_io.glob(file_io.join(folder, "*.txt")) == [text]

    moved = file_io.join(folder, "moved.txt")
    file_io.write_text(moved, "old")
    file_io.rename(text, moved)  # replaces
    assert file_io.read_text(moved).startswith("ünïcode") and not file_io.exists(text)
    file_io.remove(moved)
    assert file_io.listdir(folder) == ["blob.bin"]
    assert os.listdir(local_cwd) == []


def test_missing_files_raise_file_not_found_on_both_filesystems(root):
    missing = file_io.join(root, "missing.txt")
    for call in (file_io.read_text, file_io.remove, file_io.open_file, file_io.listdir):
        with pytest.raises(FileNotFoundError):
            call(missing)


def test_an_atomic_write_replaces_whole_and_leaves_no_temporary(root):
    file_io.makedirs(root)
    path = file_io.join(root, "results.json")
    file_io.write_atomically(path, "first")
    file_io.write_atomically(path, b"second")
    assert file_io.read_text(path) == "second"
    assert file_io.listdir(root) == ["results.json"]


def test_a_failed_atomic_write_keeps_the_old_file(root, monkeypatch):
    file_io.makedirs(root)
    path = file_io.join(root, "results.json")
    file_io.write_atomically(path, "old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(file_io, "rename", fail)
    with pytest.raises(OSError, match="disk full"):
        file_io.write_atomically(path, "new")
    assert file_io.read_text(path) == "old" and file_io.listdir(root) == ["results.json"]


def test_the_writable_check_creates_the_folder_and_leaves_nothing(root):
    folder = file_io.join(root, "model_dir")
    file_io.check_writable(folder)
    assert file_io.isdir(folder) and file_io.listdir(folder) == []


def test_gfile_errors_arrive_as_oserror():
    root = ram_root()
    file_io.write_text(f"{root}.txt", "a file, not a folder")
    with pytest.raises(OSError) as raised:
        file_io.listdir(f"{root}.txt")
    assert raised.value.filename == f"{root}.txt"


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@gin.configurable
def file_io_probe(value=None, other=None):
    return value, other


def test_gin_files_and_their_includes_are_read_from_a_url(clean_gin, local_cwd):
    root = ram_root()
    file_io.makedirs(root)
    file_io.write_text(file_io.join(root, "base.gin"), "file_io_probe.other = 'from include'\n")
    file_io.write_text(file_io.join(root, "main.gin"),
                       "include 'base.gin'\nfile_io_probe.value = 7\n")
    # `include 'base.gin'` is found under the URL given as a search path.
    files = gin_cli.parse_gin([file_io.join(root, "main.gin")], gin_search_paths=[root])
    assert files == [f"{root}/main.gin"]
    assert file_io_probe() == (7, "from include")
    assert os.listdir(local_cwd) == []


def test_a_gin_file_is_resolved_under_a_url_search_path(clean_gin):
    root = ram_root()
    file_io.makedirs(file_io.join(root, "runs"))
    file_io.write_text(file_io.join(root, "runs", "mine.gin"), "file_io_probe.value = 3\n")
    assert gin_cli.resolve_gin_file("runs/mine.gin", [root]) == f"{root}/runs/mine.gin"
    with pytest.raises(gin_cli.GinConfigError, match=re.escape("Available: ['runs/mine.gin']")):
        gin_cli.resolve_gin_file("runs/other.gin", [root])


def test_a_t5x_gin_at_a_url_is_recognized_and_read_with_its_include():
    root = ram_root()
    file_io.makedirs(root)
    file_io.write_text(file_io.join(root, "base.gin"),
                       "import flaxformer.architectures.moe.moe_architecture\nNUM_HEADS = 6\n")
    file_io.write_text(file_io.join(root, "model.gin"), "include 'base.gin'\nHEAD_DIM = 64\n")
    path = file_io.join(root, "model.gin")
    assert t5x_gin.is_t5x_gin(path)
    config = t5x_gin.T5xGin.read(path)
    assert config.files == [path, f"{root}/base.gin"]
    assert (config.macro("NUM_HEADS"), config.macro("HEAD_DIM")) == (6, 64)
