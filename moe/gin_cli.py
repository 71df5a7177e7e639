"""The T5X command line: `--gin_file`, `--gin_bindings`, `--gin.X=Y`, `--gin_search_paths`.

Every entry point (`moe.train`, `moe.eval`, `moe.infer`) takes the same gin flags, so a T5X user
types what they already know:

    python -m moe.train --gin_file=models/tokens_choose_tiny.gin --gin_file=runs/pretrain.gin \
        --gin.MODEL_DIR="'/tmp/run'" --gin.TRAIN_STEPS=100

The installed `gin_configs` package is always on the search path, so `models/...` and
`runs/...` resolve without flags. A T5X/flaxformer model gin (a T5X model directory's
`config.gin`, or the gin files a published checkpoint came with) is accepted as a `--gin_file`
too: it is read as text and translated into our model gin for the same network
(`moe.interop.t5x_gin`). A gin file, a search path and an include may be a `gs://` URL: gin
reads files through `moe.file_io` too. Errors (a gin file that does not exist, a binding gin cannot
parse, an unknown configurable or parameter, a macro or scope that no gin file uses, so that the
binding would change nothing, a required macro left unset) are raised as `GinConfigError` naming
the file or binding, the closest existing name and the fix, before anything heavy (JAX,
TensorFlow datasets) runs.
"""

import argparse
import dataclasses
import difflib
import importlib.resources
import inspect
import logging
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import gin
from gin import config_parser

from moe import file_io, log_filters
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
    absolute = os.path.isabs(name) or file_io.is_url(name)
    candidates = [name] if absolute else [name] + [file_io.join(d, name) for d in search_paths]
    for path in candidates:
        if file_io.isfile(path):
            return path
    available = []
    for d in search_paths:
        for sub in ("models", "runs"):
            folder = file_io.join(d, sub)
            if file_io.isdir(folder):
                available += [f"{sub}/{f}" for f in file_io.listdir(folder) if f.endswith(".gin")]
    raise GinConfigError(
        f"Gin file {name!r} not found. Looked in: {candidates}. Pass a path that exists, or "
        f"add its folder with --gin_search_paths. Available: {available}"
    )


def _is_url_file(path: str) -> bool:
    return file_io.is_url(path) and file_io.isfile(path)


def register_url_reader() -> None:
    """Let gin read files (and `include`s) given as URLs through `moe.file_io`; gin's own
    reader, `open`, keeps local paths. Registering twice registers once."""
    gin.config.register_file_reader(file_io.open_file, _is_url_file)


def _use_search_paths(search_paths: Sequence[str]) -> None:
    """Make `search_paths` gin's only `include` search paths. gin only ever appends to its
    list, so a process that parses several configurations (the router comparison, the tests)
    would otherwise find an `include` under an earlier configuration's folder first."""
    prefixes = getattr(gin.config, "_LOCATION_PREFIXES", None)
    if isinstance(prefixes, list):
        prefixes[:] = [""]
    for path in search_paths:
        gin.add_config_file_search_path(path)


def parse_gin(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str] = (),
    gin_search_paths: Sequence[str] = (),
    finalize: bool = True,
) -> list[str]:
    """Parse gin files then bindings into gin's global config; returns the resolved file paths.

    The installed `gin_configs` directory is appended to the search paths, so `include`
    statements inside gin files and `--gin_file=runs/pretrain.gin` resolve anywhere.

    Every file is parsed before any binding, and the bindings are checked against the whole
    result: a binding must change something, so a macro or scope that nothing uses (a typo such
    as `--gin.TRAIN_STPES=10`, which gin would quietly define as a new macro) is an error naming
    the closest name in use, as is an unknown configurable or parameter.
    """
    search_paths = [*gin_search_paths, installed_gin_dir()]
    register_url_reader()
    _use_search_paths(search_paths)
    files = [resolve_gin_file(f, search_paths) for f in gin_files]
    _parse_gin_files(files, search_paths)
    in_files = _ConfigNames.of(_parsed_config())
    targets = [target for binding in gin_bindings for target in _parse_binding(binding)]
    _check_bindings_change_something(targets, in_files)
    if finalize:
        _check_used_macros_are_set()
        _finalize()
    return files


def _parse_gin_files(files: Sequence[str], search_paths: Sequence[str]) -> None:
    # gin logs an error for each search path an `include` is not under before it finds it.
    with log_filters.dropping(None, "Path not found"):
        for path in files:
            if t5x_gin.is_t5x_gin(path, search_paths):
                _parse_t5x_gin(path, search_paths)
                continue
            try:
                gin.parse_config_file(path)
            except Exception as e:  # gin raises several types; all mean the file is unusable.
                raise GinConfigError(f"Gin file {path} cannot be parsed: {e}") from e


# --- Checking command-line bindings -----------------------------------------------------------
# gin binds a macro `NAME = value` as parameter `value` of the configurable `gin.macro` in scope
# NAME, and reads `%NAME` as a reference to `NAME/gin.macro`; a macro is a scope of `gin.macro`.
_MACRO = "gin.macro"
_CONSTANT = "gin.constant"


