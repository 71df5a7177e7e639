"""One command for a few minutes on an accelerator: correctness of the dispatches, then speed.

    python -m moe.benchmarks.gpu_check [--json OUT] [--quick]

Accelerator time is short and rare, so this checks in one run (under 5 minutes on an H100/H200)
what CPU tests cannot: that the three dispatches still compute the same function where
default matmuls round float32 (TF32 on GPU), and how fast each router x dispatch runs there.

1. The device: platform, device kind, count, versions.
2. Correctness (float32): for top-1 and top-2 token choice and expert choice, with enough
   capacity that nothing drops, mask and dropless dispatch against the index dispatch: outputs
   and gradients of value_and_grad(sum(out)) w.r.t. the parameters and the input, max abs
   difference and PASS/FAIL against a relative tolerance. The mask dispatch's one-hot einsums
   run at Precision.HIGHEST, so mask vs index should agree to float32 rounding even with TF32.
   Then the same layer over a mesh of all local devices against the layer on one device.
3. Speed (bfloat16 activations; kernels stored in bfloat16 as the torch reference's, or
   float32 with --param_dtype float32): `moe.benchmarks.moe_layer`'s routers,
   objective and timer, every router x dispatch at E=8 and E=64, against dense FFNs measured in
   the same run. Two ratios (dense step time / MoE step time, > 1 means the MoE is faster):
   `x dense` to a dense FFN of the expert d_ff (the compute of one expert per token), and
   `x eqflops` to a dense FFN of d_ff * (experts per token), the same expert FLOPs per token.
   A row that runs out of device memory (dropless at E=64 on GPU, where XLA lowers ragged_dot
   densely) is reported as OOM.
4. When torch is importable with CUDA: a torch dropless top-k MoE of the same sizes (tokens
   sorted by expert, grouped matmul), forward+backward in bfloat16, as a reference row.
5. One table on stdout and, with --json, the rows and meta data.

Exit status 0 when every correctness check passes (skipped ones aside), 1 otherwise.
"""

import moe.start_up  # noqa: F401, I001 - first: before JAX and TensorFlow load

import argparse
import contextlib
import functools
import importlib
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe.benchmarks.flags import positive_int
from moe.benchmarks.moe_layer import (
    dense_objective_and_params,
    moe_objective_and_params,
    router_specs,
    time_step,
)
from moe.moe_layer import MoeLayer
from moe.partitioning import Partitioner
from moe.routing import ExpertChoice, RouterSpec, TokenChoice

DISPATCHES = ("mask", "index", "dropless")

# Full sizes: like measurements on an H200 (8 x 4096 tokens); quick: tiny, for CPU and tests.
SIZES = {
    "full": {
        "d_model": 1024, "d_ff": 4096, "batch": 8, "length": 4096, "group_size": 4096,
        "experts": [8, 64], "steps": 5, "warmup": 1,
        # Correctness runs in float32 on a smaller layer: it compares, it does not time.
        "check_d_model": 256, "check_d_ff": 512, "check_length": 256,
    },
    "quick": {
        "d_model": 16, "d_ff": 32, "batch": 2, "length": 32, "group_size": 32,
        "experts": [4, 8], "steps": 1, "warmup": 1,
        "check_d_model": 16, "check_d_ff": 32, "check_length": 32,
        "routers": ["top2"],
    },
}
CHECK_EXPERTS = 8
CHECK_ACTIVATION = "gated-gelu"  # two input projections: more of the experts is exercised


# --- Correctness ---------------------------------------------------------------------------


def correctness_routers(num_experts: int) -> dict[str, RouterSpec]:
    """Routers whose capacity holds every choice: cf = E gives C >= k*T >= T, so the capacity
    dispatches drop nothing and must equal dropless."""
    return {
        "top1": TokenChoice(1, capacity_factor=float(num_experts)),
        "top2": TokenChoice(2, capacity_factor=float(num_experts)),
        "expert_choice": ExpertChoice(capacity_factor=2.0),
    }


