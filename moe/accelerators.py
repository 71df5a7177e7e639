"""Whether JAX could find an accelerator here, judged before JAX loads.

Start-up settings that depend on the backend (`moe.quiet_logs`, `moe.host_memory`) must be
made before JAX or TensorFlow start their threads, so they cannot ask JAX. They look at what
JAX itself would look for: TPU device files, and an installed GPU plugin.
"""

import glob
import importlib.util
import os

GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def tpu_device_present() -> bool:
    """A TPU VM exposes its chips as /dev/accel* (v2-v4) or /dev/vfio/<n> (v5 and later)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def gpu_plugin_installed() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in GPU_PLUGINS)


def cpu_backend_expected() -> bool:
    """JAX will run on the CPU: `JAX_PLATFORMS` names cpu first, or, unset, this machine has
    no TPU device and JAX no GPU plugin."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not tpu_device_present() and not gpu_plugin_installed()
