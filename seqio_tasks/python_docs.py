"""`python_docs`: a pretraining corpus of several MB built from text already on this machine.

The `pydoc_topics` corpus (~0.5 MB) is memorized within a few hundred steps of a small model;
this one adds the docstrings of the standard library and of a fixed list of installed packages
(about 9 MB in all with the pinned versions of `requirements.lock`), with no download.

Documents, in this order (deterministic, independent of the file system's listing order):
1. the distinct texts of CPython's `pydoc_data.topics`, sorted, verbatim (as `pydoc_topics`);
2. for each source of `SOURCES` after it (the standard library, then the packages in the
   order listed), its `.py` files sorted by relative path, and in each file the module,
   class and function docstrings in source order. Files are parsed with `ast`, never
   imported (importing TensorFlow or JAX is slow and has side effects). Docstrings are
   dedented (`inspect.cleandoc`, then `textwrap.dedent`), trailing spaces stripped and runs
   of blank lines collapsed; those under `MIN_DOCSTRING_CHARS` characters are dropped. Test
   folders and files, examples and vendored copies of other projects are skipped.
A text seen before (in any source) is dropped, so no text appears twice. A document is held
out for validation when `crc32(text) % 10 == 0`, the rule of `pydoc_topics` (so the pydoc
texts fall in the same split in both corpora). A listed package that is not installed is
skipped; `corpus_summary()` names it.

Building parses a few thousand files (seconds); the corpus is then cached on disk under
`${MOE_CACHE_DIR:-~/.cache/moe}/python_docs/`, in a file named by a key of everything it is
built from (Python version, package versions, `SOURCES`, `RULES_VERSION`), and in memory.
A cache file that cannot be read, or whose documents do not match its recorded hash, is
rebuilt. `python -m seqio_tasks.python_docs` prints the summary (sizes per split and per
source, versions, the content hash) that a report cites to state what was trained on.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import pathlib
import platform
import re
import sys
import sysconfig
import tempfile
import textwrap
import threading
import warnings
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import tensorflow as tf

from moe import cache_dirs

VALIDATION_EVERY = 10  # crc32(text) % VALIDATION_EVERY == 0 -> validation, as pydoc_topics.
MIN_DOCSTRING_CHARS = 200
# Bump whenever the extraction below changes what a build yields: it is part of the cache key.
RULES_VERSION = 1
CACHE_FORMAT = 1

PYDOC_TOPICS = "pydoc_topics"
STDLIB = "stdlib"
# Import name -> distribution name (for its version). Chosen for rich English docstrings,
# about 9 MB with pydoc topics and the standard library; scipy (4.9 MB) and tensorflow
# (7.9 MB) are left out to stay near that size and keep one package from dominating.
PACKAGE_DISTRIBUTIONS = {
    "numpy": "numpy",
    "sklearn": "scikit-learn",
    "jax": "jax",
    "flax": "flax",
    "optax": "optax",
    "absl": "absl-py",
    "gin": "gin-config",
    "seqio": "seqio",
}
SOURCES: tuple[str, ...] = (PYDOC_TOPICS, STDLIB, *PACKAGE_DISTRIBUTIONS)

# Folders never read: tests and their data, examples, vendored copies of other projects.
SKIPPED_DIRS = frozenset({
    "__pycache__", "test", "tests", "testing", "testdata", "test_data", "idle_test",
    "internal_test_util", "examples", "_examples", "externals", "third_party", "_vendor",
    "vendor", "vendored", "site-packages", "dist-packages",
})  # fmt: skip

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Document:
    """One text and where it came from: `path` is relative to the folder holding the package
    (the standard library's folder for `stdlib`), `line` is where the docstring starts."""

    source: str
    path: str
    line: int
    text: str

    @property
    def held_out(self) -> bool:
        return zlib.crc32(self.text.encode("utf-8")) % VALIDATION_EVERY == 0


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The documents in corpus order, what each source gave, the cache key they were built
    under and `content_sha256(documents)`."""

    documents: tuple[Document, ...]
    # Source name -> {'installed', 'version', 'files', 'unparsed_files'}.
    sources: dict[str, dict[str, Any]]
    key: str
    sha256: str

    def split(self, split: str) -> list[str]:
        if split not in ("train", "validation"):
            raise ValueError(f"python_docs has splits 'train' and 'validation', not {split!r}.")
        want_held_out = split == "validation"
        return [d.text for d in self.documents if d.held_out == want_held_out]


# ---------------------------------------------------------------------------------------------
# Extraction.


def _normalize(docstring: str) -> str:
    # cleandoc leaves the indentation of a first line that was blank (`"""\n    Title`);
    # dedent then removes what every line still shares.
    text = textwrap.dedent(inspect.cleandoc(docstring).replace("\r\n", "\n").replace("\r", "\n"))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def _is_skipped_file(name: str) -> bool:
    return (
        not name.endswith(".py")
        or name.startswith("test_")
        or name.endswith("_test.py")
        or name == "conftest.py"
    )


def _python_files(root: pathlib.Path, prefix: str) -> list[tuple[str, pathlib.Path]]:
    """(relative posix path, path) of the `.py` files under `root`, sorted by relative path."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        relative = pathlib.Path(folder).relative_to(root).as_posix()
        relative_folder = pathlib.PurePosixPath(prefix, relative)
        for name in files:
            if not _is_skipped_file(name):
                found.append((str(relative_folder / name), pathlib.Path(folder, name)))
    return sorted(found, key=lambda item: item[0])


def _docstrings(source_bytes: bytes) -> list[tuple[int, str]]:
    """(line, normalized docstring) of the module, classes and functions, in source order.
    Raises SyntaxError or ValueError on a file Python cannot parse."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Invalid escape sequences in old code.
        tree = ast.parse(source_bytes)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        docstring = ast.get_docstring(node, clean=False)
        if docstring is None:
            continue
        expression = node.body[0]
        text = _normalize(docstring)
        if len(text) >= MIN_DOCSTRING_CHARS:
            found.append((expression.lineno, expression.col_offset, text))
    return [(line, text) for line, _, text in sorted(found, key=lambda f: f[:2])]


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # Lone surrogates in an escape-heavy docstring.
        return False
    return True


def _source_root(source: str) -> pathlib.Path | None:
    """The folder of a package (None if not installed), without importing it."""
    if source == STDLIB:
        return pathlib.Path(sysconfig.get_paths()["stdlib"])
    spec = importlib.util.find_spec(source)
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(sorted(spec.submodule_search_locations)[0])


def _source_version(source: str) -> str | None:
    if source in (PYDOC_TOPICS, STDLIB):
        return platform.python_version()
    if _source_root(source) is None:
        return None
    try:
        return importlib.metadata.version(PACKAGE_DISTRIBUTIONS.get(source, source))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _extract(source: str) -> tuple[list[Document], dict[str, Any]]:
    """The documents of one source before deduplication, and its file counts."""
    if source == PYDOC_TOPICS:
        from pydoc_data.topics import topics

        texts = sorted(set(topics.values()))
        return [Document(source, "pydoc_data/topics.py", 0, t) for t in texts], {"files": 1}
    root = _source_root(source)
    if root is None:
        return [], {"files": 0}
    prefix = "" if source == STDLIB else source
    documents, unparsed = [], []
    files = _python_files(root, prefix)
    for relative, path in files:
        try:
            found = _docstrings(path.read_bytes())
        except (SyntaxError, ValueError, RecursionError, OSError):
            unparsed.append(relative)
            continue
        documents += [Document(source, relative, n, t) for n, t in found if _encodable(t)]
    return documents, {"files": len(files), "unparsed_files": unparsed}


def build_corpus(sources: Sequence[str] = SOURCES) -> Corpus:
    """Extracts the corpus from the files (no cache): seconds for `SOURCES`."""
    seen: set[str] = set()
    documents: list[Document] = []
    source_info = {}
    for source in sources:
        version = _source_version(source)
        extracted, info = _extract(source) if version is not None else ([], {"files": 0})
        for document in extracted:
            if document.text not in seen:
                seen.add(document.text)
                documents.append(document)
        source_info[source] = {"installed": version is not None, "version": version, **info}
        if version is None:
            logger.warning("python_docs: package %r is not installed; skipping it.", source)
    return Corpus(tuple(documents), source_info, cache_key(sources), content_sha256(documents))


def content_sha256(documents: Iterable[Document | str]) -> str:
    """sha256 over the ordered documents, each as its UTF-8 byte length in decimal, a newline,
    then its UTF-8 bytes (so no two orderings or splittings of texts collide)."""
    digest = hashlib.sha256()
    for document in documents:
        data = (document.text if isinstance(document, Document) else document).encode("utf-8")
        digest.update(b"%d\n" % len(data))
        digest.update(data)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Caching.


def cache_key(sources: Sequence[str] = SOURCES) -> str:
    """A hash of everything a build depends on: the Python build, each source's version (None
    when missing), the sources' order and the extraction rules."""
    inputs = {
        "python": sys.version,
        "implementation": platform.python_implementation(),
        "sources": [[source, _source_version(source)] for source in sources],
        "rules_version": RULES_VERSION,
        "min_docstring_chars": MIN_DOCSTRING_CHARS,
        "skipped_dirs": sorted(SKIPPED_DIRS),
        "validation_every": VALIDATION_EVERY,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def cache_dir() -> pathlib.Path:
    """`$MOE_CACHE_DIR/python_docs`, by default `~/.cache/moe/python_docs`."""
    return pathlib.Path(cache_dirs.base_directory()) / "python_docs"


def cache_path(key: str) -> pathlib.Path:
    return cache_dir() / f"corpus-{key[:24]}.json"


def _write_cache(corpus: Corpus, path: pathlib.Path) -> None:
    payload = {
        "format": CACHE_FORMAT,
        "key": corpus.key,
        "sha256": corpus.sha256,
        "sources": corpus.sources,
        "documents": [[d.source, d.path, d.line, d.text] for d in corpus.documents],
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A unique temporary name in the same folder, then an atomic rename: readers (other
        # processes building the same corpus) see the old file or the whole new one.
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(payload, f, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:  # A read-only cache only costs the next process a rebuild.
        logger.warning("python_docs: could not write the cache %s (%s); not cached.", path, e)


def _read_cache(path: pathlib.Path, key: str) -> Corpus | None:
    """The cached corpus, or None (with a warning unless the file is absent) when it is
    missing, unreadable, for other inputs, or its documents do not hash to its sha256."""
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        if payload["format"] != CACHE_FORMAT or payload["key"] != key:
            raise ValueError("written for other inputs")
        documents = tuple(
            Document(str(source), str(rel), int(line), text)
            for source, rel, line, text in payload["documents"]
        )
        if not all(isinstance(d.text, str) for d in documents):
            raise ValueError("a document is not a string")
        sha256 = content_sha256(documents)
        if sha256 != payload["sha256"]:
            raise ValueError("its documents do not match its sha256")
        return Corpus(documents, dict(payload["sources"]), key, sha256)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError.
        logger.warning("python_docs: ignoring the cache %s (%s); rebuilding it.", path, e)
        return None


_MEMO: dict[str, Corpus] = {}
_LOCK = threading.Lock()


def clear_memory_cache() -> None:
    """Forgets the corpora held in memory (the disk cache stays)."""
    with _LOCK:
        _MEMO.clear()


def load_corpus(sources: Sequence[str] = SOURCES) -> Corpus:
    """The corpus of `sources`: from memory, else from the disk cache, else built and cached."""
    key = cache_key(tuple(sources))
    with _LOCK:
        if key in _MEMO:
            return _MEMO[key]
        path = cache_path(key)
        corpus = _read_cache(path, key)
        if corpus is None:
            corpus = build_corpus(tuple(sources))
            _write_cache(corpus, path)
        _MEMO[key] = corpus
        return corpus


# ---------------------------------------------------------------------------------------------
# The public API.


def python_docs_documents(split: str, sources: Sequence[str] = SOURCES) -> list[str]:
    """The documents of `split` ('train' or 'validation'), in corpus order."""
    if split not in ("train", "validation"):
        raise ValueError(f"python_docs has splits 'train' and 'validation', not {split!r}.")
    return load_corpus(sources).split(split)


def corpus_summary(sources: Sequence[str] = SOURCES) -> dict[str, Any]:
    """What the corpus is, for a report: sizes (UTF-8 bytes, documents) per split and per
    source, the Python and package versions, missing packages and the content hashes
    (`sha256` over all documents in order, `splits.<split>.sha256` over each split's)."""
    corpus = load_corpus(sources)

    def sizes(documents: Sequence[Document]) -> dict[str, int]:
        return {
            "documents": len(documents),
            "bytes": sum(len(d.text.encode("utf-8")) for d in documents),
        }

    by_split = {
        split: [d for d in corpus.documents if d.held_out == (split == "validation")]
        for split in ("train", "validation")
    }
    per_source = {}
    for source, info in corpus.sources.items():
        own = [d for d in corpus.documents if d.source == source]
        per_source[source] = {
            **sizes(own),
            **{
                f"{split}_{unit}": n
                for split, docs in by_split.items()
                for unit, n in sizes([d for d in docs if d.source == source]).items()
            },
            "version": info["version"],
            "installed": info["installed"],
            "files": info["files"],
            "unparsed_files": len(info.get("unparsed_files", [])),
        }
    return {
        "corpus": "python_docs",
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "rules_version": RULES_VERSION,
        "min_docstring_chars": MIN_DOCSTRING_CHARS,
        "held_out_rule": f"crc32(utf8(text)) % {VALIDATION_EVERY} == 0",
        "total": sizes(corpus.documents),
        "splits": {
            split: {**sizes(docs), "sha256": content_sha256(docs)}
            for split, docs in by_split.items()
        },
        "sources": per_source,
        "missing_packages": [s for s, info in corpus.sources.items() if not info["installed"]],
        "sha256": corpus.sha256,
        "cache_key": corpus.key,
    }


def python_docs_dataset(
    split: str, shuffle_files: bool, seed: int | None = None
) -> tf.data.Dataset:
    """{'text': document} examples of `split`, shuffled with `seed` when `shuffle_files`: the
    function of the `python_docs_*` tasks' source (`pretraining.python_docs_source`)."""
    documents = python_docs_documents(split)
    ds = tf.data.Dataset.from_tensor_slices({"text": documents})
    if shuffle_files:
        ds = ds.shuffle(len(documents), seed=seed)
    return ds


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(corpus_summary(), indent=2))


if __name__ == "__main__":
    main()
