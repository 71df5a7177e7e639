"""Builds and registers the C++ CPU kernels (`moe/kernels/*.cc`) as XLA FFI targets.

The kernels ship as source and are compiled on first use with the system C++ compiler for the
machine they run on (`-O3 -march=native`: AVX-512 where the CPU has it, AVX2 or NEON
elsewhere), against the XLA FFI headers that come with the installed jaxlib. The shared
library is kept in `${MOE_CACHE_DIR:-~/.cache/moe}/kernels/`, named by a hash of the source,
the compiler command, jaxlib's version and the CPU, so a later run loads it in milliseconds
and a changed source, jaxlib or CPU builds a new one. It is written to a temporary file and
renamed, so processes that build it at the same time never load a half-written library.

Without a compiler (`CXX`, else `c++`/`g++`/`clang++` on PATH), or when the build fails, the
kernels are unavailable: `load` logs why once and returns False, and callers use XLA's own ops.
`MOE_CPU_KERNELS=off` turns them off without trying.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
from absl import logging

from moe import compilation_cache

SOURCE_DIR = Path(__file__).parent / "kernels"
ENV_VAR = "MOE_CPU_KERNELS"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def cache_directory() -> Path:
    """`${MOE_CACHE_DIR:-~/.cache/moe}/kernels`, beside the compilation cache."""
    return Path(compilation_cache.base_directory()) / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_name() -> str:
    """The CPU model and flags (they decide what -march=native emits)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in text.splitlines()
             if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(lines)))


def _build(name: str, compiler: str) -> Path:
    """Compile `kernels/<name>.cc` into the cache (or find it there); raises on failure."""
    source = SOURCE_DIR / f"{name}.cc"
    command = [compiler, *FLAGS, "-I", jax.ffi.include_dir()]
    key = hashlib.sha256("\0".join([source.read_text(), *command, jax.lib.__version__,
                                    platform.machine(), _cpu_name()]).encode()).hexdigest()[:16]
    library = cache_directory() / f"{name}-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(handle)
    try:
        result = subprocess.run([*command, str(source), "-o", partial],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return library


@functools.cache
def load(name: str, targets: tuple[tuple[str, str], ...]) -> bool:
    """Build `kernels/<name>.cc` if needed and register `targets` ((FFI target, symbol), ...)
    for the CPU. False (logged once) when the kernels are off or cannot be built."""
    if os.environ.get(ENV_VAR, "").strip().lower() in compilation_cache.OFF_VALUES:
        return False
    compiler = _compiler()
    if compiler is None:
        logging.warning("No C++ compiler found (set CXX, or install g++): the CPU kernel %r is "
                         "unavailable and XLA's own ops run instead.", name)
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(name, compiler)))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
        logging.warning("The CPU kernel %r could not be built or loaded, XLA's own ops run "
                        "instead: %s", name, error)
        return False
    for target, symbol in targets:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    return True
