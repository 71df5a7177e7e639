"""Benchmark: jitted forward+backward of the MoE layer for every router x dispatch, against a
dense FFN of the same d_model/d_ff measured in the same run.

    python -m moe.benchmarks.moe_layer --json bench_out/moe_layer.json

The objective is `value_and_grad` of `sum(out) + 0.01 * aux + 0.001 * z` with respect to the
parameters and the input. Defaults: d_model 512, d_ff 2048, 8 x 512 tokens, float32
activations (`--dtype bfloat16` for both the layer and the dense FFN), float32 parameters
(`--param_dtype bfloat16` for both),
cf 1.0, group size 512, E in {8, 32, 128}. Prints a table (median step time over `--steps`
timed steps after warm-up, tokens/s, ratio to dense, compile time) and writes JSON.

Per E, beside the dense FFN: `experts_alone`, the experts' batched matmuls on full top-1
buffers with no routing or dispatch (what the backend's matmul makes of E experts with few
rows each: the ceiling of every capacity dispatch), and the memory-bound limit, from the
in-place bandwidth measured first (the bandwidth into fresh buffers, which the system
allocator maps page by page, is printed beside it).
"""

import moe.start_up  # noqa: F401, I001 - first: before JAX and TensorFlow load

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe import host_memory
from moe.activations import apply_activation, num_input_projections
from moe.expert_matmul import IMPLEMENTATIONS as EXPERT_MATMULS
from moe.experts import MlpExperts
from moe.moe_layer import MoeLayer, group_shape
from moe.routing import (
    CappedExpertChoice,
    ExpertChoice,
    RouterSpec,
    SigmoidTokenChoice,
    SoftMoe,
    TokenChoice,
)
from moe.routing.shell import ROUTER_STATE


def router_specs(
    capacity_factor: float, group_size: int = 4096, num_experts: int = 8
) -> dict[str, RouterSpec]:
    """The routers compared; top-2 appears with both capacity formulas (see WORKSPACE.md)."""
    return {
        "top1": TokenChoice(1, capacity_factor=capacity_factor),
        "top2": TokenChoice(2, capacity_factor=capacity_factor),
        "top2_flaxformer_capacity": TokenChoice(
            2, capacity_factor=capacity_factor, capacity_formula="flaxformer"
        ),
        "expert_choice": ExpertChoice(capacity_factor=capacity_factor),
        "capped_expert_choice": CappedExpertChoice(
            capacity_factor=capacity_factor, max_experts_per_token=2
        ),
        "top2_token_major": TokenChoice(2, capacity_factor=capacity_factor, fill_order="token"),
        "sigmoid_top2_bias": SigmoidTokenChoice(
            2, capacity_factor=capacity_factor, routed_scaling_factor=2.5,
            bias_update_rate=1e-3,
        ),
        "global_batch_top2": TokenChoice(2, capacity_factor=capacity_factor,
                                         balance_scope="batch"),
        # Slots = cf x tokens (E * p = cf * group size; cf 1 is the paper's setting).
        "soft_moe": SoftMoe(slots_per_expert=max(1, round(capacity_factor * group_size
                                                          / num_experts))),
    }


class DenseFfn(nn.Module):
    """The reference: one dense MLP of the same width (no router, no dispatch)."""

    d_ff: int
    activation: str
    dtype: Any = jnp.float32  # computation dtype
    param_dtype: Any = jnp.float32  # storage dtype of the kernels, as the layer's experts

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d_model = x.shape[-1]
        init = nn.initializers.lecun_normal()
        x = x.astype(self.dtype)
        wis = [
            self.param(f"wi_{i}", init, (d_model, self.d_ff), self.param_dtype).astype(
                self.dtype)
            for i in range(num_input_projections(self.activation))
        ]
        hidden = apply_activation(self.activation, [x @ w for w in wis])
        return hidden @ self.param("wo", init, (self.d_ff, d_model),
                                   self.param_dtype).astype(self.dtype)


def dense_objective_and_params(d_ff: int, activation: str, x: jax.Array,
                               param_dtype: Any = jnp.float32) -> tuple[Callable, Any]:
    """(objective, parameters) of the dense FFN reference on `x`, computing in x's dtype: what
    this benchmark, `gpu_check` and `op_profile` time MoE layers against."""
    module = DenseFfn(d_ff, activation, x.dtype, param_dtype)
    initial = jax.jit(module.init)(jax.random.key(1), x)["params"]
    return lambda params, x: jnp.sum(module.apply({"params": params}, x)), initial


def moe_objective_and_params(layer: MoeLayer, x: jax.Array) -> tuple[Callable, Any]:
    """(objective, parameters) of an MoE layer on `x`: sum(out) + 0.01 aux + 0.001 z, the
    router's state (if any) held at its initial value."""
    variables = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(1), x))
    router_state = variables.get(ROUTER_STATE)
    state_variables = {ROUTER_STATE: router_state} if router_state else {}

    def objective(params, x):
        y, state = layer.apply({"params": params, **state_variables}, x, mutable=["moe"])
        diagnostics = state["moe"]["diagnostics"][0]
        aux, z = diagnostics["auxiliary_loss"], diagnostics["router_z_loss"]
        return jnp.sum(y) + 0.01 * aux + 0.001 * z

    return objective, variables["params"]


