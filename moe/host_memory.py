"""`MOE_HOST_MEMORY=retain`: keep freed host memory in the process, for CPU runs whose steps
write large buffers.

Why: XLA:CPU allocates every step's outputs and temporaries with malloc and frees them when
the step ends. glibc serves allocations above 32 MiB with their own mmap and unmaps them on
free, so the next step writes into fresh pages and takes one page fault per 4 KiB. On a
2-core machine writing a fresh 512 MiB buffer cost 136 ms against 26 ms for the same write
into memory already mapped (`moe.benchmarks.moe_layer` measures both).

What: three glibc malloc settings, made before JAX and TensorFlow start their threads:
- one arena (`M_ARENA_MAX=1`): a thread's own arena serves a large block by mmap whatever
  the other settings say, so every thread must use the main heap;
- no mmap for large blocks (`M_MMAP_MAX=0`): they come from the heap;
- freed memory stays in the heap up to 2 GiB at its top (`M_TRIM_THRESHOLD`), to be reused.

Why it is not the default: the one arena serializes every thread's malloc. Measured on the
same 2-core machine (float32):
- MoE layer benchmark (top-1 index, 4096 tokens, d_model 512, d_ff 2048), where the steps
  write hundreds of MiB: 390 -> 313 ms at 32 experts, 966 -> 673 ms at 128, the dense FFN
  258 -> 235 ms; peak resident memory 4.3 -> 5.8 GB (XLA asks for 64-byte aligned blocks,
  and an aligned request does not fit the hole an equal block left, so the heap settles a few
  blocks above what the program holds);
- the quickstart's tiny model, whose small steps run beside TensorFlow's input threads:
  11.1 -> 8.0-9.1 steps/s, slower. Without the one arena nothing changes either way.

Where: in processes started as one of this package's programs (`python -m moe.train`, the
benchmarks; through `moe.start_up`), on Linux with glibc. Importing the library (a notebook,
the test suite) never changes the process's malloc.
"""

import ctypes
import os
import platform
import sys

ENVIRONMENT_VARIABLE = "MOE_HOST_MEMORY"
CHOICES = ("system", "retain")

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int

_applied = False


def wanted() -> bool:
    """`MOE_HOST_MEMORY` asks for retained memory; a ValueError names the choices for an
    unknown value."""
    choice = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower() or "system"
    if choice not in CHOICES:
        raise ValueError(
            f"{ENVIRONMENT_VARIABLE}={os.environ[ENVIRONMENT_VARIABLE]!r} is not one of "
            f"{list(CHOICES)}: 'system' (the default) keeps glibc's malloc settings, 'retain' "
            "keeps freed memory in the process (see moe/host_memory.py for when that pays)."
        )
    return choice == "retain"


def started_as_entry_point() -> bool:
    """The process runs one of this package's modules as `__main__` (`python -m moe....`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name.split(".")[0] == "moe"


def glibc_available() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def retained() -> bool:
    """Whether this process made the settings (`retain_freed_memory`)."""
    return _applied


def retain_freed_memory() -> bool:
    """Make the settings of the module doc where `wanted()`; True if they are in effect.

    Idempotent. Call it before JAX or TensorFlow load: threads that already have an arena of
    their own keep it.
    """
    global _applied
    if _applied:
        return True
    if not glibc_available() or not wanted():
        return False
    libc = ctypes.CDLL("libc.so.6")
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    _applied = all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
    return _applied
