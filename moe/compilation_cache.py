"""Compiled programs kept between runs, and the train step compiled while the rest starts up.

A run spends most of its time before the first step compiling: on 2 CPU cores the tiny MoE
(`models/tokens_choose_tiny.gin`) takes ~2 s to compile its state initialization and ~4 s its
train step, every run, although a resumed or repeated run compiles exactly the same programs.
JAX's persistent compilation cache stores each compiled executable on disk under a key of the
program, its compile options, the backend and the XLA flags, so a second run of the same
configuration loads them instead (`python -m moe.benchmarks.train_speed` measures both).

Where the cache lives (read by `enable`, which every entry point calls first):

- `MOE_COMPILATION_CACHE_DIR` unset or empty:
  `${MOE_CACHE_DIR:-~/.cache/moe}/jax_compilation_cache` (beside the python_docs corpus cache);
- `MOE_COMPILATION_CACHE_DIR=/some/dir`: there;
- `MOE_COMPILATION_CACHE_DIR=off` (or 0, false, no, none): not turned on here.

JAX's own settings win: with `JAX_COMPILATION_CACHE_DIR` set (or `jax_compilation_cache_dir`
set in the program) that directory is used, and `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` /
`JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES` keep their values. JAX's defaults skip programs
that compile in under 1 s, which on CPU is most of a small model's (evaluation, decoding):
here anything that takes `MIN_COMPILE_TIME_SECS` is kept, of any size. Only process 0 writes
(JAX's rule); entries are never evicted (JAX's size limit needs the `filelock` package): delete
the directory to reclaim the space.
"""

import os
import threading
from collections.abc import Mapping
from concurrent.futures import Future

import jax

from moe.cache_dirs import OFF_VALUES, base_directory

ENV_VAR = "MOE_COMPILATION_CACHE_DIR"
# Programs faster to compile than this are not worth a file: reading one back costs a few ms.
MIN_COMPILE_TIME_SECS = 0.1


def default_directory(environ: Mapping[str, str] | None = None) -> str:
    """`${MOE_CACHE_DIR:-~/.cache/moe}/jax_compilation_cache`, with `~` expanded."""
    return os.path.join(base_directory(environ), "jax_compilation_cache")


def cache_directory(environ: Mapping[str, str] | None = None) -> str | None:
    """The directory `MOE_COMPILATION_CACHE_DIR` asks for, or None when it turns the cache off."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV_VAR, "").strip()
    if value.lower() in OFF_VALUES:
        return None
    return os.path.expanduser(value) if value else default_directory(environ)


def enable(environ: Mapping[str, str] | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache; returns its directory (None: left off).

    Call it before the process compiles anything: JAX decides once, at its first compilation,
    whether the cache is used, and later changes of the directory are not seen.
    """
    environ = os.environ if environ is None else environ
    chosen = jax.config.jax_compilation_cache_dir  # JAX_COMPILATION_CACHE_DIR or the program's
    if chosen:
        return chosen
    directory = cache_directory(environ)
    if directory is None:
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECS)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # any size
    return directory


def compile_in_background(lowered: jax.stages.Lowered) -> "Future[jax.stages.Compiled]":
    """Compile `lowered` on another thread; the future holds the executable or the error.

    XLA compiles without holding Python's GIL, so on a machine with a free core the caller's
    Python work (initializing or restoring the state, the input pipeline's graph building)
    runs meanwhile. A jitted function lowered with the arguments it is later called with
    (same shapes, dtypes, shardings, tracing context) finds this compilation in JAX's
    in-memory cache and does not compile again.

    The thread is not a daemon: a run that fails meanwhile exits after the compilation ends,
    as Python waits for it, instead of tearing the thread down inside XLA (which can abort).
    """
    future: Future = Future()

    def compile_it():
        try:
            future.set_result(lowered.compile())
        except BaseException as e:  # handed to whoever waits on the future
            future.set_exception(e)

    threading.Thread(target=compile_it, name="compile-in-background", daemon=False).start()
    return future


__all__ = [
    "ENV_VAR",
    "MIN_COMPILE_TIME_SECS",
    "cache_directory",
    "compile_in_background",
    "default_directory",
    "enable",
]
