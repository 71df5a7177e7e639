"""Writing one of our model gins from settings read elsewhere (a T5X gin, a Hugging Face
config.json), and building the model a gin text describes.

A converted checkpoint always travels with such a gin: it includes our wiring gin
(`models/sparse_t5.gin`), sets the T5X macros (EMBED_DIM, NUM_EXPERTS, ...) and binds the few
options where the source codebase computes differently from our defaults, each with a comment
saying why. It is an ordinary model gin: `--gin_file=OUT/model.gin` plus run gins and flags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import gin


def gin_literal(value: Any) -> str:
    """`value` as gin source: Python literals, or `@name()` / `%NAME` references kept as is."""
    if isinstance(value, GinReference):
        return value.text
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool) or value is None or isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(gin_literal(v) for v in value) + "]"
    if isinstance(value, tuple):
        items = ", ".join(gin_literal(v) for v in value)
        return f"({items},)" if len(value) == 1 else f"({items})"
    if isinstance(value, Mapping):
        items = ", ".join(f"{gin_literal(k)}: {gin_literal(v)}" for k, v in value.items())
        return "{" + items + "}"
    raise TypeError(f"Cannot write {value!r} ({type(value).__name__}) as a gin value.")


@dataclasses.dataclass(frozen=True)
class GinReference:
    """A gin reference written verbatim (`@encoder/ExpertChoice()`, `%NUM_EXPERTS`)."""

    text: str


@dataclasses.dataclass
class ModelGin:
    """A model gin of ours: a wiring gin, macros, then bindings (each with an optional comment).

    `bindings` values may be `(value, comment)` pairs; the comment is written above the line.
    """

    header: Sequence[str]
    base: str = "models/sparse_t5.gin"
    macros: dict[str, Any] = dataclasses.field(default_factory=dict)
    bindings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @staticmethod
    def _split(entry: Any) -> tuple[Any, Comment | None]:
        """A binding's (value, comment): entries are values or `(value, Comment)` pairs."""
        if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], Comment):
            return entry
        return entry, None

    def values(self) -> dict[str, Any]:
        """Every macro and binding this gin sets, by name, without comments."""
        return {**self.macros, **{k: self._split(v)[0] for k, v in self.bindings.items()}}

    def render(self) -> str:
        lines = [f"# {line}" if line else "#" for line in self.header]
        lines += [f"include '{self.base}'", ""]
        lines += [f"{name} = {gin_literal(value)}" for name, value in self.macros.items()]
        if self.bindings:
            lines.append("")
        for name, entry in self.bindings.items():
            value, comment = self._split(entry)
            if comment is not None:
                lines += [f"# {c}" for c in comment.text.splitlines()]
            lines.append(f"{name} = {gin_literal(value)}")
        return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class Comment:
    """Why a binding is there (written above it in the rendered gin)."""

    text: str


@gin.configurable
def _model_of_gin(model: Any = gin.REQUIRED) -> Any:
    return model


def build_model(
    gin_text: str | None = None,
    gin_files: Sequence[str] = (),
    bindings: Sequence[str] = (),
    search_paths: Sequence[str] = (),
) -> Any:
    """The `%MODEL` that a gin text (and/or gin files) defines, with our gin search paths.

    Uses gin's global configuration: it is cleared before parsing and left as parsed (the
    caller's process is a converter or a test, not a training run with its own gin).
    """
    from moe import gin_cli

    gin.clear_config()
    files = list(gin_files)
    gin_cli.parse_gin(files, [], search_paths, finalize=False)
    if gin_text is not None:
        gin.parse_config(gin_text)
    for binding in (*bindings, "moe.interop.model_gin._model_of_gin.model = %MODEL"):
        gin.parse_config(binding)
    return _model_of_gin()


__all__ = ["Comment", "GinReference", "ModelGin", "build_model", "gin_literal"]
