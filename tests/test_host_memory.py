"""Freed host memory is kept in processes started as our programs on the CPU backend, so that
XLA's fresh output buffers stop page-faulting every step; nowhere else, and on request never."""

import json
import os
import subprocess
import sys

import pytest

from moe import accelerators, host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_glibc = pytest.mark.skipif(not host_memory.glibc_available(),
                                 reason="the settings are glibc malloc's (Linux)")

# Page faults per step of a program that writes a fresh 64 MiB output each call, measured
# after the heap has settled (the first ten or so calls map the pages it settles on).
FAULTS_PER_STEP = """
import resource, statistics, sys
from moe import host_memory
retained = host_memory.retain_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((2**24,), jnp.float32)  # 64 MiB: 16384 pages of 4 KiB
scale = jax.jit(lambda a: a * 1.0001)
faults = []
for _ in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = scale(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(retained, statistics.median(faults[-10:]))
"""


def _run(code_or_module, env_updates, module=False):
    env = {**os.environ, **env_updates}
    command = [sys.executable, "-m", *code_or_module] if module else [
        sys.executable, "-c", code_or_module]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@needs_glibc
def test_retained_memory_stops_the_page_faults_of_fresh_outputs():
    pages = 2**24 * 4 // 4096
    kept = _run(FAULTS_PER_STEP, {"MOE_HOST_MEMORY": "auto"})
    system = _run(FAULTS_PER_STEP, {"MOE_HOST_MEMORY": "system"})
    assert kept.returncode == 0 and system.returncode == 0, kept.stderr + system.stderr
    kept_applied, kept_faults = kept.stdout.split()
    system_applied, system_faults = system.stdout.split()
    assert (kept_applied, system_applied) == ("True", "False")
    # The system allocator maps every page of every output afresh; retained memory none.
    assert float(system_faults) > 0.9 * pages
    assert float(kept_faults) < 0.05 * pages


@needs_glibc
def test_entry_points_retain_memory_on_the_cpu_and_say_so(tmp_path):
    """The layer benchmark records it in its JSON; MOE_HOST_MEMORY=system turns it off."""
    args = ["moe.benchmarks.moe_layer", "--experts", "4", "--routers", "top1",
            "--dispatches", "index", "--batch", "2", "--length", "16", "--d_model", "8",
            "--d_ff", "16", "--group_size", "16", "--steps", "1", "--warmup", "1"]
    for choice, expected in (("auto", True), ("system", False)):
        out = tmp_path / f"{choice}.json"
        result = _run([*args, "--json", str(out)], {"MOE_HOST_MEMORY": choice}, module=True)
        assert result.returncode == 0, result.stderr
        assert json.loads(out.read_text())["meta"]["host_memory_retained"] is expected


def test_unknown_choice_exits_2_naming_the_choices():
    result = _run(["moe.train", "--help"], {"MOE_HOST_MEMORY": "forever"}, module=True)
    assert result.returncode == 2
    assert "MOE_HOST_MEMORY='forever'" in result.stderr
    assert "'system'" in result.stderr and "'retain'" in result.stderr


def test_importing_the_library_leaves_malloc_alone():
    """The test suite imports the entry points' modules: that is not starting them."""
    import moe.start_up  # noqa: F401

    assert not host_memory.started_as_entry_point()
    assert not host_memory.retained()


def test_which_backend_runs_is_read_from_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert accelerators.cpu_backend_expected()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not accelerators.cpu_backend_expected()
    monkeypatch.setenv("MOE_HOST_MEMORY", "auto")
    assert not host_memory.wanted()
    monkeypatch.setenv("MOE_HOST_MEMORY", "retain")
    assert host_memory.wanted()
    monkeypatch.setenv("MOE_HOST_MEMORY", "system")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not host_memory.wanted()