def _sum_objective(layer: MoeLayer) -> Callable:
    def loss(params, x):
        y, _ = layer.apply({"params": params}, x, mutable=["moe"])
        return jnp.sum(y), y

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def _outputs_and_grads(layers: dict[str, MoeLayer], params: Any,
                       x: jax.Array) -> dict[str, list[np.ndarray]]:
    """Per layer: [out, every gradient leaf (parameters, then input)] of
    value_and_grad(sum(out)), all layers in one compilation (compiling dominates on CPU)."""

    def run(params, x):
        return {name: _sum_objective(layer)(params, x) for name, layer in layers.items()}

    results = jax.jit(run)(params, x)
    return {name: [np.asarray(a, np.float64) for a in [y, *jax.tree.leaves(grads)]]
            for name, ((_, y), grads) in results.items()}


def compare(result: list[np.ndarray], reference: list[np.ndarray], rtol: float) -> dict:
    """Max abs differences of the output and the gradients, and the largest difference
    relative to its array's largest reference magnitude; PASS when that is <= rtol (NaN
    fails)."""
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(result, reference, strict=True)]
    scales = [max(float(np.max(np.abs(b))), 1e-30) for b in reference]
    max_rel = max(d / s for d, s in zip(diffs, scales))
    return {
        "max_abs_out": diffs[0],
        "max_abs_grad": max(diffs[1:]),
        "max_rel": max_rel,
        "rtol": rtol,
        "status": "PASS" if max_rel <= rtol else "FAIL",
    }


def check_dispatches(sizes: dict, rtol: float, batch: int) -> list[dict]:
    """Mask and dropless against index, per router, in float32 at full matmul precision (the
    dispatch logic: the backends' default precision, TF32 on GPU, rounds the experts' own
    matmuls differently per formulation, by about 1e-4 relative); then the mask's outputs
    against the index's under the default precision, where the one-hot einsums must still be
    exact (they run at Precision.HIGHEST whatever the default)."""
    with jax.default_matmul_precision("highest"):
        rows = _check_dispatches(sizes, rtol, batch)
    num_experts, length = CHECK_EXPERTS, sizes["check_length"]
    x = jax.random.normal(jax.random.key(1), (batch, length, sizes["check_d_model"]))
    spec = correctness_routers(num_experts)["top2"]
    layers = {dispatch: MoeLayer(num_experts, sizes["check_d_ff"], router=spec,
                                 dispatch=dispatch, activation=CHECK_ACTIVATION,
                                 max_group_size=length) for dispatch in ("index", "mask")}
    params = nn.meta.unbox(jax.jit(layers["index"].init)(jax.random.key(0), x)["params"])
    outputs = {name: np.asarray(jax.jit(layer.apply)({"params": params}, x), np.float64)
               for name, layer in layers.items()}
    row = {"check": "dispatch", "experts": num_experts, "router": "top2",
           "pair": "mask vs index, default", **compare([outputs["mask"], outputs["mask"]],
                                                        [outputs["index"], outputs["index"]],
                                                        rtol)}
    rows.append(row)
    _print_row(row)
    return rows


def _check_dispatches(sizes: dict, rtol: float, batch: int) -> list[dict]:
    num_experts = CHECK_EXPERTS
    length = sizes["check_length"]
    x = jax.random.normal(jax.random.key(1), (batch, length, sizes["check_d_model"]))
    rows = []
    for name, spec in correctness_routers(num_experts).items():
        layers = {
            dispatch: MoeLayer(num_experts, sizes["check_d_ff"], router=spec, dispatch=dispatch,
                               activation=CHECK_ACTIVATION, max_group_size=length)
            for dispatch in DISPATCHES if dispatch in spec.dispatches
        }
        # The parameter tree does not depend on the dispatch.
        params = nn.meta.unbox(jax.jit(layers["index"].init)(jax.random.key(0), x)["params"])
        results = _outputs_and_grads(layers, params, x)
        for dispatch, result in results.items():
            if dispatch == "index":
                continue
            row = {"check": "dispatch", "experts": num_experts, "router": name,
                   "pair": f"{dispatch} vs index", **compare(result, results["index"], rtol)}
            rows.append(row)
            _print_row(row)
    return rows


