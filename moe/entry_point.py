"""The shared shape of the gin entry points (train, eval, infer).

Each parses the T5X-style flags, turns on the persistent compilation cache
(`moe.compilation_cache`), joins the cluster before any JAX backend use, runs, and turns
every `ConfigurationError` (bad gin, unknown task, missing checkpoint or data, a model, mesh or
router setting that cannot work, bad cluster settings) into one `error: ...` line and exit
status 2 instead of a traceback.
"""

import sys
from collections.abc import Callable, Sequence
from typing import Any

from moe import compilation_cache, distributed, gin_cli
from moe.errors import ConfigurationError


def run_entry_point(
    description: str, run: Callable[[], Any], argv: Sequence[str] | None = None
) -> tuple[int, Any]:
    """(exit status, what `run` returned or None) for the command line `argv`."""
    parser = gin_cli.make_parser(description)
    distributed.add_distributed_flags(parser)
    try:
        args = gin_cli.parse_command_line(sys.argv[1:] if argv is None else argv, parser)
        compilation_cache.enable()  # before anything compiles (MOE_COMPILATION_CACHE_DIR)
        distributed.initialize_distributed(args.extra)  # before any JAX backend use
        return 0, run()
    except ConfigurationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, None
