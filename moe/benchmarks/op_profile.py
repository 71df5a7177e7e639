"""Where a layer step's device time goes: per-HLO-op totals of the layer benchmark's step.

    python -m moe.benchmarks.op_profile [--configs dense,top1:index:8,top1:dropless:64]
        [--json OUT] [--hlo_dir DIR] [--top 25]

A step time (`moe.benchmarks.moe_layer`, `moe.benchmarks.gpu_check`) says how long a
forward+backward takes, not which of its kernels to work on. This builds the same jitted
`value_and_grad` step per config, compiles it once, runs warm-up steps, times `--steps` steps
(median wall time per step), then traces `--steps` more with `jax.profiler.trace` and sums the
trace's events per HLO op (the events' `hlo_op` stat), per step.

A config is `dense` (the benchmark's dense FFN) or `router:dispatch:experts`, a router of
`moe.benchmarks.moe_layer.router_specs` (capacity factor 1), e.g. `top1:index:8` or
`top2:dropless:64`. Per config it prints the wall time per step, the busy time per step (the
sum over ops) and the `--top` ops: time per step, share of the busy time, calls per step.
`--json` writes every op of every config; `--hlo_dir` writes each config's optimized HLO
(`compiled.as_text()`), where the fusions the ops name are spelled out.

What the sums mean depends on the backend:

* GPU: the events on the `/device:GPU*` planes, keyed by HLO op and kernel name (under
  command buffers the HLO op is the buffer, the kernel name says what ran). These are kernel
  times on the device's streams; the gap between the wall time and the busy time is launch and
  host overhead.
* CPU: the host-plane events that carry an `hlo_op` stat, one per thunk. A `while` thunk's
  event encloses its body's, so every op counts its self time (its duration less that of the
  op events nested in it on the same thread). Events of several threads overlap, so the sums
  can exceed the wall time.
"""

import moe.start_up  # noqa: F401, I001 - first: before JAX and TensorFlow load

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from moe.benchmarks.flags import positive_int
from moe.benchmarks.moe_layer import (
    dense_objective_and_params,
    moe_objective_and_params,
    router_specs,
)
from moe.moe_layer import MoeLayer
from moe.routing.interface import DISPATCHES

WARMUP = 2  # untimed steps after compiling: the first runs allocate and autotune
DEFAULT_CONFIGS = "dense,top1:index:8,top1:dropless:8,top1:dropless:64"
GPU_PLANE_PREFIX = "/device:GPU"


class Config(NamedTuple):
    """One profiled step: the dense FFN (router None) or an MoE layer."""

    text: str
    router: str | None = None
    dispatch: str | None = None
    experts: int | None = None


def parse_config(text: str) -> Config:
    """`dense` or `router:dispatch:experts`; a ValueError names the bad part and the choices,
    before anything is compiled."""
    if text == "dense":
        return Config(text)
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"config {text!r}: expected 'dense' or router:dispatch:experts, "
                         "e.g. top1:index:8")
    router, dispatch, experts = parts
    specs = router_specs(1.0)
    if router not in specs:
        raise ValueError(f"config {text!r}: unknown router {router!r}; choose from "
                         f"{', '.join(specs)}")
    if dispatch not in DISPATCHES:
        raise ValueError(f"config {text!r}: unknown dispatch {dispatch!r}; choose from "
                         f"{', '.join(DISPATCHES)}")
    supported = specs[router].dispatches
    if dispatch not in supported:
        raise ValueError(f"config {text!r}: router {router!r} has no {dispatch!r} dispatch; "
                         f"choose from {', '.join(supported)}")
    try:
        num_experts = int(experts)
    except ValueError:
        num_experts = 0
    if num_experts < 1:
        raise ValueError(f"config {text!r}: experts {experts!r} is not a positive integer")
    return Config(text, router, dispatch, num_experts)


