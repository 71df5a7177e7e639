"""The T5X command line: `--gin_file`, `--gin_bindings`, `--gin.X=Y`, `--gin_search_paths`.

Every entry point (`moe.train`, `moe.eval`, `moe.infer`) takes the same gin flags, so a T5X user
types what they already know:

    python -m moe.train --gin_file=models/tokens_choose_tiny.gin --gin_file=runs/pretrain.gin \
        --gin.MODEL_DIR="'/tmp/run'" --gin.TRAIN_STEPS=100

The installed `gin_configs` package is always on the search path, so `models/...` and
`runs/...` resolve without flags. A T5X/flaxformer model gin (a T5X model directory's
`config.gin`, or the gin files a published checkpoint came with) is accepted as a `--gin_file`
too: it is read as text and translated into our model gin for the same network
(`moe.interop.t5x_gin`). Errors (a gin file that does not exist, a binding gin cannot
parse, an unknown configurable) are raised as `GinConfigError` naming the file or binding and the
fix, before anything heavy (JAX, TensorFlow datasets) runs.
"""

import argparse
import dataclasses
import importlib.resources
import logging
import os
from collections.abc import Sequence

import gin

from moe.errors import ConfigurationError
from moe.interop import t5x_gin


class GinConfigError(ConfigurationError):
    """A gin file or binding given on the command line cannot be used."""


@dataclasses.dataclass(frozen=True)
class GinArgs:
    """The gin part of a command line, plus the other flags the entry point declared."""

    gin_files: tuple[str, ...]
    gin_bindings: tuple[str, ...]
    gin_search_paths: tuple[str, ...]
    extra: argparse.Namespace


def installed_gin_dir() -> str:
    """The directory of the installed `gin_configs` package (always searched)."""
    return str(importlib.resources.files("gin_configs"))


def _expand_shorthand(argv: Sequence[str]) -> list[str]:
    """Rewrite `--gin.X=Y` into `--gin_bindings=X = Y` (T5X's shorthand)."""
    out = []
    for arg in argv:
        if arg.startswith("--gin."):
            name, sep, value = arg[len("--gin.") :].partition("=")
            if not sep or not name:
                raise GinConfigError(
                    f"Cannot read {arg!r}: the shorthand is --gin.NAME=VALUE, e.g. "
                    "--gin.TRAIN_STEPS=100 or --gin.MODEL_DIR=\"'/tmp/run'\"."
                )
            out.append(f"--gin_bindings={name} = {value}")
        else:
            out.append(arg)
    return out


def make_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the gin flags; entry points add their own flags to it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--gin_file", action="append", default=[],
        help="A gin file (repeatable); relative paths are looked up in --gin_search_paths "
        "and in the installed gin_configs.",
    )
    parser.add_argument(
        "--gin_bindings", action="append", default=[],
        help="A gin binding such as \"TRAIN_STEPS = 100\" (repeatable). --gin.X=Y is shorthand.",
    )
    parser.add_argument(
        "--gin_search_paths", action="append", default=[],
        help="Comma-separated directories where gin files and their includes are looked up.",
    )
    return parser


def parse_args(argv: Sequence[str], parser: argparse.ArgumentParser) -> GinArgs:
    """Parse `argv` (without the program name) into gin files, bindings and other flags."""
    namespace = parser.parse_args(_expand_shorthand(argv))
    search_paths = tuple(
        p for group in namespace.gin_search_paths for p in group.split(",") if p
    )
    extra = argparse.Namespace(
        **{
            k: v
            for k, v in vars(namespace).items()
            if k not in ("gin_file", "gin_bindings", "gin_search_paths")
        }
    )
    return GinArgs(
        tuple(namespace.gin_file), tuple(namespace.gin_bindings), search_paths, extra
    )


def resolve_gin_file(name: str, search_paths: Sequence[str]) -> str:
    """The path of gin file `name`: as given, or under a search path, else a clear error."""
    candidates = [name] if os.path.isabs(name) else [name] + [
        os.path.join(d, name) for d in search_paths
    ]
    for path in candidates:
        if os.path.isfile(path):
            return path
    available = []
    for d in search_paths:
        for sub in ("models", "runs"):
            folder = os.path.join(d, sub)
            if os.path.isdir(folder):
                available += sorted(
                    f"{sub}/{f}" for f in os.listdir(folder) if f.endswith(".gin")
                )
    raise GinConfigError(
        f"Gin file {name!r} not found. Looked in: {candidates}. Pass a path that exists, or "
        f"add its folder with --gin_search_paths. Available: {available}"
    )


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def parse_gin(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str] = (),
    gin_search_paths: Sequence[str] = (),
    finalize: bool = True,
) -> list[str]:
    """Parse gin files then bindings into gin's global config; returns the resolved file paths.

    The installed `gin_configs` directory is appended to the search paths, so `include`
    statements inside gin files and `--gin_file=runs/pretrain.gin` resolve anywhere.
    """
    search_paths = [*gin_search_paths, installed_gin_dir()]
    for path in search_paths:
        gin.add_config_file_search_path(path)
    files = [resolve_gin_file(f, search_paths) for f in gin_files]
    # gin logs an error for each search path an `include` is not under before it finds it.
    quiet = _DropMessages("Path not found")
    logging.getLogger().addFilter(quiet)
    try:
        for path in files:
            if t5x_gin.is_t5x_gin(path, search_paths):
                _parse_t5x_gin(path, search_paths)
                continue
            try:
                gin.parse_config_file(path)
            except Exception as e:  # gin raises several types; all mean the file is unusable.
                raise GinConfigError(f"Gin file {path} cannot be parsed: {e}") from e
    finally:
        logging.getLogger().removeFilter(quiet)
    for binding in gin_bindings:
        try:
            gin.parse_config(binding)
        except Exception as e:
            raise GinConfigError(
                f"Gin binding {binding!r} cannot be parsed: {e}. Strings need inner quotes, "
                "e.g. --gin.MODEL_DIR=\"'/tmp/run'\"."
            ) from e
    if finalize:
        gin.finalize()
    return files


def _parse_t5x_gin(path: str, search_paths: Sequence[str]) -> None:
    """A T5X/flaxformer model gin (a T5X model directory's config.gin, or the gin a published
    checkpoint came with): parsed as our model gin computing the same network."""
    try:
        text = t5x_gin.translate_gin_file(path, search_paths)
    except t5x_gin.T5xGinError as e:
        raise GinConfigError(f"T5X gin file {path} cannot be translated: {e}") from e
    logging.info("Read the T5X gin %s as this model gin:\n%s", path, text)
    try:
        gin.parse_config(text)
    except Exception as e:
        raise GinConfigError(f"The model gin translated from {path} cannot be parsed: {e}") from e


def parse_command_line(argv: Sequence[str], parser: argparse.ArgumentParser) -> GinArgs:
    """Parse `argv` and load its gin configuration into gin's global state."""
    args = parse_args(argv, parser)
    parse_gin(args.gin_files, args.gin_bindings, args.gin_search_paths)
    return args


__all__ = [
    "GinArgs",
    "GinConfigError",
    "installed_gin_dir",
    "make_parser",
    "parse_args",
    "parse_command_line",
    "parse_gin",
    "resolve_gin_file",
]