def check_devices(sizes: dict, rtol: float, batch: int) -> dict:
    """The same layer over a mesh of all local devices vs on one device."""
    devices = jax.local_devices()
    n = len(devices)
    if n == 1:
        row = {"check": "devices", "experts": CHECK_EXPERTS, "router": "top2",
               "pair": "1 device", "status": "SKIPPED", "reason": "only one device"}
        _print_row(row)
        return row
    partitions = n if CHECK_EXPERTS % n == 0 else 1
    length = sizes["check_length"]
    layer = MoeLayer(CHECK_EXPERTS, sizes["check_d_ff"],
                     router=correctness_routers(CHECK_EXPERTS)["top2"],
                     activation=CHECK_ACTIVATION, max_group_size=length,
                     num_expert_partitions=partitions)
    x = jax.random.normal(jax.random.key(1), (batch, length, sizes["check_d_model"]))
    params = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(0), x)["params"])
    results = []
    for partitioner in (Partitioner(partitions, devices=devices),
                        Partitioner(devices=devices[:1])):
        with partitioner.context():
            boxed = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
        shardings = partitioner.get_shardings(boxed)
        step = partitioner.partition(_sum_objective(layer),
                                     in_shardings=(shardings, partitioner.batch_sharding),
                                     out_shardings=None)
        (_, y), grads = step(jax.device_put(params, shardings),
                             jax.device_put(x, partitioner.batch_sharding))
        results.append([np.asarray(a, np.float64) for a in [y, *jax.tree.leaves(grads)]])
    row = {"check": "devices", "experts": CHECK_EXPERTS, "router": "top2",
           "pair": f"{n} devices vs 1 device", "expert_partitions": partitions,
           **compare(results[0], results[1], rtol)}
    _print_row(row)
    return row


# --- Grouped matmul forms ------------------------------------------------------------------


