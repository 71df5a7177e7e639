"""Joining a multi-host JAX cluster: process discovery, `jax.distributed.initialize`, failures.

Every host of a multi-host run executes the same program; `jax.distributed.initialize` joins
them into one runtime whose `jax.devices()` lists the devices of all hosts, so the
partitioner's mesh spans the whole cluster. Where the cluster comes from, first match wins:

1. flags `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`;
2. the environment `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (what
   `python -m moe.local_cluster` and most schedulers set);
3. a Cloud TPU VM (`/dev/accel*`, `/dev/vfio/*`, or `TPU_WORKER_ID` in the environment):
   `jax.distributed.initialize()` with no arguments, which reads the pod slice's workers from
   the TPU metadata. This is why TPU pod runs need no flags;
4. otherwise one process, nothing to join.

On CPU the processes exchange collectives over gloo (TCP), so several processes on one
machine form a real cluster: this is how the multi-host paths are tested here.

A cluster must not hang forever when a process is missing or dies. Two bounds apply:
`initialization_timeout` (a peer that never arrives: every process fails after it), and
`heartbeat_timeout` (a peer that stops: the coordination service declares it dead and the
surviving processes terminate with "the JAX distributed service detected fatal errors").
Both are flags here, with the environment variables `MOE_DISTRIBUTED_INIT_TIMEOUT` and
`MOE_DISTRIBUTED_HEARTBEAT_TIMEOUT` as fallbacks.

`initialize` must run before anything touches a JAX backend (`jax.devices()`, any array):
afterwards JAX refuses to join a cluster.
"""

import argparse
import dataclasses
import glob
import logging
import os
import sys
from collections.abc import Mapping

import jax
import numpy as np

from moe.errors import ConfigurationError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_INIT_TIMEOUT = "MOE_DISTRIBUTED_INIT_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "MOE_DISTRIBUTED_HEARTBEAT_TIMEOUT"

DEFAULT_INIT_TIMEOUT = 300
DEFAULT_HEARTBEAT_TIMEOUT = 100


class ClusterConfigError(ConfigurationError):
    """The multi-host settings are incomplete or inconsistent."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How this process joins its cluster.

    `mode`: 'single' (one process, no cluster), 'explicit' (coordinator, count and index
    given) or 'tpu' (JAX discovers the pod slice's workers itself).
    """

    mode: str
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0
    initialization_timeout: int = DEFAULT_INIT_TIMEOUT
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """The multi-host flags of every entry point (all optional: see the module doc)."""
    group = parser.add_argument_group("multi-host (optional; TPU pod slices need none)")
    group.add_argument("--coordinator_address", default=None,
                       help=f"HOST:PORT of process 0 (env {ENV_COORDINATOR}).")
    group.add_argument("--num_processes", type=int, default=None,
                       help=f"Number of processes in the cluster (env {ENV_NUM_PROCESSES}).")
    group.add_argument("--process_id", type=int, default=None,
                       help=f"This process's index, 0..N-1 (env {ENV_PROCESS_ID}).")
    group.add_argument("--multihost", choices=("auto", "off"), default="auto",
                       help="'off' ignores the environment and any TPU pod: run one process.")
    group.add_argument("--distributed_init_timeout", type=int, default=None,
                       help="Seconds to wait for every process to join before failing "
                            f"(env {ENV_INIT_TIMEOUT}, default {DEFAULT_INIT_TIMEOUT}).")
    group.add_argument("--distributed_heartbeat_timeout", type=int, default=None,
                       help="Seconds without a heartbeat after which a process is declared "
                            "dead and the others stop "
                            f"(env {ENV_HEARTBEAT_TIMEOUT}, default {DEFAULT_HEARTBEAT_TIMEOUT}).")


