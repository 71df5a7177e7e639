"""`MOE_HOST_MEMORY`: our programs restart with the host block cache preloaded (by default), so
that XLA's large per-step buffers stop page-faulting every step; the cache keeps malloc's
contract (zeroed calloc, realloc's contents, thread safety); `system`, and processes that only
import the library, leave malloc alone."""

import json
import os
import subprocess
import sys

import pytest

from moe import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_glibc = pytest.mark.skipif(not host_memory.glibc_available(),
                                 reason="the block cache interposes glibc's malloc (Linux)")

# Page faults per step of a program that writes a fresh 64 MiB output each call, after a few
# calls (the first ones map the blocks that are then reused).
FAULTS_PER_STEP = """
import resource, statistics
from moe import host_memory
import jax, jax.numpy as jnp
x = jnp.ones((2**24,), jnp.float32)  # 64 MiB: 16384 pages of 4 KiB
scale = jax.jit(lambda a: a * 1.0001)
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = scale(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(host_memory.retained(), statistics.median(faults[-10:]))
"""

# malloc's contract, on blocks the cache serves (>= 32 MiB) and hands out again.
CONTRACT = """
import ctypes, threading
import numpy as np
big = 40 << 20
a = np.empty(big, np.uint8)
a[:] = 7
address = a.ctypes.data
del a
b = np.zeros(big, np.uint8)  # calloc served by the block just freed: must read as zeros
assert b.ctypes.data == address, "the freed block was not reused"
assert not b.any(), "calloc returned a dirty block"
b[:] = 3
grown = bytearray(b.tobytes())
grown += bytes(10 << 20)  # realloc of a cached block to a larger one keeps its contents
assert grown[0] == 3 and grown[big - 1] == 3 and grown[big] == 0 and len(grown) == big + (10 << 20)
errors = []
def work(seed):
    for i in range(10):
        x = np.full((33 << 20) + seed * 4096 + i, seed, np.uint8)
        if not (x == seed).all():
            errors.append(seed)
threads = [threading.Thread(target=work, args=(s,)) for s in range(1, 5)]
[t.start() for t in threads]
[t.join() for t in threads]
assert not errors, errors
small = [bytes(1000) for _ in range(10000)]  # glibc still serves small blocks
stats = (ctypes.c_size_t * 4)()
ctypes.CDLL(None).moe_host_block_cache_stats(stats)
print(list(stats))
"""

# Past the idle limit, the blocks freed longest ago give their pages back, not the newest.
OLDEST_IDLE_FIRST = """
import ctypes
import numpy as np
library = ctypes.CDLL(None)
library.moe_host_block_cache_set_idle_limit(ctypes.c_size_t(100 << 20))
older = np.ones(64 << 20, np.uint8)
newer = np.ones(40 << 20, np.uint8)
del older  # idle: 64 MiB
del newer  # idle: 104 MiB, over the limit: the older block's pages go back
stats = (ctypes.c_size_t * 4)()
library.moe_host_block_cache_stats(stats)
again = np.ones(40 << 20, np.uint8)  # served by the resident newer block
reused = (ctypes.c_size_t * 4)()
library.moe_host_block_cache_stats(reused)
print(stats[2] >> 20, reused[3] - stats[3], reused[2])
"""


def _run(code_or_module, env_updates, module=False):
    env = {**os.environ, **env_updates}
    for key in [k for k, v in env.items() if v is None]:
        del env[key]
    command = [sys.executable, "-m", *code_or_module] if module else [
        sys.executable, "-c", code_or_module]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def library():
    path = host_memory._library()
    if path is None:
        pytest.skip("no C++ compiler to build the host block cache")
    return path


@needs_glibc
def test_the_block_cache_stops_the_page_faults_of_fresh_outputs(library):
    pages = 2**24 * 4 // 4096
    kept = _run(FAULTS_PER_STEP, {"LD_PRELOAD": library})
    system = _run(FAULTS_PER_STEP, {"LD_PRELOAD": None})
    assert kept.returncode == 0 and system.returncode == 0, kept.stderr + system.stderr
    kept_on, kept_faults = kept.stdout.split()
    system_on, system_faults = system.stdout.split()
    assert (kept_on, system_on) == ("True", "False")
    # The system allocator maps every page of every output afresh; the cache none.
    assert float(system_faults) > 0.9 * pages
    assert float(kept_faults) < 0.05 * pages


@needs_glibc
def test_the_block_cache_keeps_mallocs_contract(library):
    result = _run(CONTRACT, {"LD_PRELOAD": library})
    assert result.returncode == 0, result.stderr
    blocks, reserved, idle, reused = json.loads(result.stdout)
    assert blocks >= 2 and reserved >= blocks * (32 << 20) and reused > 0
    assert 0 < idle <= reserved  # freed blocks stay resident (well under the cap here)


