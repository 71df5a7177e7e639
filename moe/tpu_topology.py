"""TPU v4 slices without a TPU: their devices for ahead-of-time compilation, and chip figures.

JAX compiles for a TPU topology on a machine without one when libtpu is installed
(`pip install -e .[tpu]`): `jax.experimental.topologies.get_topology_desc` returns the
slice's devices, and `jax.jit(f).lower(abstract args with shardings).compile()` gives the TPU
executable with its memory and cost analyses. That is how `moe.plan` and the TPU tests check
what the TPU compiler makes of our programs.

A slice is named as Cloud TPU names it, `v4-N` with N TensorCores: N/2 chips, 4 chips per
host. Each chip is one JAX device (its two TensorCores run as one "megacore"), which is what
the topology's `chip_config_name='megacore'` gives.
"""

import dataclasses
import functools
import os
import re
from collections.abc import Sequence

import jax

from moe.errors import ConfigurationError


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Published per-chip figures used by the roofline estimate (Cloud TPU v4 documentation)."""

    name: str
    hbm_bytes: int
    usable_hbm_bytes: int  # what the TPU compiler lets a program use (it reserves the rest)
    peak_bf16_flops: float  # per second
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # the pod's all-reduce bandwidth divided by its chips

    def describe(self) -> str:
        return (f"{self.name}: {self.hbm_bytes / 2**30:.0f} GiB HBM "
                f"({self.usable_hbm_bytes / 2**30:.2f} GiB usable by a program), "
                f"{self.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, "
                f"{self.hbm_bytes_per_s / 1e9:.0f} GB/s HBM, "
                f"{self.ici_bytes_per_s / 1e9:.0f} GB/s ICI per chip")


# 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s; a 4096-chip pod's all-reduce bandwidth is
# 1.1 PB/s, about 270 GB/s per chip. libtpu 0.0.42.1 lets a program use 30.75 GiB of the 32
# ("exceeds available HBM (30.75G)" in its out-of-memory errors).
TPU_V4 = ChipSpec("TPU v4", 32 * 2**30, int(30.75 * 2**30), 275e12, 1.2e12, 1.1e15 / 4096)

# Chips -> the slice's 3D shape (Cloud TPU's v4 topologies).
_V4_SHAPES = {
    4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
    256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16),
}
CHIPS_PER_HOST = 4


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A v4 slice: `name` (v4-N), its chips (= JAX devices), hosts and 3D shape."""

    name: str
    chips: int
    shape: tuple[int, int, int]
    chip: ChipSpec = TPU_V4

    @property
    def hosts(self) -> int:
        return max(1, self.chips // CHIPS_PER_HOST)

    @property
    def topology_name(self) -> str:
        return "v4:" + "x".join(map(str, self.shape))


def known_slices() -> list[str]:
    return [f"v4-{2 * chips}" for chips in _V4_SHAPES]


def parse_slice(name: str) -> TpuSlice:
    """'v4-32' -> TpuSlice(16 chips, 2x2x4); anything else is a ConfigurationError."""
    match = re.fullmatch(r"v4-(\d+)", name.strip())
    chips = int(match.group(1)) // 2 if match else 0
    if not match or chips not in _V4_SHAPES or int(match.group(1)) % 2:
        raise ConfigurationError(
            f"Unknown TPU slice {name!r}; --topology takes a TPU v4 slice name (TensorCores), "
            f"one of {known_slices()}."
        )
    return TpuSlice(name.strip(), chips, _V4_SHAPES[chips])


def _prepare_libtpu(tpu_slice: TpuSlice) -> None:
    """Environment libtpu reads when it loads on a machine that is not a TPU VM: the
    accelerator type and a worker list (else it logs errors while looking for the slice's
    hosts), and permission for several processes (test workers) to load it at once."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", tpu_slice.name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def tpu_compiler_available() -> bool:
    """Whether libtpu is installed (the `tpu` extra), i.e. TPU programs can be compiled here."""
    try:
        from jax._src import xla_bridge

        return xla_bridge.get_tpu_library_path() is not None
    except Exception:  # any failure means: not available
        return False


@functools.cache
def slice_devices(name: str) -> Sequence[jax.Device]:
    """The devices of slice `name` for ahead-of-time compilation (one per chip).

    Raises a ConfigurationError naming the fix when libtpu is not installed.
    """
    tpu_slice = parse_slice(name)
    if not tpu_compiler_available():
        raise ConfigurationError(
            "Compiling for a TPU slice needs libtpu, which is not installed; install the TPU "
            "extra: pip install -e '.[tpu]' (jax[tpu] at the pinned JAX version)."
        )
    _prepare_libtpu(tpu_slice)
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(
        topology_name=tpu_slice.topology_name, platform="tpu", chip_config_name="megacore"
    )
    devices = list(topology.devices)
    if len(devices) != tpu_slice.chips:
        raise RuntimeError(
            f"libtpu gave {len(devices)} devices for {tpu_slice.topology_name}; expected "
            f"{tpu_slice.chips} (one per chip)."
        )
    return devices