def _uneven_group_sizes(rows: int, groups: int, seed: int = 0) -> jax.Array:
    """Group sizes summing to `rows`, uneven (random cut points) with some empty groups."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(0, rows, groups - 1))
    sizes = np.diff(np.concatenate([[0], cuts, [rows]]))
    sizes[rng.integers(0, groups)] = 0  # an empty group
    sizes[-1] += rows - sizes.sum()
    return jnp.asarray(sizes, jnp.int32)


def _rows_past_the_groups(x: jax.Array, computed: int) -> jax.Array:
    """x with its rows from `computed` on set to large finite values: a grouped matmul must
    leave them out (zero output and dx rows, nothing added to dw)."""
    return x.at[computed:].set(1e4)


def _grouped_objective(impl: str, dtype: Any, group_sizes: jax.Array) -> Callable:
    """Jitted value_and_grad of sum(sin(grouped_matmul(x, w))) w.r.t. (w, x), in `dtype`."""
    from moe.grouped_matmul import grouped_matmul

    def f(w, x):
        y = grouped_matmul(x.astype(dtype), w.astype(dtype), group_sizes, impl)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


def grouped_rows(args: argparse.Namespace, sizes: dict) -> list[dict]:
    """Each `moe.grouped_matmul` form on its own, bfloat16: its forward and gradients against
    the float32 'blocked' form on uneven groups followed by rows past the groups holding large
    values (PASS/FAIL at 2e-2 of the largest value), then
    fwd+bwd time at the dropless top-2 shape (rows = 2 x tokens, d_model x d_ff) against one
    dense matmul of the same rows, and torch's grouped_mm on the same shape when installed."""
    from moe.grouped_matmul import grouped_matmul

    d_model, d_ff = sizes["d_model"], sizes["d_ff"]
    rows = 2 * sizes["batch"] * sizes["length"]
    out: list[dict] = []
    key_x, key_w = jax.random.split(jax.random.key(3))
    check_rows = min(rows, 4096)
    computed = check_rows - check_rows // 8  # the rest lies past the groups
    for num_experts in sizes["experts"]:
        group_sizes = _uneven_group_sizes(computed, num_experts)
        x = _rows_past_the_groups(
            jax.random.normal(key_x, (check_rows, d_model), jnp.float32), computed)
        w = jax.random.normal(key_w, (num_experts, d_model, d_ff), jnp.float32) * d_model ** -.5

        objective = functools.partial(_grouped_objective, group_sizes=group_sizes)
        (_, y_ref), g_ref = objective("blocked", jnp.float32)(w, x)
        reference = [np.asarray(a, np.float64) for a in (y_ref, *g_ref)]
        for impl in args.grouped_matmuls:
            row = {"check": "grouped", "experts": num_experts, "router": impl,
                   "pair": "bf16 vs f32 blocked"}
            try:
                (_, y), g = objective(impl, jnp.bfloat16)(w, x)
                row.update(compare([np.asarray(a, np.float64) for a in (y, *g)], reference,
                                   2e-2))
            except Exception as error:  # a failing form must not end the check
                row.update(_failure(error))
                row["status"] = "FAIL"
            out.append(row)
            _print_row(row)
    x = jax.random.normal(key_x, (rows, d_model), jnp.bfloat16)
    dense = time_step(lambda w, x: jnp.sum(x @ w), jax.random.normal(key_w, (d_model, d_ff),
                      jnp.bfloat16), x, sizes["steps"], sizes["warmup"])
    row = {"check": "grouped", "experts": "-", "router": "dense matmul", "dispatch": "-",
           "status": "ok", **dense}
    out.append(row)
    _print_row(row)
    for num_experts in sizes["experts"]:
        group_sizes = _uneven_group_sizes(rows, num_experts)
        w = jax.random.normal(key_w, (num_experts, d_model, d_ff), jnp.bfloat16)
        for impl in args.grouped_matmuls:
            row = {"check": "grouped", "experts": num_experts, "router": impl, "dispatch": "-"}
            try:
                row.update(time_step(
                    lambda w, x, impl=impl, sizes_=group_sizes: jnp.sum(
                        grouped_matmul(x, w, sizes_, impl)),
                    w, x, sizes["steps"], sizes["warmup"]))
                row["status"] = "ok"
                row["x_dense"] = dense["median_step_s"] / row["median_step_s"]
            except Exception as error:  # an OOM row must not end the check
                row.update(_failure(error))
            out.append(row)
            _print_row(row)
        out += _torch_grouped_row(num_experts, rows, d_model, d_ff, group_sizes, dense)
    return out


def _torch_grouped_row(num_experts: int, rows: int, d_model: int, d_ff: int,
                       group_sizes: jax.Array, dense: dict) -> list[dict]:
    """torch's grouped matmul fwd+bwd on the same shape and groups, when torch has CUDA."""
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return []
    if not torch.cuda.is_available() or jax.default_backend() != "gpu":
        return []
    device = torch.device("cuda")
    matmul, how = _pick_matmul(torch, device)
    row = {"check": "grouped", "experts": num_experts, "router": "torch", "dispatch": "-",
           "matmul": how}
    try:
        x = torch.randn(rows, d_model, device=device).bfloat16().requires_grad_()
        w = torch.randn(num_experts, d_ff, d_model, device=device).bfloat16().requires_grad_()
        offs = torch.tensor(np.cumsum(np.asarray(group_sizes)), device=device,
                            dtype=torch.int32)

        def step():
            x.grad = w.grad = None
            matmul(x, w.transpose(-2, -1), offs).float().sum().backward()

        for _ in range(2):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        row.update({"status": "ok", "median_step_s": median, "tokens_per_s": rows / median,
                    "x_dense": dense["median_step_s"] / median})
    except Exception as error:  # an OOM row must not end the check
        row.update(_failure(error))
    torch.cuda.empty_cache()
    _print_row(row)
    return [row]


# --- Speed ---------------------------------------------------------------------------------


