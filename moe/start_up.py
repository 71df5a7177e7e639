"""What every entry point does first, before JAX or TensorFlow load:

    import moe.start_up  # noqa: F401 - first: before JAX and TensorFlow load

1. `moe.host_memory`: unless `MOE_HOST_MEMORY=system`, restart the process with a malloc
   that keeps large freed blocks mapped, so that XLA's large per-step buffers do not
   page-fault every step (a preload: it must precede everything else).
2. `moe.quiet_logs`: TensorFlow's start-up lines filtered, and `JAX_PLATFORMS=cpu` where
   libtpu is installed without a TPU.

An unknown `MOE_HOST_MEMORY` exits with status 2, naming the choices.
"""

import sys

from moe import host_memory

try:
    if host_memory.started_as_entry_point():
        host_memory.start()
except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2) from None

import moe.quiet_logs  # noqa: F401 - second: loads TensorFlow with its lines filtered