@needs_glibc
def test_past_the_idle_limit_the_oldest_idle_blocks_give_their_pages_back(library):
    """A program that moves on to new shapes leaves idle blocks nothing asks for again; giving
    back the newest freed block instead would fault every later step's buffers afresh."""
    result = _run(OLDEST_IDLE_FIRST, {"LD_PRELOAD": library})
    assert result.returncode == 0, result.stderr
    idle_mib, reused, idle_after = map(int, result.stdout.split())
    assert idle_mib == 40  # the newer block stayed resident, the older one was trimmed
    assert reused == 1 and idle_after == 0


@pytest.mark.slow  # two benchmark processes, ~35 s
@needs_glibc
def test_entry_points_run_preloaded_by_default_and_say_so(tmp_path):
    """The layer benchmark records it in its JSON: on by default, off with `system`."""
    args = ["moe.benchmarks.moe_layer", "--experts", "4", "--routers", "top1",
            "--dispatches", "index", "--batch", "2", "--length", "16", "--d_model", "8",
            "--d_ff", "16", "--group_size", "16", "--steps", "1", "--warmup", "1"]
    for choice, expected in (("", True), ("system", False)):
        out = tmp_path / f"{choice}.json"
        result = _run([*args, "--json", str(out)], {"MOE_HOST_MEMORY": choice}, module=True)
        assert result.returncode == 0, result.stderr
        assert json.loads(out.read_text())["meta"]["host_memory_retained"] is expected


def test_start_restarts_the_process_with_the_library_preloaded(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    monkeypatch.delenv("MOE_HOST_MEMORY", raising=False)
    calls = []
    monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
    host_memory.start()
    if not host_memory.glibc_available():
        assert calls == []
        return
    ((executable, argv, environ),) = calls
    assert (executable, argv) == (sys.executable, sys.orig_argv)
    preload = environ["LD_PRELOAD"].split(":")
    assert preload[1:] == ["/opt/other.so"] and os.path.exists(preload[0])
    assert os.path.dirname(preload[0]) == str(tmp_path / "kernels")
    assert environ[host_memory.RESTARTED] == "1"


def test_start_does_not_restart_twice_or_when_asked_not_to(monkeypatch, capsys):
    monkeypatch.setattr(os, "execve", lambda *args: pytest.fail("restarted"))
    monkeypatch.setenv("MOE_HOST_MEMORY", "system")
    host_memory.start()
    monkeypatch.delenv("MOE_HOST_MEMORY")
    monkeypatch.setenv(host_memory.RESTARTED, "1")  # restarted, but the preload did not load
    host_memory.start()
    if host_memory.glibc_available():
        assert "did not load" in capsys.readouterr().err
    assert host_memory.RESTARTED not in os.environ


def test_a_failed_build_runs_on_the_system_allocator(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that always fails
    monkeypatch.delenv("MOE_HOST_MEMORY", raising=False)
    monkeypatch.setattr(os, "execve", lambda *args: pytest.fail("restarted"))
    host_memory.start()
    if host_memory.glibc_available():
        assert "could not be built" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.so"))  # nothing half-written kept


def test_the_restarted_process_hides_the_preload_from_its_children():
    environ = {"LD_PRELOAD": "/a/host_block_cache-0123.so:/opt/other.so",
               host_memory.RESTARTED: "1", "HOME": "/h"}
    host_memory._without_preload(environ)
    assert environ == {"LD_PRELOAD": "/opt/other.so", "HOME": "/h"}
    environ = {"LD_PRELOAD": "/a/host_block_cache-0123.so"}
    host_memory._without_preload(environ)
    assert environ == {}


def test_unknown_choice_exits_2_naming_the_choices():
    result = _run(["moe.train", "--help"], {"MOE_HOST_MEMORY": "forever"}, module=True)
    assert result.returncode == 2
    assert "MOE_HOST_MEMORY='forever'" in result.stderr
    assert "'system'" in result.stderr and "'retain'" in result.stderr


def test_importing_the_library_leaves_malloc_alone():
    """In a process that only imports the entry points' modules (as the tests and notebooks
    do), not started as one, nothing restarts and malloc stays glibc's."""
    code = ("import moe.start_up, moe.train\nfrom moe import host_memory\n"
            "print(host_memory.started_as_entry_point(), host_memory.retained())")
    result = _run(code, {"MOE_HOST_MEMORY": "retain", "LD_PRELOAD": None})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_choices(monkeypatch):
    monkeypatch.delenv("MOE_HOST_MEMORY", raising=False)
    assert host_memory.wanted()
    monkeypatch.setenv("MOE_HOST_MEMORY", "System")
    assert not host_memory.wanted()
    monkeypatch.setenv("MOE_HOST_MEMORY", "retain")
    assert host_memory.wanted()
    monkeypatch.setenv("MOE_HOST_MEMORY", "always")
    with pytest.raises(ValueError, match=r"'retain' .* 'system'"):
        host_memory.wanted()