def on_tpu_vm(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this machine is a Cloud TPU VM (TPU device files or the TPU runtime's env)."""
    environ = os.environ if environ is None else environ
    if environ.get("TPU_WORKER_ID") is not None:
        return True
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _int_setting(name: str, flag_value: int | None, environ: Mapping[str, str],
                 env_name: str) -> int | None:
    if flag_value is not None:
        return flag_value
    raw = environ.get(env_name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ClusterConfigError(
            f"{env_name}={raw!r} is not an integer; set it to a whole number or unset it "
            f"(it gives --{name})."
        ) from None


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterConfigError(
            f"Coordinator address {address!r} must be HOST:PORT with a port in 1..65535, "
            "for example 127.0.0.1:12355 (the address of process 0)."
        )


def resolve_cluster(args: argparse.Namespace | None = None,
                    environ: Mapping[str, str] | None = None,
                    tpu_vm: bool | None = None) -> ClusterSpec:
    """The `ClusterSpec` from flags (`args`), else the environment, else the TPU VM, else one.

    Raises `ClusterConfigError` for partial or inconsistent settings, naming the fix.
    """
    environ = os.environ if environ is None else environ
    get = lambda name: getattr(args, name, None) if args is not None else None
    init_timeout = _int_setting("distributed_init_timeout", get("distributed_init_timeout"),
                                environ, ENV_INIT_TIMEOUT)
    heartbeat = _int_setting("distributed_heartbeat_timeout",
                             get("distributed_heartbeat_timeout"), environ, ENV_HEARTBEAT_TIMEOUT)
    timeouts = {
        "initialization_timeout": DEFAULT_INIT_TIMEOUT if init_timeout is None else init_timeout,
        "heartbeat_timeout": DEFAULT_HEARTBEAT_TIMEOUT if heartbeat is None else heartbeat,
    }
    for name, value in timeouts.items():
        if value <= 0:
            raise ClusterConfigError(f"The distributed {name} must be > 0 seconds, got {value}.")
    if get("multihost") == "off":
        return ClusterSpec("single", **timeouts)

    address = get("coordinator_address") or environ.get(ENV_COORDINATOR, "").strip() or None
    num = _int_setting("num_processes", get("num_processes"), environ, ENV_NUM_PROCESSES)
    pid = _int_setting("process_id", get("process_id"), environ, ENV_PROCESS_ID)

    if address is None and num is None and pid is None:
        if on_tpu_vm(environ) if tpu_vm is None else tpu_vm:
            return ClusterSpec("tpu", **timeouts)
        return ClusterSpec("single", **timeouts)
    if num is not None and num < 1:
        raise ClusterConfigError(f"--num_processes must be >= 1, got {num}.")
    if num == 1 and address is None:
        if pid not in (None, 0):
            raise ClusterConfigError(f"--process_id={pid} with one process: it must be 0.")
        return ClusterSpec("single", **timeouts)
    missing = [flag for flag, value in (("--coordinator_address", address),
                                        ("--num_processes", num),
                                        ("--process_id", pid)) if value is None]
    if missing:
        raise ClusterConfigError(
            f"Multi-host settings are incomplete: {', '.join(missing)} missing (flags, or the "
            f"environment {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}). Give all "
            "three, e.g. --coordinator_address=10.0.0.2:12355 --num_processes=2 --process_id=0, "
            "or none of them for a single process (or a TPU VM)."
        )
    _check_address(address)
    if not 0 <= pid < num:
        raise ClusterConfigError(
            f"--process_id={pid} is outside 0..{num - 1} for --num_processes={num}."
        )
    return ClusterSpec("explicit", address, num, pid, **timeouts)


def initialize(spec: ClusterSpec) -> None:
    """Join the cluster of `spec` (no-op for 'single'). Call before any JAX computation."""
    if spec.mode == "single":
        return
    if jax.distributed.is_initialized():
        return
    # CPU processes exchange collectives over gloo (TCP); harmless on TPU/GPU hosts, whose
    # CPU backend is not used for the model.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    common = {
        "initialization_timeout": spec.initialization_timeout,
        "heartbeat_timeout_seconds": spec.heartbeat_timeout,
    }
    where = (f"{spec.num_processes} processes at {spec.coordinator_address} as process "
             f"{spec.process_id}" if spec.mode == "explicit" else "the TPU pod slice's workers")
    print(f"Joining a cluster of {where} (waiting up to {spec.initialization_timeout}s for all "
          "processes to join).", file=sys.stderr, flush=True)
    if spec.mode == "tpu":
        jax.distributed.initialize(**common)
    else:
        jax.distributed.initialize(
            coordinator_address=spec.coordinator_address,
            num_processes=spec.num_processes,
            process_id=spec.process_id,
            **common,
        )
    _explain_peer_failures(spec)
    logging.info("Joined a cluster of %d processes as process %d (%d local devices).",
                 jax.process_count(), jax.process_index(), jax.local_device_count())


# Words in the runtime's errors when a collective or the coordination service lost a peer.
PEER_FAILURE_MARKERS = ("Gloo", "Connection reset", "Connection closed", "coordination service",
                        "Barrier", "heartbeat", "DEADLINE_EXCEEDED")


def peer_failure_message(error: BaseException, heartbeat_timeout: int) -> str | None:
    """A plain explanation when `error` looks like a lost peer process, else None."""
    text = str(error)
    if not any(marker in text for marker in PEER_FAILURE_MARKERS):
        return None
    first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return (
        f"error: process {jax.process_index()} of {jax.process_count()}: an operation across "
        f"processes failed ({first_line[:300]}). Another process most likely died or was "
        "stopped: see its log for the cause. This process stops too; the cluster's "
        f"coordination service confirms the failure within {heartbeat_timeout}s (heartbeat "
        "timeout). Rerun the job to resume from the latest checkpoint."
    )


def _explain_peer_failures(spec: ClusterSpec) -> None:
    """After an uncaught runtime error that looks like a lost peer, say so in plain words."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        if isinstance(exc, jax.errors.JaxRuntimeError):
            message = peer_failure_message(exc, spec.heartbeat_timeout)
            if message:
                print(message, file=sys.stderr, flush=True)

    sys.excepthook = hook


def initialize_distributed(args: argparse.Namespace | None = None) -> ClusterSpec:
    """Resolve the cluster from `args` and the environment and join it; returns the spec."""
    spec = resolve_cluster(args)
    initialize(spec)
    return spec


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process; every process gets the same answer.

    For decisions that must be taken at the same step everywhere (stop on SIGTERM: a process
    that stops while the others run the next step leaves them waiting in a collective). One
    small all-gather per call with several processes; free with one.
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(bool(flag)))))


def describe_cluster() -> str:
    """One line for logs: processes, this process, local and global device counts."""
    return (f"process {jax.process_index()} of {jax.process_count()}, "
            f"{jax.local_device_count()} local / {jax.device_count()} global "
            f"{jax.devices()[0].platform} devices")


__all__ = [
    "ClusterConfigError",
    "ClusterSpec",
    "add_distributed_flags",
    "any_process",
    "describe_cluster",
    "initialize",
    "initialize_distributed",
    "on_tpu_vm",
    "peer_failure_message",
    "resolve_cluster",
]