def _is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _failure(error: Exception) -> dict:
    """A failed row: OOM when the device ran out of memory, ERROR otherwise."""
    first_line = (str(error).splitlines() or [""])[0][:300]
    if _is_oom(error):
        return {"status": "OOM", "error": first_line}
    return {"status": "ERROR", "error": f"{type(error).__name__}: {first_line}"}


def _dense_time(d_ff: int, activation: str, x: jax.Array, param_dtype: Any, steps: int,
                warmup: int) -> dict:
    return time_step(*dense_objective_and_params(d_ff, activation, x, param_dtype), x, steps,
                     warmup)


def speed_rows(args: argparse.Namespace, sizes: dict) -> list[dict]:
    """Every router x dispatch at each E, with the dense references they are compared to."""
    x = jax.random.normal(jax.random.key(0), (sizes["batch"], sizes["length"], sizes["d_model"]),
                          jnp.bfloat16)
    group, d_ff = sizes["group_size"], sizes["d_ff"]
    dense: dict[int, dict] = {}  # d_ff -> timing, shared by every E

    def dense_reference(width: int) -> dict:
        if width not in dense:
            try:
                dense[width] = _dense_time(width, args.activation, x, args.param_dtype,
                                           sizes["steps"], sizes["warmup"])
                dense[width]["status"] = "ok"
            except Exception as error:  # an OOM row must not end the check
                dense[width] = _failure(error)
            row = {"check": "speed", "experts": "-", "router": "dense", "dispatch": "-",
                   "d_ff": width, **dense[width]}
            rows.append(row)
            _print_row(row)
        return dense[width]

    rows: list[dict] = []
    dense_reference(d_ff)
    for num_experts in sizes["experts"]:
        specs = router_specs(args.capacity_factor, group, num_experts)
        for router in sizes["routers"]:
            spec = specs[router]
            equal_width = max(1, round(d_ff * spec.experts_per_token(group, num_experts)))
            for dispatch, impl in _dispatch_variants(router, spec, args.grouped_matmuls):
                row = {"check": "speed", "experts": num_experts, "router": router,
                       "dispatch": dispatch if impl == "auto" else f"{dispatch}[{impl}]",
                       "equal_flops_d_ff": equal_width,
                       "capacity": group if dispatch == "dropless"
                       else spec.capacity(group, num_experts, deterministic=False)}
                try:
                    row.update(_moe_time(spec, dispatch, num_experts, x, args, sizes, impl))
                    row["status"] = "ok"
                except Exception as error:  # an OOM row must not end the check
                    row.update(_failure(error))
                for key, width in (("x_dense", d_ff), ("x_eqflops", equal_width)):
                    reference = dense_reference(width)
                    if "median_step_s" in row and "median_step_s" in reference:
                        row[key] = reference["median_step_s"] / row["median_step_s"]
                rows.append(row)
                _print_row(row)
    return rows


def _dispatch_variants(router: str, spec: RouterSpec,
                       grouped_matmuls: list[str]) -> list[tuple[str, str]]:
    """(dispatch, grouped matmul) pairs of a router's speed rows: each dispatch it supports
    with the automatic grouped matmul, and for top2 dropless every listed form as well."""
    pairs = []
    for dispatch in DISPATCHES:
        if dispatch not in spec.dispatches:
            continue
        if dispatch == "dropless" and router == "top2_flaxformer_capacity":
            continue  # no capacity in dropless: identical to top2
        pairs.append((dispatch, "auto"))
        if dispatch == "dropless" and router == "top2":
            pairs += [(dispatch, impl) for impl in grouped_matmuls if impl != "auto"]
    return pairs


def _moe_time(spec: RouterSpec, dispatch: str, num_experts: int, x: jax.Array,
              args: argparse.Namespace, sizes: dict, grouped_matmul: str = "auto") -> dict:
    layer = MoeLayer(num_experts, sizes["d_ff"], router=spec, activation=args.activation,
                     dispatch=dispatch, max_group_size=sizes["group_size"], dtype=x.dtype,
                     param_dtype=args.param_dtype,
                     grouped_matmul=grouped_matmul)
    return time_step(*moe_objective_and_params(layer, x), x, sizes["steps"], sizes["warmup"])


