"""Builds this package's native sources (`moe/kernels/`) with the system C++ compiler, once per
machine, without importing JAX (start-up code builds the host block cache before JAX loads).

The sources ship with the package and are compiled where they run: a wheel cannot know the CPU
(`-march=native`) or, for the XLA FFI kernels, the installed jaxlib's headers. The library is
kept in `${MOE_CACHE_DIR:-~/.cache/moe}/kernels/<name>-<hash>.so`, the hash covering the source,
the compiler command, the caller's extra key (jaxlib's version for FFI kernels) and the CPU, so
a later run loads it in milliseconds and a changed source, jaxlib or CPU builds a new one. It is
written to a temporary file and renamed, so processes building it at the same time never load a
half-written library.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from moe import cache_dirs

SOURCE_DIR = Path(__file__).parent / "kernels"


class BuildError(RuntimeError):
    """No C++ compiler, or the build failed or timed out: the message says which."""


def cache_directory() -> Path:
    """`${MOE_CACHE_DIR:-~/.cache/moe}/kernels`, beside the compilation cache."""
    return Path(cache_dirs.base_directory()) / "kernels"


def compiler() -> str | None:
    """`CXX`, else the first of c++, g++, clang++ on PATH; None without one."""
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


def build(name: str, flags: Sequence[str], key: Sequence[str] = ()) -> Path:
    """Compile `kernels/<name>.cc` with `flags` into the cache (or find it there). Raises
    BuildError without a compiler (`compiler()`), or with the compiler's message on failure."""
    compiler_name = compiler()
    if compiler_name is None:
        raise BuildError("no C++ compiler found (set CXX, or install g++)")
    try:
        return _build(name, compiler_name, flags, key)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuildError(f"building {name} failed: {error}") from error


def _build(name: str, compiler: str, flags: Sequence[str], key: Sequence[str]) -> Path:
    source = SOURCE_DIR / f"{name}.cc"
    command = [compiler, *flags]
    digest = hashlib.sha256("\0".join([source.read_text(), *command, *key, platform.machine(),
                                       _cpu_name()]).encode()).hexdigest()[:16]
    library = cache_directory() / f"{name}-{digest}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(handle)
    try:
        result = subprocess.run([*command, str(source), "-o", partial],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise BuildError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return library