def _configs(value: str) -> list[Config]:
    """argparse type of --configs: a comma-separated list of configs."""
    try:
        return [parse_config(text) for text in value.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_step(config: Config, args: argparse.Namespace,
               x: jax.Array) -> tuple[Callable, Any]:
    """(jitted value_and_grad step, parameters): the step `moe.benchmarks.moe_layer` times,
    with respect to the parameters and the input."""
    param_dtype = jnp.dtype(args.param_dtype)
    if config.router is None:
        objective, params = dense_objective_and_params(args.d_ff, args.activation, x,
                                                       param_dtype)
    else:
        spec = router_specs(1.0, args.group_size, config.experts)[config.router]
        layer = MoeLayer(config.experts, args.d_ff, router=spec, activation=args.activation,
                         dispatch=config.dispatch, max_group_size=args.group_size,
                         dtype=x.dtype, param_dtype=param_dtype)
        objective, params = moe_objective_and_params(layer, x)
    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1))), params


def wall_times(step: Callable, args: tuple, steps: int) -> list[float]:
    """Seconds per step, each step waited for (after `WARMUP` untimed steps)."""
    for _ in range(WARMUP):
        jax.block_until_ready(step(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - start)
    return times


def trace(step: Callable, args: tuple, steps: int) -> jax.profiler.ProfileData:
    """The profile of `steps` steps. The Python tracer is off: it would record this loop,
    not the program, and enlarge the trace."""
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    with tempfile.TemporaryDirectory(prefix="op_profile_") as log_dir:
        with jax.profiler.trace(log_dir, profiler_options=options):
            for _ in range(steps):
                jax.block_until_ready(step(*args))
        (path,) = Path(log_dir).rglob("*.xplane.pb")
        return jax.profiler.ProfileData.from_file(str(path))


class OpEvent(NamedTuple):
    """One event of the trace: its HLO op (None on GPU events without one), its name (the
    kernel on a GPU) and the nanoseconds it counts for."""

    hlo_op: str | None
    name: str
    ns: float


def _stats(event: Any) -> dict[str, Any]:
    with warnings.catch_warnings():
        # The stats' nanobind type warns, once, that it has no __module__.
        warnings.filterwarnings("ignore", message="builtin type", category=DeprecationWarning)
        return dict(event.stats)


def op_events(profile: jax.profiler.ProfileData) -> Iterator[OpEvent]:
    """The events that make up the step's device time (see the module docstring): on a GPU
    every event of its device planes, else the host events that carry an HLO op. Each
    counts its self time: on a GPU stream kernels do not nest, on CPU a `while` thunk's
    event encloses its body's."""
    planes = [p for p in profile.planes if p.name.startswith(GPU_PLANE_PREFIX)]
    on_device = bool(planes)
    for plane in planes or profile.planes:
        for line in plane.lines:
            events = []
            for event in line.events:
                op = _stats(event).get("hlo_op")
                if on_device or op is not None:
                    events.append((event.start_ns, event.duration_ns, op, event.name))
            yield from _self_times(events)


def _self_times(events: Iterable[tuple[float, float, str | None, str]]) -> Iterator[OpEvent]:
    """(start, duration, hlo_op, name) events of one thread or stream with the time of the
    events nested in each taken off it, so that nested events are not counted twice."""
    ordered = sorted(events, key=lambda e: (e[0], -e[1]))  # an enclosing event first
    self_ns = [duration for _, duration, _, _ in ordered]
    stack: list[int] = []  # indices of the events enclosing the current one
    for i, (start, duration, _, _) in enumerate(ordered):
        while stack and ordered[stack[-1]][0] + ordered[stack[-1]][1] <= start:
            stack.pop()
        if stack:
            parent_start, parent_duration = ordered[stack[-1]][:2]
            self_ns[stack[-1]] -= min(start + duration, parent_start + parent_duration) - start
        stack.append(i)
    for (_, _, op, name), ns in zip(ordered, self_ns, strict=True):
        yield OpEvent(op, name, max(ns, 0.0))


def op_totals(events: Iterable[OpEvent], steps: int) -> dict[str, Any]:
    """Busy time and per-op totals per step, the longest op first."""
    ns: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for event in events:
        ns[event.hlo_op, event.name] += event.ns
        calls[event.hlo_op, event.name] += 1
    busy_us = sum(ns.values()) / steps / 1e3
    ops = [
        {"hlo_op": op, "name": name, "us": total / steps / 1e3,
         "share": total / steps / 1e3 / busy_us if busy_us else 0.0,
         "calls": calls[op, name] / steps}
        for (op, name), total in sorted(ns.items(), key=lambda kv: (-kv[1], str(kv[0])))
    ]
    return {"busy_us": busy_us, "ops": ops}


def profile_config(config: Config, args: argparse.Namespace, x: jax.Array) -> dict[str, Any]:
    """Compile, time and trace one config's step; write its HLO to `args.hlo_dir`."""
    step, params = build_step(config, args, x)
    start = time.perf_counter()
    compiled = step.lower(params, x).compile()
    result: dict[str, Any] = {"compile_s": time.perf_counter() - start}
    if args.hlo_dir:
        path = args.hlo_dir / f"{config.text.replace(':', '_')}.hlo.txt"
        path.write_text(compiled.as_text())
        result["hlo_file"] = str(path)
    times = wall_times(compiled, (params, x), args.steps)
    result["wall_ms"] = statistics.median(times) * 1e3
    result["wall_ms_each"] = [t * 1e3 for t in times]
    profile = trace(compiled, (params, x), args.steps)
    return {**result, **op_totals(op_events(profile), args.steps)}


def _op_label(op: dict[str, Any], width: int = 90) -> str:
    """The HLO op, and the kernel name where it says more (on a GPU)."""
    label = op["hlo_op"] or "-"
    if op["name"] != op["hlo_op"]:
        label += f" | {op['name']}"
    return label if len(label) <= width else label[:width - 3] + "..."


def print_config(config: str, result: dict[str, Any], top: int) -> None:
    print(f"=== {config}: wall {result['wall_ms']:.3f} ms/step, busy "
          f"{result['busy_us']:.1f} us/step, {len(result['ops'])} ops (compile "
          f"{result['compile_s']:.1f} s)", flush=True)
    for op in result["ops"][:top]:
        print(f"  {op['us']:10.1f} us {100 * op['share']:5.1f}% x{op['calls']:<5g} "
              f"{_op_label(op)}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=_configs, default=DEFAULT_CONFIGS,
                        help="comma-separated: dense or router:dispatch:experts (routers: "
                        f"{', '.join(router_specs(1.0))}; dispatches: {', '.join(DISPATCHES)})")
    parser.add_argument("--d_model", type=int, default=1024)
    parser.add_argument("--d_ff", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--group_size", type=int, default=None,
                        help="the MoE layer's max group size (default: --length)")
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                        help="activation dtype of the layer and the dense FFN")
    parser.add_argument("--param_dtype", choices=["float32", "bfloat16"], default="float32",
                        help="storage dtype of the expert and dense FFN kernels")
    parser.add_argument("--steps", type=positive_int, default=3,
                        help="steps timed, then steps traced")
    parser.add_argument("--top", type=int, default=25, help="ops printed per config")
    parser.add_argument("--json", type=Path, help="write every config's ops here")
    parser.add_argument("--hlo_dir", type=Path,
                        help="write each config's optimized HLO here, as CONFIG.hlo.txt")
    args = parser.parse_args(argv)
    if args.group_size is None:
        args.group_size = args.length
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = jax.devices()[0]
    print(f"op profile on {device.platform} {device.device_kind}, jax {jax.__version__}: "
          f"d_model {args.d_model}, d_ff {args.d_ff}, {args.batch}x{args.length} tokens, "
          f"group {args.group_size}, {args.activation}, {args.dtype} activations, "
          f"{args.param_dtype} parameters, {args.steps} steps", flush=True)
    if args.hlo_dir:
        args.hlo_dir.mkdir(parents=True, exist_ok=True)
    x = jax.random.normal(jax.random.key(0), (args.batch, args.length, args.d_model),
                          jnp.dtype(args.dtype))
    results = {}
    for config in args.configs:
        results[config.text] = profile_config(config, args, x)
        print_config(config.text, results[config.text], args.top)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "config": {k: [c.text for c in v] if k == "configs" else
                       str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "platform": device.platform,
            "device_kind": device.device_kind,
            "jax_version": jax.__version__,
            "warmup": WARMUP,
        }
        args.json.write_text(json.dumps({"meta": meta, "configs": results}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