# --- Torch reference -----------------------------------------------------------------------


def _torch_skip(reason: str) -> list[dict]:
    row = {"check": "torch", "experts": "-", "router": "torch_dropless", "dispatch": "-",
           "status": "SKIPPED", "reason": reason}
    _print_row(row)
    return [row]


def _grouped_matmul(torch: Any) -> tuple[Callable | None, str]:
    """The grouped matmul this torch has: (fn(a [M, K], b [E, K, N], offs [E]), its name)."""
    for owner, name, label in ((torch.nn.functional, "grouped_mm",
                                "torch.nn.functional.grouped_mm"),
                               (torch, "_grouped_mm", "torch._grouped_mm")):
        fn = getattr(owner, name, None)
        if fn is not None:
            return (lambda a, b, offs, fn=fn: fn(a, b, offs=offs)), label
    return None, "per-expert loop"


def _loop_matmul(a: Any, b: Any, offs: Any) -> Any:
    """Per-expert matmuls over the contiguous row blocks that `offs` (cumulative ends) gives;
    rows past the last block come out as zeros."""
    out = a.new_zeros(a.shape[0], b.shape[-1])
    start = 0
    for i, end in enumerate(offs.tolist()):
        out[start:end] = a[start:end] @ b[i]
        start = end
    return out


def _pick_matmul(torch: Any, device: Any) -> tuple[Callable, str]:
    """The grouped matmul if it runs forward+backward and matches the loop on unaligned
    groups; otherwise the per-expert loop, saying why."""
    grouped, label = _grouped_matmul(torch)
    if grouped is None:
        return _loop_matmul, "per-expert loop (no grouped_mm in this torch)"
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(40, 32, device=device, generator=gen).bfloat16().requires_grad_()
        # Stored [E, N, K] and transposed, the layout torch's grouped matmul kernels expect.
        b = torch.randn(3, 48, 32, device=device, generator=gen).bfloat16().requires_grad_()
        offs = torch.tensor([7, 19, 40], device=device, dtype=torch.int32)
        got = grouped(a, b.transpose(-2, -1), offs)
        got.float().sum().backward()
        want = _loop_matmul(a.detach().float(), b.detach().float().transpose(-2, -1), offs)
        if not torch.allclose(got.float(), want, rtol=2e-2, atol=2e-1):
            return _loop_matmul, f"per-expert loop ({label} disagrees with the loop)"
    except Exception as error:  # any failure means: use the loop
        return _loop_matmul, f"per-expert loop ({label} failed: {str(error).splitlines()[0]})"
    return grouped, label


def torch_rows(args: argparse.Namespace, sizes: dict) -> list[dict]:
    """A torch dropless top-k MoE of the same sizes, forward+backward in bfloat16."""
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return _torch_skip("torch is not installed")
    if not torch.cuda.is_available():
        return _torch_skip("torch has no CUDA device")
    if jax.default_backend() != "gpu":
        return _torch_skip(f"JAX runs on {jax.default_backend()}, not the GPU torch would use")
    device = torch.device("cuda")
    matmul, how = _pick_matmul(torch, device)
    rows = []
    for num_experts in sizes["experts"]:
        for k in (1, 2):
            row = {"check": "torch", "experts": num_experts, "router": f"torch_top{k}",
                   "dispatch": "dropless", "matmul": how}
            try:
                row.update(_torch_time(torch, device, matmul, num_experts, k, sizes))
                row["status"] = "ok"
            except Exception as error:  # an OOM row must not end the check
                row.update(_failure(error))
            torch.cuda.empty_cache()
            rows.append(row)
            _print_row(row)
    return rows


