"""Test set-up: 8 emulated CPU devices, configured before JAX is imported anywhere.

bfloat16 intermediates are rounded as the program writes them (no excess precision inside
XLA fusions), as `python -m moe.logits` runs, so that parity tests against other codebases'
bfloat16 outputs can be exact.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_allow_excess_precision=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# No test writes to the persistent compilation cache in ~/.cache/moe: the tests of
# moe.compilation_cache turn it on in directories of their own.
os.environ.setdefault("MOE_COMPILATION_CACHE_DIR", "off")

import gin  # after the environment above (nothing here may import JAX first)
import pytest


@pytest.fixture
def clean_gin():
    """Start and end with an empty gin configuration (for tests that parse gin files)."""
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def local_cwd(tmp_path, monkeypatch):
    """An empty working directory: a URL written as a local path would land in it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd
