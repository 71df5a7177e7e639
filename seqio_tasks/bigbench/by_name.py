"""Registering a BIG-bench task when an entry point asks for it by name.

`import seqio_tasks` registers BIG-bench tasks only from `MOE_BIGBENCH_DIR`: the gin files
import the package before their bindings are parsed, so `seqio_tasks.config.data_paths
.bigbench_dir` (gin or `--gin....=` flag) is not known yet then. `ensure_registered(name)`,
called once the configuration is parsed and before the name is looked up, registers the task
folder `name` refers to from the folder configured *now* (`set_data_paths` > gin >
environment > the installed `bigbench` package), with exactly the shot count, example count
and vocabulary the name asks for. A name that still cannot be registered is a
`ConfigurationError` saying how to point at BIG-bench tasks.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re

import seqio

from moe.errors import ConfigurationError
from seqio_tasks import config, vocabularies
from seqio_tasks.bigbench import reader, tasks

PREFIX = "bigbench:"
NAME_FORM = (
    "bigbench:{task}.{gen|mul|scr|mix}.{byte|t5}_vocab.{k}_shot.{all|N}_examples[.{subtask}]"
)
_NAME = re.compile(
    r"bigbench:(?P<task>[^.]+)\.(?P<type>gen|mul|scr|mix)\.(?P<vocab>[^.]+)_vocab\."
    r"(?P<shots>\d+)_shot\.(?P<examples>all|\d+)_examples(?:\.(?P<subtask>.+))?"
)
_VOCABULARIES = (vocabularies.BYTE, vocabularies.T5)
LITE = "bigbench_lite_v1"


class UnregisteredBigbenchTaskError(ConfigurationError):
    """A BIG-bench task name that the configured BIG-bench folder cannot provide."""


@dataclasses.dataclass(frozen=True)
class BigbenchName:
    task: str
    vocab: str
    shots: int
    max_examples: int | None


def parse_name(name: str) -> BigbenchName:
    """The parts of a BIG-bench seqio name that decide its registration."""
    match = _NAME.fullmatch(name)
    if match is None:
        raise UnregisteredBigbenchTaskError(
            f"{name!r} is not a BIG-bench task name: they read {NAME_FORM}."
        )
    if match["vocab"] not in _VOCABULARIES:
        raise UnregisteredBigbenchTaskError(
            f"{name!r}: unknown vocabulary {match['vocab']!r}; BIG-bench tasks are registered "
            f"by name with {' or '.join(v + '_vocab' for v in _VOCABULARIES)}."
        )
    examples = None if match["examples"] == "all" else int(match["examples"])
    return BigbenchName(match["task"], match["vocab"], int(match["shots"]), examples)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _is_registered(name: str) -> bool:
    return name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names()


def _same_folder(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and os.path.abspath(a) == os.path.abspath(b)


def ensure_registered(name: str) -> None:
    """Makes the BIG-bench task or mixture `name` resolvable; does nothing for other names.

    A name already registered stays as it is unless a different BIG-bench folder is configured
    now, whose tasks then replace it.
    """
    if not name.startswith(PREFIX):
        return
    configured = config.data_paths().bigbench_dir
    if _is_registered(name) and (
        configured is None or _same_folder(tasks.registered_from(name), configured)
    ):
        return
    parsed = parse_name(name)
    benchmark_dir = configured or reader.installed_benchmark_dir()
    if benchmark_dir is None:
        raise UnregisteredBigbenchTaskError(
            f"{name!r} is not registered: no BIG-bench folder is configured. "
            f"{_sentence(tasks.HOW_TO_POINT_AT_TASKS)}"
        )
    _check_task_folder(name, parsed.task, benchmark_dir)
    lite = parsed.task == LITE
    if not lite:
        tasks.unregister_other_folders(parsed.task, benchmark_dir)
    tasks.register_bigbench_tasks(
        benchmark_dir,
        task_names=None if lite else [parsed.task],
        vocabularies={parsed.vocab: parsed.vocab},
        shots=(parsed.shots,),
        max_examples=(parsed.max_examples,),
        strict=not lite,  # one malformed task of the whole benchmark must not hide the rest
    )
    if not _is_registered(name):
        _raise_not_provided(name, parsed.task, benchmark_dir)


def _check_task_folder(name: str, task: str, benchmark_dir: str) -> None:
    if not os.path.isdir(benchmark_dir):
        raise UnregisteredBigbenchTaskError(
            f"{name!r}: the BIG-bench folder {benchmark_dir} does not exist. "
            f"{_sentence(config.how_to_set('bigbench_dir'))}."
        )
    present = [os.path.basename(f) for f in reader.list_json_task_folders(benchmark_dir)]
    if task != LITE and task not in present:
        close = difflib.get_close_matches(task, present, n=5)
        raise UnregisteredBigbenchTaskError(
            f"{name!r}: the BIG-bench folder {benchmark_dir} has no JSON task {task!r} "
            f"(no {task}/task.json). Close names: {close}; {len(present)} tasks there."
        )


def _raise_not_provided(name: str, task: str, benchmark_dir: str) -> None:
    prefix = f"{PREFIX}{task}."
    names = sorted(n for n in [*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()]
                   if n.startswith(prefix))  # fmt: skip
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.0)
    raise UnregisteredBigbenchTaskError(
        f"{name!r}: task {task!r} of {benchmark_dir} has no such form (a type its metrics do "
        f"not give, a subtask it does not have, or fewer training examples than shots + 1). "
        f"Registered names of this task include: {close}."
    )