def _torch_time(torch: Any, device: Any, matmul: Callable, num_experts: int, k: int,
                sizes: dict) -> dict:
    """Median fwd+bwd step of sum(moe(x)): float32 router, softmax top-k, tokens sorted by
    expert, relu experts in bfloat16 (weights stored [E, out, in]), float32 weighted combine."""
    d_model, d_ff = sizes["d_model"], sizes["d_ff"]
    num_tokens = sizes["batch"] * sizes["length"]
    gen = torch.Generator(device=device).manual_seed(0)

    def param(*shape, scale):
        w = torch.randn(*shape, device=device, generator=gen) * scale
        return w.to(torch.bfloat16 if len(shape) == 3 else torch.float32).requires_grad_()

    router = param(d_model, num_experts, scale=0.02)
    wi = param(num_experts, d_ff, d_model, scale=d_model ** -0.5)
    wo = param(num_experts, d_model, d_ff, scale=d_ff ** -0.5)
    x = torch.randn(num_tokens, d_model, device=device, generator=gen).bfloat16()
    x.requires_grad_()

    def step():
        for t in (x, router, wi, wo):
            t.grad = None
        probs = torch.softmax(x.float() @ router, dim=-1)
        gates, experts = torch.topk(probs, k, dim=-1)
        order = torch.argsort(experts.reshape(-1), stable=True)
        token_of = order // k
        offs = torch.cumsum(torch.bincount(experts.reshape(-1), minlength=num_experts),
                            0).to(torch.int32)
        hidden = torch.relu(matmul(x[token_of], wi.transpose(-2, -1), offs))
        out = matmul(hidden, wo.transpose(-2, -1), offs)
        weighted = out.float() * gates.reshape(-1)[order, None]
        y = torch.zeros(num_tokens, d_model, device=device).index_add(0, token_of, weighted)
        y.sum().backward()

    for _ in range(sizes["warmup"] + 1):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(sizes["steps"]):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"median_step_s": median, "min_step_s": min(times),
            "tokens_per_s": num_tokens / median}


# --- Output --------------------------------------------------------------------------------

_HEADER = f"{'check':<9} {'E':>3} {'router':<26} {'dispatch / pair':<22} {'result':<7} detail"


def _detail(row: dict) -> str:
    if "reason" in row:
        return row["reason"]
    if "error" in row:
        return row["error"]
    if "max_rel" in row:
        return (f"max|diff| out {row['max_abs_out']:.2e} grads {row['max_abs_grad']:.2e}; "
                f"relative {row['max_rel']:.2e} (tolerance {row['rtol']:.0e})")
    parts = [f"{1e3 * row['median_step_s']:.2f} ms", f"{row['tokens_per_s']:.3g} tok/s"]
    if "x_dense" in row:
        parts.append(f"x dense {row['x_dense']:.2f}")
    if "x_eqflops" in row:
        parts.append(f"x eqflops(d_ff {row['equal_flops_d_ff']}) {row['x_eqflops']:.2f}")
    if "d_ff" in row:
        parts.append(f"d_ff {row['d_ff']}")
    if "capacity" in row:
        parts.append(f"C {row['capacity']}")
    if "compile_s" in row:
        parts.append(f"compile {row['compile_s']:.1f} s")
    if "matmul" in row:
        parts.append(row["matmul"])
    return ", ".join(parts)


def _print_row(row: dict) -> None:
    which = row.get("pair", row.get("dispatch", "-"))
    result = row["status"] if row["status"] != "ok" else "-"
    print(f"{row['check']:<9} {row['experts']!s:>3} {row['router']:<26} {which:<22} "
          f"{result:<7} {_detail(row)}", flush=True)


