"""The one path layer for the files the entry points read and write (not checkpoints).

Why: on a TPU pod MODEL_DIR is a `gs://` bucket. Orbax checkpoints (through etils' epath) and
TensorBoard's event files (through TensorFlow's summary writer) understand such a URL, but a
plain `open`, `os.makedirs` or `Path.write_text` of `config.gin`, `metrics.jsonl`, a plot or an
evaluation's output either fails or writes onto the local disk of whichever worker ran it.
Every such file goes through this module instead (as T5X routes its files through
`tf.io.gfile`), which also leaves one place to swap the filesystem.

- A path with a scheme (`gs://`, `ram://` TensorFlow's in-memory filesystem, `file://`, ...)
  goes through `tf.io.gfile`. TensorFlow is imported on first use (after `moe.quiet_logs`, so
  its start-up notices are filtered as the entry points filter them); the entry points have it
  loaded already.
- A local path goes through Python's `os` and `open`, exactly as before: no TensorFlow import
  for `python -m moe.plots` or a comparison's report, and an fsync before the atomic rename.

Errors of either kind arrive as `OSError` (`FileNotFoundError`, `PermissionError`, ...), so a
caller catches one type whatever the filesystem. (A file object from `open_file` on a URL may
still raise TensorFlow's own errors while it is read or written; the whole-file helpers below
do not.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO, Any


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names a filesystem by scheme (`gs://bucket/...`), not a local path."""
    return "://" in os.fspath(path)


def _tf() -> Any:
    if "tensorflow" not in sys.modules:
        import moe.quiet_logs  # noqa: F401 - filters TensorFlow's start-up notices
    import tensorflow as tf

    return tf


_OSERROR_OF = {  # tf.errors class name -> (OSError subclass, errno)
    "NotFoundError": (FileNotFoundError, errno.ENOENT),
    "PermissionDeniedError": (PermissionError, errno.EACCES),
    "UnauthenticatedError": (PermissionError, errno.EACCES),
    "AlreadyExistsError": (FileExistsError, errno.EEXIST),
}


@contextlib.contextmanager
def _gfile_errors(path: str) -> Iterator[Any]:
    """Yield `tf.io.gfile`, raising its errors as the `OSError` Python's own calls would."""
    tf = _tf()
    try:
        yield tf.io.gfile
    except tf.errors.OpError as e:
        cls, code = _OSERROR_OF.get(type(e).__name__, (OSError, errno.EIO))
        raise cls(code, e.message or os.strerror(code), path) from e


def join(*parts: str) -> str:
    """`os.path.join`, which also joins under a URL (`gs://bucket/run` + `train`)."""
    return os.path.join(*parts)


def absolute(path: str) -> str:
    """A URL as it is, a local path made absolute (`os.path.abspath` would turn `gs://b/x`
    into a local folder named `gs:`)."""
    return path if is_url(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    with _gfile_errors(path) as gfile:
        return gfile.exists(path)


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    with _gfile_errors(path) as gfile:
        return gfile.isdir(path)


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    with _gfile_errors(path) as gfile:
        return gfile.exists(path) and not gfile.isdir(path)


def makedirs(path: str) -> None:
    """Create `path` and its parents; a directory that exists already is fine."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
        return
    with _gfile_errors(path) as gfile:
        gfile.makedirs(path)


def listdir(path: str) -> list[str]:
    """The names in directory `path`, sorted (without the `/` object stores add to folders)."""
    if not is_url(path):
        return sorted(os.listdir(path))
    with _gfile_errors(path) as gfile:
        return sorted(name.rstrip("/") for name in gfile.listdir(path))


def glob(pattern: str) -> list[str]:
    """The paths matching `pattern` (`*`, `?`, `[...]`), sorted."""
    if not is_url(pattern):
        import glob as local_glob

        return sorted(local_glob.glob(pattern))
    with _gfile_errors(pattern) as gfile:
        return sorted(gfile.glob(pattern))


def remove(path: str) -> None:
    """Delete the file `path`."""
    if not is_url(path):
        os.remove(path)
        return
    with _gfile_errors(path) as gfile:
        gfile.remove(path)


def rename(source: str, destination: str) -> None:
    """Move `source` onto `destination`, replacing it. Atomic on a local filesystem
    (`os.replace`). On an object store it is a copy then a delete, but an object appears
    only once its upload is complete, so a reader still sees the old or the new file."""
    if not is_url(source) and not is_url(destination):
        os.replace(source, destination)
        return
    with _gfile_errors(source) as gfile:
        gfile.rename(source, destination, overwrite=True)


def open_file(path: str, mode: str = "r") -> IO[Any]:
    """`open(path, mode)` for either kind of path (text modes read and write UTF-8).

    Appending to an object-store file (`'a'` on `gs://`) uploads the whole file again on
    every flush: fine for a log written every log period, not for a large file.
    """
    if not is_url(path):
        return open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
    with _gfile_errors(path) as gfile:
        if "r" in mode and not gfile.exists(path):  # gfile opens lazily: fail here, as open does
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return gfile.GFile(path, mode)


def read_bytes(path: str) -> bytes:
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    with _gfile_errors(path) as gfile, gfile.GFile(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Write `data` as the whole of `path` (created or replaced; its folder must exist)."""
    if not is_url(path):
        with open(path, "wb") as f:
            f.write(data)
        return
    with _gfile_errors(path) as gfile, gfile.GFile(path, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    """Write `text` (UTF-8) as the whole of `path` (created or replaced)."""
    write_bytes(path, text.encode("utf-8"))


def write_atomically(path: str, data: str | bytes) -> None:
    """Replace `path` by `data` so that a reader (or a kill) sees the old file or the new one,
    never a part: written to a temporary file next to it, then renamed over it."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    folder, name = os.path.split(path)
    temporary = join(folder, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        if is_url(path):
            write_bytes(temporary, payload)
        else:
            with open(temporary, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
        rename(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            remove(temporary)
        raise


def check_writable(path: str) -> None:
    """Create directory `path` if needed and write (then delete) a uniquely named probe file
    in it; raises `OSError` when either fails. Every host of a multi-host run may check the
    same directory at once."""
    makedirs(path)
    if not is_url(path):
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):
            return
    probe = join(path, f".write_test-{uuid.uuid4().hex}")
    write_bytes(probe, b"")
    remove(probe)


__all__ = [
    "absolute",
    "check_writable",
    "exists",
    "glob",
    "is_url",
    "isdir",
    "isfile",
    "join",
    "listdir",
    "makedirs",
    "open_file",
    "read_bytes",
    "read_text",
    "remove",
    "rename",
    "write_atomically",
    "write_bytes",
    "write_text",
]