def experts_alone(args: argparse.Namespace, num_experts: int) -> tuple[Callable, Any, jax.Array]:
    """(objective, params, buffers) of the experts alone on full top-1 buffers [E, G, C, d]:
    the batched matmuls every capacity dispatch runs, without routing, gather or scatter.

    Its step is what the backend's batched matmul makes of these shapes; the gap between it
    and a dispatch row is what routing and dispatch cost.
    """
    dtype = jnp.dtype(args.dtype)
    num_groups, group_size = group_shape(args.batch * args.length, args.group_size, 1)
    capacity = TokenChoice(1, capacity_factor=args.capacity_factor).capacity(
        group_size, num_experts, deterministic=False)
    shape = (num_experts, num_groups, capacity, args.d_model)
    buffers = jax.random.normal(jax.random.key(2), shape, dtype)
    experts = MlpExperts(num_experts, args.d_ff, activation=args.activation, dtype=dtype,
                         param_dtype=jnp.dtype(args.param_dtype),
                         expert_matmul=args.expert_matmul)
    params = nn.meta.unbox(experts.init(jax.random.key(1), buffers))["params"]
    return lambda p, b: jnp.sum(experts.apply({"params": p}, b)), params, buffers


def time_step(
    objective: Callable, params, x: jax.Array, steps: int, warmup: int,
    num_tokens: int | None = None,
) -> dict[str, float]:
    """Compile time and median step time of jitted value_and_grad(objective); tokens/s counts
    `num_tokens` per step (default: x's first two axes, [batch, length])."""
    step = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
    start = time.perf_counter()
    compiled = step.lower(params, x).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(compiled(params, x))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "compile_s": compile_s,
        "median_step_s": median,
        "min_step_s": min(times),
        "tokens_per_s": (num_tokens or x.shape[0] * x.shape[1]) / median,
    }


def memory_bandwidth(num_bytes: int = 2**29, steps: int = 5, fresh: bool = False) -> float:
    """Bytes per second this machine's backend reads plus writes, from the median time of
    `y = x * c` over a float32 array of `num_bytes` (read once, written once).

    By default y is written over x (donated): memory already mapped, the streaming bandwidth.
    `fresh=True` writes y into a new buffer, as XLA writes a step's outputs: with the system
    allocator (`MOE_HOST_MEMORY=system`) those pages are mapped afresh, one page fault per
    4 KiB, which on a small machine costs several times the streaming write; our programs
    reuse the blocks instead (see `moe.host_memory`).
    """
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    scale = jax.jit(lambda a: a * 1.0001, donate_argnums=() if fresh else (0,))
    x = jax.block_until_ready(scale(x))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        y = jax.block_until_ready(scale(x))
        times.append(time.perf_counter() - start)
        if not fresh:
            x = y
    return 2 * num_bytes / statistics.median(times)


def memory_bound(expert_weight_bytes: int, bandwidth: float) -> float:
    """Seconds a training step needs at least to read the expert weights once and write their
    gradients once (what no dispatch can avoid, whatever its FLOPs)."""
    return 2 * expert_weight_bytes / bandwidth


def run(args: argparse.Namespace) -> list[dict]:
    """The table's rows, per E: dense, experts alone, every router x dispatch. Needs
    `args.memory_bandwidth` (`main` measures it unless given)."""
    dtype, param_dtype = jnp.dtype(args.dtype), jnp.dtype(args.param_dtype)
    x = jax.random.normal(jax.random.key(0), (args.batch, args.length, args.d_model), dtype)
    rows = []
    for num_experts in args.experts:
        specs = router_specs(args.capacity_factor, args.group_size, num_experts)
        dense, dense_params = dense_objective_and_params(args.d_ff, args.activation, x,
                                                         param_dtype)
        reference = time_step(dense, dense_params, x, args.steps, args.warmup)
        # The limit of a layer with the dense FFN's FLOPs (top-1): the dense step, or reading
        # and writing the experts' weights once, whichever is longer.
        weight_bytes = num_experts * sum(
            a.size * a.dtype.itemsize for a in jax.tree.leaves(dense_params))
        bound = memory_bound(weight_bytes, args.memory_bandwidth)
        limit = max(reference["median_step_s"], bound)
        reference = {**reference, "expert_weight_bytes": weight_bytes, "memory_bound_s": bound,
                     "limit_s": limit}
        rows.append({"experts": num_experts, "router": "dense", "dispatch": "-", **reference})
        _print_row(rows[-1], reference)
        objective, params, buffers = experts_alone(args, num_experts)
        result = time_step(objective, params, buffers, args.steps, args.warmup,
                           num_tokens=args.batch * args.length)
        rows.append({"experts": num_experts, "router": "experts_alone", "dispatch": "-",
                     "capacity": buffers.shape[2], **_ratios(result, reference)})
        _print_row(rows[-1], reference)
        for router in args.routers:
            spec = specs[router]
            for dispatch in args.dispatches:
                if dispatch not in spec.dispatches:
                    continue  # e.g. no dropless for expert choice, mask only for Soft MoE
                if dispatch == "dropless" and router == "top2_flaxformer_capacity":
                    continue  # no capacity in dropless: identical to top2
                layer = MoeLayer(
                    num_experts,
                    args.d_ff,
                    router=spec,
                    activation=args.activation,
                    dispatch=dispatch,
                    max_group_size=args.group_size,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    expert_matmul=args.expert_matmul,
                )
                result = time_step(*moe_objective_and_params(layer, x), x, args.steps,
                                   args.warmup)
                capacity = spec.capacity(args.group_size, num_experts, deterministic=False)
                rows.append(
                    {
                        "experts": num_experts,
                        "router": router,
                        "dispatch": dispatch,
                        "capacity": args.group_size if dispatch == "dropless" else capacity,
                        **_ratios(result, reference),
                    }
                )
                _print_row(rows[-1], reference)
    return rows