@dataclasses.dataclass(frozen=True)
class _Target:
    """What one statement of a command-line binding sets: a macro, or `scope/selector.arg`."""

    binding: str
    scope: str
    selector: str
    arg_name: str

    @property
    def is_macro(self) -> bool:
        return not self.arg_name

    @property
    def macro_name(self) -> str:
        return f"{self.scope}/{self.selector}" if self.scope else self.selector


@dataclasses.dataclass(frozen=True)
class _Reference:
    scoped_selector: str


class _TextDelegate(config_parser.ParserDelegate):
    """Reads references and macros as plain names: nothing is looked up or evaluated."""

    def configurable_reference(self, scoped_configurable_name, evaluate):
        return _Reference(scoped_configurable_name)

    def macro(self, macro_name):
        return _Reference(f"{macro_name}/{_MACRO}")


def _binding_statements(binding: str) -> list[Any]:
    try:
        return list(config_parser.ConfigParser(binding, _TextDelegate()))
    except Exception as e:  # gin's parser raises SyntaxError and ValueError subclasses.
        raise GinConfigError(_unparsable_binding(binding, e)) from e


def _unparsable_binding(binding: str, error: Exception) -> str:
    return (f"Gin binding {binding!r} cannot be parsed: {error}. Strings need inner quotes, "
            "e.g. --gin.MODEL_DIR=\"'/tmp/run'\".")


def _parse_binding(binding: str) -> list[_Target]:
    """Apply one command-line binding to gin's config; returns what its statements set."""
    statements = _binding_statements(binding)
    try:
        gin.parse_config(binding)
    except Exception as e:
        hint = _unknown_configurable_hint(statements)
        if hint:
            raise GinConfigError(f"Gin binding {binding!r}: {hint}") from e
        raise GinConfigError(_unparsable_binding(binding, e)) from e
    return [
        _Target(binding, s.scope, s.selector, s.arg_name)
        for s in statements
        if isinstance(s, config_parser.BindingStatement)
    ]


def _parsed_config() -> dict[tuple[str, str], dict[str, Any]] | None:
    """gin's parsed bindings, `{(scope, selector): {arg: value}}`, or None if unavailable.

    gin has no public getter for the whole parsed configuration (its finalize hooks receive this
    same dict, but only once finalizing); the pinned gin-config keeps it in `config._CONFIG`.
    Without it the typo checks are skipped rather than failing a valid command line.
    """
    config = getattr(gin.config, "_CONFIG", None)
    return config if isinstance(config, dict) else None


def _gin_registry() -> Any | None:
    """gin's registry of configurables (a `SelectorMap`), or None if unavailable (hints only)."""
    registry = getattr(gin.config, "_REGISTRY", None)
    return registry if hasattr(registry, "matching_selectors") else None


@dataclasses.dataclass(frozen=True)
class _ConfigNames:
    """The macros and scopes a gin configuration sets (binds) and uses (refers to)."""

    macros_set: frozenset[str] = frozenset()
    macros_used: frozenset[str] = frozenset()
    scopes_set: frozenset[str] = frozenset()
    scopes_used: frozenset[str] = frozenset()

    @classmethod
    def of(cls, config: dict[tuple[str, str], dict[str, Any]] | None) -> "_ConfigNames":
        if config is None:
            return cls()
        macros_set, scopes_set = set(), set()
        for scope, selector in config:
            if selector == _MACRO:
                macros_set.add(scope)
            elif selector != _CONSTANT:
                scopes_set.update(s for s in scope.split("/") if s)
        macros_used, scopes_used = set(), set()
        for ref in gin.config.iterate_references(config):
            if ref.configurable.selector == _MACRO:
                macros_used.add("/".join(ref.scopes))
            elif ref.configurable.selector != _CONSTANT:
                scopes_used.update(s for s in ref.scopes if s)
        return cls(*map(frozenset, (macros_set, macros_used, scopes_set, scopes_used)))


def _check_bindings_change_something(targets: Sequence[_Target], in_files: _ConfigNames) -> None:
    """A command-line macro must be one the gin files set or something uses, and a scope one the
    files bind or something references: anything else would change nothing.

    Checked after all bindings, so a binding may use a macro or scope that another sets.
    """
    config = _parsed_config()
    if not targets or config is None:
        return
    now = _ConfigNames.of(config)
    known_macros = in_files.macros_set | now.macros_used
    known_scopes = in_files.scopes_set | now.scopes_used
    for target in targets:
        if target.is_macro and target.macro_name not in known_macros:
            raise GinConfigError(_unused_macro_message(target, known_macros))
        for scope in filter(None, [] if target.is_macro else target.scope.split("/")):
            if scope not in known_scopes:
                raise GinConfigError(
                    f"Gin binding {target.binding!r}: no gin file uses the scope {scope!r}, so "
                    f"the binding would change nothing.{_did_you_mean(scope, known_scopes)} "
                    f"Scopes in use: {', '.join(sorted(known_scopes)) or 'none'}."
                )


