"""Builds and registers the C++ CPU kernels (`moe/kernels/*.cc`) as XLA FFI targets.

The kernels ship as source and are compiled on first use with the system C++ compiler for the
machine they run on (`-O3 -march=native`: AVX-512 where the CPU has it, AVX2 or NEON
elsewhere), against the XLA FFI headers that come with the installed jaxlib, and kept in
`${MOE_CACHE_DIR:-~/.cache/moe}/kernels/` (`moe.native_build`: keyed by source, command,
jaxlib's version and CPU; written atomically).

Without a compiler (`CXX`, else `c++`/`g++`/`clang++` on PATH), or when the build fails, the
kernels are unavailable: `load` logs why once and returns False, and callers use XLA's own ops.
`MOE_CPU_KERNELS=off` turns them off without trying.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import jax
from absl import logging

from moe import cache_dirs, native_build

ENV_VAR = "MOE_CPU_KERNELS"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def _build(name: str) -> Path:
    """The kernel library in the cache, built against this jaxlib's FFI headers."""
    return native_build.build(name, [*FLAGS, "-I", jax.ffi.include_dir()],
                              key=[jax.lib.__version__])


@functools.cache
def load(name: str, targets: tuple[tuple[str, str], ...]) -> bool:
    """Build `kernels/<name>.cc` if needed and register `targets` ((FFI target, symbol), ...)
    for the CPU. False (logged once) when the kernels are off or cannot be built."""
    if os.environ.get(ENV_VAR, "").strip().lower() in cache_dirs.OFF_VALUES:
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(name)))
    except (OSError, native_build.BuildError) as error:
        logging.warning("The CPU kernel %r could not be built or loaded, XLA's own ops run "
                        "instead: %s", name, error)
        return False
    for target, symbol in targets:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    return True
