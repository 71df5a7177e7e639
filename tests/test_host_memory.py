"""`MOE_HOST_MEMORY=retain` keeps freed host memory in processes started as our programs, so
that XLA's fresh output buffers stop page-faulting every step; by default, and in processes
that only import the library, malloc is left alone."""

import json
import os
import subprocess
import sys

import pytest

from moe import host_memory

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
    kept = _run(FAULTS_PER_STEP, {"MOE_HOST_MEMORY": "retain"})
    system = _run(FAULTS_PER_STEP, {"MOE_HOST_MEMORY": "system"})
    assert kept.returncode == 0 and system.returncode == 0, kept.stderr + system.stderr
    kept_applied, kept_faults = kept.stdout.split()
    system_applied, system_faults = system.stdout.split()
    assert (kept_applied, system_applied) == ("True", "False")
    # The system allocator maps every page of every output afresh; retained memory none.
    assert float(system_faults) > 0.9 * pages
    assert float(kept_faults) < 0.05 * pages


@pytest.mark.slow  # two benchmark processes, ~35 s
@needs_glibc
def test_entry_points_retain_memory_on_request_and_say_so(tmp_path):
    """The layer benchmark records it in its JSON: off by default, on with `retain`."""
    args = ["moe.benchmarks.moe_layer", "--experts", "4", "--routers", "top1",
            "--dispatches", "index", "--batch", "2", "--length", "16", "--d_model", "8",
            "--d_ff", "16", "--group_size", "16", "--steps", "1", "--warmup", "1"]
    for choice, expected in (("", False), ("retain", True)):
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
    """Asked for, but in a process that only imports the entry points' modules (as the tests
    and notebooks do), not started as one: malloc keeps its settings."""
    code = ("import moe.start_up, moe.train\nfrom moe import host_memory\n"
            "print(host_memory.started_as_entry_point(), host_memory.retained())")
    result = _run(code, {"MOE_HOST_MEMORY": "retain"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_choices(monkeypatch):
    monkeypatch.delenv("MOE_HOST_MEMORY", raising=False)
    assert not host_memory.wanted()
    monkeypatch.setenv("MOE_HOST_MEMORY", "Retain")
    assert host_memory.wanted()
    monkeypatch.setenv("MOE_HOST_MEMORY", "system")
    assert not host_memory.wanted()
    monkeypatch.setenv("MOE_HOST_MEMORY", "always")
    with pytest.raises(ValueError, match=r"'system' .* 'retain'"):
        host_memory.wanted()
