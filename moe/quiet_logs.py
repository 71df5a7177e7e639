"""Keep the entry points' output to the lines a user acts on.

Imported by `moe.start_up`, which every entry point (`moe.train`, `moe.eval`, `moe.infer`,
`moe.logits`, `moe.convert`, the benchmarks) imports first, before JAX or TensorFlow load.

What is silenced, and why none of it is actionable here:
- TensorFlow's start-up lines (oneDNN custom operations, "Could not find cuda drivers",
  "failed call to cuInit", the CPU-instructions notice, absl's "before InitializeLog" banner).
  TensorFlow only runs the input pipeline on the CPU: its GPU never matters, and its CPU
  kernels are fine as they are. These lines are printed by native code while TensorFlow
  loads and initializes its devices, where no log level reaches them, so TensorFlow is
  imported here, once, with the process's stderr (file descriptor 2) captured, and every
  other line it printed is written back.
- Later native INFO lines of TensorFlow and XLA: `TF_CPP_MIN_LOG_LEVEL` defaults to 1.
- Orbax's "Metadata file does not exist", printed for every step this codebase restores: its
  checkpoints are written without Orbax's optional step metadata file and restore the same.
  (seqio's notices are filtered where seqio is called: `seqio_tasks.sources`,
  `moe.evaluation`.)

- libtpu's start-up errors on a machine without a TPU ("could not determine TPU accelerator
  type", "unexpected worker hostname"): the `tpu` extra installs libtpu so that programs can
  be compiled for TPU slices ahead of time (`moe.plan`), and JAX then tries to open a TPU at
  start-up. Where no TPU device exists (no /dev/accel* or /dev/vfio/*) and no GPU plugin is
  installed, `JAX_PLATFORMS` defaults to `cpu`; compiling for a slice still works.

Settings the user made win: an environment variable already set is left alone, and
`TF_CPP_MIN_LOG_LEVEL=0` shows everything TensorFlow prints. `TF_ENABLE_ONEDNN_OPTS` is not
set: turning oneDNN off to drop its notice would change TensorFlow's CPU kernels.
"""

import contextlib
import glob
import importlib.util
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

from moe.log_filters import DropNoise

ENVIRONMENT_DEFAULTS = {"TF_CPP_MIN_LOG_LEVEL": "1"}

# Lines TensorFlow's native code prints while loading and initializing its devices.
NATIVE_START_UP_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|\] oneDNN custom operations are on"
    r"|\] Could not find cuda drivers on your machine"
    r"|\] failed call to cuInit"
    r"|\] This TensorFlow binary is optimized to use available CPU instructions"
    r"|^To enable the following instructions: .* rebuild TensorFlow with the appropriate"
)

# Python log messages (absl logger) that start with these are dropped.
PYTHON_LOG_NOISE = ("Metadata file does not exist",)


def apply_environment_defaults() -> None:
    """Set `ENVIRONMENT_DEFAULTS` where the user has not set the variable."""
    for name, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def _no_tpu_here() -> bool:
    """libtpu is installed, but this machine has no TPU and JAX has no GPU plugin."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return False
    gpu_plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                   "jax_rocm7_plugin")
    return all(importlib.util.find_spec(name) is None for name in gpu_plugins)


def keep_jax_off_absent_tpu() -> None:
    """JAX_PLATFORMS=cpu where libtpu is installed without a TPU (see the module doc)."""
    if "JAX_PLATFORMS" not in os.environ and _no_tpu_here():
        os.environ["JAX_PLATFORMS"] = "cpu"


def filter_python_noise() -> None:
    """Install `DropNoise` on the absl logger (Orbax logs through absl), once."""
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, DropNoise) for f in absl_logger.filters):
        absl_logger.addFilter(DropNoise(PYTHON_LOG_NOISE))


@contextlib.contextmanager
def native_stderr_without(noise: re.Pattern[str]) -> Iterator[None]:
    """Capture file descriptor 2 (where native code writes) for the block, then write back
    every captured line that `noise` does not match."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not noise.search(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def load_tensorflow_quietly() -> None:
    """Import TensorFlow and let it look for devices with its start-up lines filtered.

    Every entry point imports TensorFlow anyway (seqio, the data pipeline), so this only
    moves the import earlier.
    """
    with native_stderr_without(NATIVE_START_UP_NOISE):
        import tensorflow as tf

        tf.config.list_physical_devices()  # where the cuInit failure is printed


def quiet_start_up() -> None:
    """Everything above; `TF_CPP_MIN_LOG_LEVEL=0` keeps TensorFlow's lines."""
    apply_environment_defaults()
    keep_jax_off_absent_tpu()
    filter_python_noise()
    if (os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "0" and "tensorflow" not in sys.modules
            and importlib.util.find_spec("tensorflow") is not None):  # benchmarks run without
        load_tensorflow_quietly()


quiet_start_up()

__all__ = [
    "ENVIRONMENT_DEFAULTS",
    "NATIVE_START_UP_NOISE",
    "PYTHON_LOG_NOISE",
    "DropNoise",
    "apply_environment_defaults",
    "filter_python_noise",
    "keep_jax_off_absent_tpu",
    "load_tensorflow_quietly",
    "native_stderr_without",
    "quiet_start_up",
]