def _versions() -> dict[str, str]:
    """Installed versions of what the numbers depend on (torch only when installed)."""
    versions = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "numpy", "torch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the rows and meta data here")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (d_model 16, d_ff 32, 2 x 32 tokens, E 4 and 8) for CPU")
    parser.add_argument("--routers", type=lambda s: s.split(","),
                        help="speed rows for these routers only (default: all; --quick: "
                        f"{','.join(SIZES['quick']['routers'])})")
    parser.add_argument("--steps", type=positive_int,
                        help="timed steps per speed row, after the warm-up (default: "
                        f"{SIZES['full']['steps']}; --quick: {SIZES['quick']['steps']}). "
                        "Ratios within a few percent of a target need more: the 5-step "
                        "median of one unchanged row moved by 0.03x between runs on an H100")
    parser.add_argument("--skip_speed", action="store_true",
                        help="correctness checks only (no speed or torch rows)")
    parser.add_argument("--rtol", type=float, default=1e-5,
                        help="relative tolerance of the correctness checks")
    parser.add_argument("--capacity_factor", type=float, default=1.0,
                        help="capacity factor of the speed rows")
    parser.add_argument("--activation", default="relu", help="activation of the speed rows")
    parser.add_argument("--param_dtype", type=jnp.dtype, default=jnp.dtype(jnp.bfloat16),
                        help="storage dtype of the speed rows' kernels (MoE experts and dense "
                        "FFN; the router's stay float32). Default bfloat16, as the torch "
                        "reference's expert weights; float32 adds the per-step casts T5X's "
                        "float32 parameters cost")
    parser.add_argument("--grouped_matmuls", type=lambda s: s.split(","),
                        default=["auto", "blocked", "mosaic_gpu", "ragged_dot"],
                        help="moe.grouped_matmul forms compared on their own and as top2 "
                        "dropless rows (auto: the one the layer picks on this backend)")
    args = parser.parse_args(argv)
    known = list(router_specs(1.0))
    if args.routers and set(args.routers) - set(known):
        parser.error(f"unknown routers {sorted(set(args.routers) - set(known))}; "
                     f"choose from {known}")
    return args


def run_sizes(args: argparse.Namespace) -> dict[str, Any]:
    """The sizes of this run: the full or quick preset, narrowed by the command line."""
    sizes = dict(SIZES["quick" if args.quick else "full"])
    sizes["routers"] = args.routers or sizes.get("routers") or list(router_specs(1.0))
    if args.steps is not None:
        sizes["steps"] = args.steps
    return sizes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = run_sizes(args)
    device = jax.local_devices()[0]
    n = jax.local_device_count()
    meta = {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": n,
        "versions": _versions(),
        "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
        "sizes": sizes,
        "quick": args.quick,
        "rtol": args.rtol,
        "capacity_factor": args.capacity_factor,
        "activation": args.activation,
        "param_dtype": str(args.param_dtype),
        "check_activation": CHECK_ACTIVATION,
    }
    print(f"device: {device.platform} {device.device_kind} x{n}, jax {jax.__version__}, "
          f"default matmul precision {meta['default_matmul_precision']}")
    print(f"correctness: float32, E {CHECK_EXPERTS}, d_model {sizes['check_d_model']}, d_ff "
          f"{sizes['check_d_ff']}, {CHECK_ACTIVATION}; speed: bfloat16 activations, "
          f"{args.param_dtype} kernels, d_model "
          f"{sizes['d_model']}, d_ff {sizes['d_ff']}, {sizes['batch']}x{sizes['length']} "
          f"tokens, group {sizes['group_size']}, cf {args.capacity_factor}, E {sizes['experts']}")
    print("x dense: dense(d_ff) / MoE step time; x eqflops: dense(d_ff * experts per token) / "
          "MoE step time (> 1: the MoE is faster)")
    print(_HEADER)
    # A batch that splits evenly over every local device, for the device check.
    batch = n * math.ceil(8 / n)
    rows = check_dispatches(sizes, args.rtol, batch)
    rows.append(check_devices(sizes, args.rtol, batch))
    if not args.skip_speed:
        rows += grouped_rows(args, sizes)
        rows += speed_rows(args, sizes)
        rows += torch_rows(args, sizes)
    failed = [r for r in rows if r["status"] == "FAIL"]
    checks = [r for r in rows if r["check"] in ("dispatch", "devices")
              or r.get("pair") == "bf16 vs f32 blocked"]
    if failed:
        print(f"correctness: {len(failed)} of {len(checks)} checks FAIL: "
              + "; ".join(f"{r['router']} {r['pair']}" for r in failed))
    else:
        print(f"correctness: all {sum(r['status'] == 'PASS' for r in checks)} checks PASS")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
