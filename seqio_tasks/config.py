"""Where the data lives: environment variables, overridable from Python and from gin.

Data sources resolve their paths when a dataset is *built*, not when the task is registered, so
`import seqio_tasks` touches no disk and a gin binding parsed after the import still takes
effect:

  seqio_tasks.config.data_paths.glue_dir = '/data/glue'          # gin
  seqio_tasks.config.set_data_paths(glue_dir='/data/glue')       # python
  MOE_GLUE_DIR=/data/glue                                        # environment

Precedence: `set_data_paths` > gin binding > environment variable > unset.
"""

from __future__ import annotations

import dataclasses
import os

import gin

ENV_GLUE_DIR = "MOE_GLUE_DIR"
ENV_SUPER_GLUE_DIR = "MOE_SUPER_GLUE_DIR"
ENV_TFDS_DATA_DIR = "TFDS_DATA_DIR"
ENV_BIGBENCH_DIR = "MOE_BIGBENCH_DIR"
# The vocabulary `import seqio_tasks` registers GLUE, SuperGLUE and pretraining tasks with:
# 'byte' (default, offline), 't5' (T5's SentencePiece model on gs://, which the published
# T5.1.1 and Switch checkpoints were trained with) or the path of a SentencePiece .model file.
ENV_VOCABULARY = "MOE_VOCABULARY"
# The environment variable of each `DataPaths` field.
ENV_VARS = {
    "glue_dir": ENV_GLUE_DIR,
    "super_glue_dir": ENV_SUPER_GLUE_DIR,
    "tfds_data_dir": ENV_TFDS_DATA_DIR,
    "bigbench_dir": ENV_BIGBENCH_DIR,
}


def task_vocabulary() -> str:
    """The vocabulary tasks are registered with at import (`MOE_VOCABULARY`, else 'byte')."""
    return os.environ.get(ENV_VOCABULARY) or "byte"


@dataclasses.dataclass(frozen=True)
class DataPaths:
    """Resolved data locations; `None` means "not configured"."""

    glue_dir: str | None = None  # official GLUE TSVs (CoLA/, SST-2/, ...); read instead of TFDS
    super_glue_dir: str | None = None  # official SuperGLUE JSONL (BoolQ/, CB/, ...)
    tfds_data_dir: str | None = None  # prepared TFDS data (glue, super_glue, c4)
    bigbench_dir: str | None = None  # a BIG-bench `benchmark_tasks` folder


_OVERRIDES: dict[str, str | None] = {}


@gin.configurable(module="seqio_tasks.config")
def data_paths(
    glue_dir: str | None = None,
    super_glue_dir: str | None = None,
    tfds_data_dir: str | None = None,
    bigbench_dir: str | None = None,
) -> DataPaths:
    """Returns the current data paths (arguments are the gin-bindable layer)."""
    from_env = {field: os.environ.get(name) or None for field, name in ENV_VARS.items()}
    from_args = {
        "glue_dir": glue_dir,
        "super_glue_dir": super_glue_dir,
        "tfds_data_dir": tfds_data_dir,
        "bigbench_dir": bigbench_dir,
    }
    resolved = {}
    for key, env_value in from_env.items():
        if key in _OVERRIDES:
            resolved[key] = _OVERRIDES[key]
        elif from_args[key] is not None:
            resolved[key] = from_args[key]
        else:
            resolved[key] = env_value
    return DataPaths(**resolved)


_UNSET = object()


def set_data_paths(
    glue_dir=_UNSET, super_glue_dir=_UNSET, tfds_data_dir=_UNSET, bigbench_dir=_UNSET
) -> DataPaths:
    """Overrides data paths from Python (pass `None` to force "not configured")."""
    given = {
        "glue_dir": glue_dir,
        "super_glue_dir": super_glue_dir,
        "tfds_data_dir": tfds_data_dir,
        "bigbench_dir": bigbench_dir,
    }
    for key, value in given.items():
        if value is not _UNSET:
            _OVERRIDES[key] = None if value is None else os.fspath(value)
    return data_paths()


def how_to_set(field: str) -> str:
    """How a user points the `DataPaths` field `field` at a directory, for error messages: the
    environment variable and the gin binding (in a gin file or as an entry point flag)."""
    binding = f"seqio_tasks.config.data_paths.{field}"
    return (
        f"set {ENV_VARS[field]}=<dir>, or bind `{binding} = '<dir>'` in gin "
        f"(on the command line: --gin.{binding}=\"'<dir>'\")"
    )


def reset_data_paths() -> None:
    """Forgets every `set_data_paths` override (back to gin and the environment)."""
    _OVERRIDES.clear()