def _ratios(result: dict, reference: dict) -> dict:
    """`result` with its ratio to the dense step and its fraction of the limit."""
    return {**result, "ratio_to_dense": reference["median_step_s"] / result["median_step_s"],
            "fraction_of_limit": reference["limit_s"] / result["median_step_s"]}


_HEADER = (
    f"{'E':>4} {'router':<26} {'dispatch':<9} {'C':>5} {'median ms':>10} {'tok/s':>9} "
    f"{'x dense':>8} {'of limit':>8} {'compile s':>9}"
)


def _print_row(row: dict, reference: dict) -> None:
    ratio = reference["median_step_s"] / row["median_step_s"]
    of_limit = reference["limit_s"] / row["median_step_s"]
    print(
        f"{row['experts']:>4} {row['router']:<26} {row['dispatch']:<9} "
        f"{row.get('capacity', '-')!s:>5} {1e3 * row['median_step_s']:>10.1f} "
        f"{row['tokens_per_s']:>9.0f} {ratio:>8.2f} {of_limit:>8.2f} {row['compile_s']:>9.2f}",
        flush=True,
    )
    if row["router"] == "dense":
        print(f"{'':>4} limit: experts' weights {reference['expert_weight_bytes'] / 2**20:.0f} "
              f"MiB read + gradients written >= {1e3 * reference['memory_bound_s']:.1f} ms; "
              f"max(dense, that) = {1e3 * reference['limit_s']:.1f} ms", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--experts", type=lambda s: [int(v) for v in s.split(",")],
                        default=[8, 32, 128])
    parser.add_argument("--routers", type=lambda s: s.split(","), default=list(router_specs(1.0)))
    parser.add_argument("--dispatches", type=lambda s: s.split(","),
                        default=["mask", "index", "dropless"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--d_ff", type=int, default=2048)
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--capacity_factor", type=float, default=1.0)
    parser.add_argument("--group_size", type=int, default=512)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="activation dtype of the layer and the dense FFN")
    parser.add_argument("--param_dtype", choices=["float32", "bfloat16"], default="float32",
                        help="storage dtype of the expert and dense FFN kernels")
    parser.add_argument("--memory_bandwidth", type=float, default=None,
                        help="bytes/s for the memory-bound limit (default: measured here)")
    parser.add_argument("--expert_matmul", choices=["auto", *EXPERT_MATMULS], default="auto",
                        help="how index and mask dispatch run the experts (moe.expert_matmul)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    unknown = set(args.routers) - set(router_specs(1.0))
    if unknown:
        parser.error(f"unknown routers {sorted(unknown)}; choose from {list(router_specs(1.0))}")
    bad = set(args.dispatches) - {"mask", "index", "dropless"}
    if bad:
        parser.error(f"unknown dispatches {sorted(bad)}; choose from mask, index, dropless")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"MoE layer fwd+bwd on {jax.devices()[0].platform} x{jax.device_count()} "
          f"({os.cpu_count()} CPUs), d_model {args.d_model}, d_ff {args.d_ff}, "
          f"{args.batch}x{args.length} tokens, cf {args.capacity_factor}, "
          f"group {args.group_size}, {args.activation}, {args.dtype} activations, "
          f"{args.param_dtype} parameters")
    if args.memory_bandwidth is None:
        args.memory_bandwidth = memory_bandwidth()
    fresh_write = memory_bandwidth(fresh=True)
    retained = host_memory.retained()
    print(f"memory bandwidth (read + write of 512 MiB in place): "
          f"{args.memory_bandwidth / 1e9:.1f} GB/s; into a fresh buffer: {fresh_write / 1e9:.1f} "
          f"GB/s (freed host memory {'retained' if retained else 'returned to the system'}, "
          "moe.host_memory)")
    print("of limit: max(dense step, 2 x expert weight bytes / in-place bandwidth) / step time; "
          "experts_alone: the experts' batched matmuls on full top-1 buffers, no routing")
    print(_HEADER)
    rows = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "platform": jax.devices()[0].platform,
            "device_kind": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "jax_version": jax.__version__,
            "fresh_write_bandwidth": fresh_write,
            "host_memory_retained": retained,
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