def _unused_macro_message(target: _Target, known: set[str] | frozenset[str]) -> str:
    name = target.macro_name
    closest = _closest(name, known)
    fix = (f" Did you mean {closest} (--gin.{closest}=...)?" if closest else
           f" Macros in use: {', '.join(sorted(known)) or 'none'}.")
    return (f"Gin binding {target.binding!r} sets the macro {name}, which no gin file uses, so it "
            f"would change nothing.{fix}")


def _closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like `name` (difflib, case-insensitive), or None if none is close."""
    by_lower = {c.lower(): c for c in sorted(candidates)}
    matches = difflib.get_close_matches(name.lower(), list(by_lower), n=1)
    return by_lower[matches[0]] if matches else None


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    closest = _closest(name, candidates)
    return f" Did you mean {closest!r}?" if closest else ""


def _unknown_configurable_hint(statements: Sequence[Any]) -> str | None:
    """Why gin refused a binding, when it names a configurable, parameter or reference that does
    not exist, with the closest existing name; None for other failures."""
    registry = _gin_registry()
    if registry is None:
        return None
    for statement in statements:
        if not isinstance(statement, config_parser.BindingStatement):
            continue
        if statement.arg_name:
            hint = _selector_hint(registry, statement.selector, statement.arg_name)
            if hint:
                return hint
        if isinstance(statement.value, _Reference):
            selector = statement.value.scoped_selector.rpartition("/")[2]
            if not registry.matching_selectors(selector):
                return _unknown_selector_message(registry, selector, "@")
    return None


def _selector_hint(registry: Any, selector: str, arg_name: str) -> str | None:
    matches = registry.matching_selectors(selector)
    if not matches:
        return _unknown_selector_message(registry, selector, "")
    if len(matches) > 1:
        return None  # gin's own message lists the ambiguous matches.
    params = _parameter_names(registry.get(matches[0]).wrapped)
    if params is None or arg_name in params:
        return None
    return (f"{selector} has no parameter {arg_name!r}.{_did_you_mean(arg_name, params)} "
            f"Its parameters: {', '.join(params)}.")


def _unknown_selector_message(registry: Any, selector: str, prefix: str) -> str:
    names = {n for complete, _ in registry.items() for n in (complete, complete.split(".")[-1])}
    return (f"no configurable named {prefix}{selector} is registered (the modules the gin files "
            f"import register them).{_did_you_mean(selector, names)}")


def _parameter_names(fn_or_cls: Any) -> list[str] | None:
    """The keyword parameters of a configurable; None when it takes any (**kwargs) or has no
    readable signature."""
    try:
        parameters = inspect.signature(fn_or_cls).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _check_used_macros_are_set() -> None:
    """A macro referenced with %NAME that nothing sets is named with its closest set macro (gin's
    own finalize error prints the whole configuration instead)."""
    config = _parsed_config()
    names = _ConfigNames.of(config)
    for name in sorted(names.macros_used - names.macros_set):
        users = sorted(_binding_key(key, arg) for key, args in (config or {}).items()
                       for arg, value in args.items() if _refers_to_macro(value, name))
        if name == "MODEL":
            fix = " Add a model gin, e.g. --gin_file=models/tokens_choose_tiny.gin."
        else:
            closest = _closest(name, names.macros_set)
            fix = f" Did you mean %{closest}? Otherwise" if closest else ""
            fix += f" {'s' if closest else 'S'}et it with --gin.{name}=VALUE."
        raise GinConfigError(
            f"The macro %{name} is used (by {', '.join(users) or 'a binding'}) but never set."
            + fix
        )


def _refers_to_macro(value: Any, name: str) -> bool:
    return any(
        ref.configurable.selector == _MACRO and "/".join(ref.scopes) == name
        for ref in gin.config.iterate_references([value])
    )


def _binding_key(key: tuple[str, str], arg: str) -> str:
    scope, selector = key
    if selector == _MACRO:
        return scope
    name = f"{selector.rpartition('.')[2]}.{arg}"
    return f"{scope}/{name}" if scope else name


_REQUIRED_NOT_SET = re.compile(
    r"^(?P<key>\S+) set to `%gin.REQUIRED` but not subsequently overridden"
)


def _finalize() -> None:
    """gin.finalize, its refusals (a %gin.REQUIRED value never set, ...) as GinConfigError."""
    try:
        gin.finalize()
    except ValueError as e:
        required = _REQUIRED_NOT_SET.match(str(e))
        if required:
            key = required["key"].removesuffix("/macro.value")
            value = "VALUE" if key != "MODEL_DIR" else "\"'/tmp/run'\""
            raise GinConfigError(
                f"{key} is required (%gin.REQUIRED in the gin files) but not set: pass "
                f"--gin.{key}={value}."
            ) from e
        raise GinConfigError(f"The gin configuration cannot be completed: {e}") from e


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
    "register_url_reader",
    "resolve_gin_file",
]
