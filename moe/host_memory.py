"""`MOE_HOST_MEMORY`: large host buffers kept mapped between steps, in our programs on Linux.

Why: XLA:CPU allocates every step's outputs and temporaries with malloc and frees them when the
step ends. glibc serves each block above 32 MiB with its own mmap and unmaps it on free, so the
next step writes into fresh pages: one page fault per 4 KiB, each page zeroed by the kernel. On
a 2-core machine writing a fresh 512 MiB buffer cost 136 ms against 26 ms for the same write in
place (`moe.benchmarks.moe_layer` measures both). A MoE layer's weight gradients are such
buffers: at 128 experts of 512 x 2048, 1 GiB of them every step.

What `retain` (the default) does: the program runs with `moe/kernels/host_block_cache.cc`
preloaded, a malloc interposer that keeps freed blocks of 32 MiB and more mapped and hands them
to the next request of their size (up to twice as large), in 2 MiB grains with transparent huge
pages asked for. Smaller requests go to glibc unchanged, per-thread arenas included, so small
allocations take no new lock. Idle blocks stay resident up to a quarter of physical memory;
past that the pages of the blocks freed longest ago go back to the system.

How: a malloc must be in place before the program starts, so `moe.start_up` builds the library
(once per machine, `moe.native_build`, about a second) and re-executes the process with
`LD_PRELOAD` naming it: the same pid and arguments, before JAX or TensorFlow load. The restarted
process takes the variable out of `os.environ`, so programs it starts (compilers, workers) start
plain; ours preload it for themselves.

Measured on 2 cores (float32), with the system allocator -> retained:
- layer benchmark, top-1 index dispatch, 4096 tokens, d_model 512, d_ff 2048: 0.74x -> 0.96x
  the dense FFN at 32 experts, 0.42x -> 0.63-0.72x at 128 (597 -> 373 ms);
- the quickstart: 11.0 -> 14.6 steps/s (its logits, [16, 64, 32128] float32, are such blocks).
An earlier form, glibc's `mallopt` with one arena, gained less in the layer (0.84-0.93x at 32
experts) and cost the quickstart 20%: one arena serializes every thread's malloc.

`MOE_HOST_MEMORY=system` leaves malloc alone. Without glibc, a C++ compiler or a successful
build, the program runs on the system allocator and says why once. Processes that only import
the library (a notebook, the test suite) are never restarted.
"""

import ctypes
import os
import platform
import sys
from collections.abc import MutableMapping

ENVIRONMENT_VARIABLE = "MOE_HOST_MEMORY"
CHOICES = ("retain", "system")
LIBRARY = "host_block_cache"
FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-w")
# Set for the restarted process: a restart whose preload did not take must not restart again.
RESTARTED = "_MOE_HOST_MEMORY_RESTARTED"


def wanted() -> bool:
    """`MOE_HOST_MEMORY` asks for retained memory (the default); a ValueError names the
    choices for an unknown value."""
    choice = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower() or "retain"
    if choice not in CHOICES:
        raise ValueError(
            f"{ENVIRONMENT_VARIABLE}={os.environ[ENVIRONMENT_VARIABLE]!r} is not one of "
            f"{list(CHOICES)}: 'retain' (the default) keeps large freed blocks mapped for the "
            "next step, 'system' keeps glibc's malloc (see moe/host_memory.py)."
        )
    return choice == "retain"


def started_as_entry_point() -> bool:
    """The process runs one of this package's modules as `__main__` (`python -m moe....`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name.split(".")[0] == "moe"


def glibc_available() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def retained() -> bool:
    """Whether this process runs with the block cache preloaded and serving (its address
    range reserved, or not yet needed)."""
    active = getattr(ctypes.CDLL(None), "moe_host_block_cache_active", None)
    return active is not None and bool(active())


def _say(message: str) -> None:
    print(f"moe.host_memory: {message}", file=sys.stderr, flush=True)


def _library() -> str | None:
    """The built library's path, or None (said on stderr) without a compiler or on a failed
    build."""
    from moe import native_build  # jax-free, like this module

    try:
        return str(native_build.build(LIBRARY, FLAGS))
    except native_build.BuildError as error:
        _say(f"the host block cache could not be built, running on the system allocator "
             f"(MOE_HOST_MEMORY=system silences this): {error}")
        return None


def _without_preload(environ: MutableMapping[str, str]) -> None:
    """Take the block cache (and the restart mark) out of `environ`, for children."""
    environ.pop(RESTARTED, None)
    kept = [p for p in environ.get("LD_PRELOAD", "").split(":")
            if p and not os.path.basename(p).startswith(LIBRARY + "-")]
    if kept:
        environ["LD_PRELOAD"] = ":".join(kept)
    else:
        environ.pop("LD_PRELOAD", None)


def start() -> None:
    """`moe.start_up`'s first step in our programs: restart preloaded when `wanted()` and not
    preloaded yet. Returns in the process that runs the program (this one, or the restart)."""
    if retained():
        _without_preload(os.environ)
        return
    if not glibc_available() or not wanted():
        return
    if os.environ.pop(RESTARTED, None):
        _say("restarted with the host block cache preloaded, but it did not load; running on "
             "the system allocator.")
        return
    library = _library()
    if library is None:
        return
    environ = dict(os.environ)
    environ["LD_PRELOAD"] = ":".join(p for p in (library, environ.get("LD_PRELOAD")) if p)
    environ[RESTARTED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)
