"""Where this package keeps what it builds once per machine, without importing JAX.

`${MOE_CACHE_DIR:-~/.cache/moe}` holds the persistent compilation cache
(`moe.compilation_cache`), the native libraries built at first use (`moe.native_build`) and
downloaded corpora. Start-up code reads it before JAX loads, hence a module of its own.
"""

import os
from collections.abc import Mapping

# The words that turn a cache or a native library off, wherever a variable takes "off".
OFF_VALUES = frozenset({"off", "0", "false", "no", "none"})


def base_directory(environ: Mapping[str, str] | None = None) -> str:
    """`${MOE_CACHE_DIR:-~/.cache/moe}`, with `~` expanded."""
    environ = os.environ if environ is None else environ
    return os.path.expanduser(environ.get("MOE_CACHE_DIR") or os.path.join("~", ".cache", "moe"))
