"""TPU tests compile for a TPU v4 slice ahead of time; they need libtpu (the `tpu` extra)."""

import pytest

from moe import tpu_topology

requires_libtpu = pytest.mark.skipif(
    not tpu_topology.tpu_compiler_available(),
    reason="libtpu is not installed: pip install -e '.[tpu]' (CI installs it)",
)
