"""Tile sweep of the Mosaic GPU grouped matmul (Hopper): which tiles `moe.grouped_matmul` uses.

    python -m moe.benchmarks.mgpu_tiles [--json OUT]

Times fwd+bwd of `grouped_matmul(..., 'mosaic_gpu')` at the dropless top-2 shape of
`moe.benchmarks.gpu_check` (2 x 32k rows, d_model 1024, d_ff 4096, bfloat16, uneven groups,
E = 8 and 64) for each tile setting, against one dense matmul of the same rows in the same
run, and prints a table (best first per E). Needs a Hopper GPU.
"""

import moe.start_up  # noqa: F401, I001 - first: before JAX and TensorFlow load

import argparse
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from moe import grouped_matmul as gm
from moe.benchmarks.gpu_check import _failure, _uneven_group_sizes
from moe.benchmarks.moe_layer import time_step

TILES = [dict(block_m=m, block_n=n, block_k=64, max_concurrent_steps=s, grid_block_n=g)
         for m, n, s, g in itertools.product((64, 128), (128, 256), (4,), (1, 8))]


def sweep(rows: int, d_model: int, d_ff: int, experts: list[int]) -> list[dict]:
    key_x, key_w = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (rows, d_model), jnp.bfloat16)
    dense = time_step(lambda w, x: jnp.sum(x @ w),
                      jax.random.normal(key_w, (d_model, d_ff), jnp.bfloat16), x, 5, 1)
    print(f"dense matmul {1e3 * dense['median_step_s']:.2f} ms", flush=True)
    results = []
    default = dict(gm.MOSAIC_GPU_TILES)
    for num_experts in experts:
        sizes = _uneven_group_sizes(rows, num_experts)
        w = jax.random.normal(key_w, (num_experts, d_model, d_ff), jnp.bfloat16)
        for tiles in TILES:
            gm.MOSAIC_GPU_TILES.clear()
            gm.MOSAIC_GPU_TILES.update(tiles)
            row = {"experts": num_experts, **tiles}
            try:
                row.update(time_step(
                    lambda w, x, s=sizes: jnp.sum(gm.grouped_matmul(x, w, s, "mosaic_gpu")),
                    w, x, 5, 1))
                row["x_dense"] = dense["median_step_s"] / row["median_step_s"]
            except Exception as error:  # a tile that does not fit must not end the sweep
                row.update(_failure(error))
            results.append(row)
            print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()
                   if k not in ("tokens_per_s", "min_step_s")}, flush=True)
    gm.MOSAIC_GPU_TILES.clear()
    gm.MOSAIC_GPU_TILES.update(default)
    return [{"dense_median_step_s": dense["median_step_s"]}, *results]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = sweep(2 * 8 * 4096, 1024, 4096, [8, 64])
    for num_experts in (8, 64):
        timed = sorted((r for r in results[1:] if r["experts"] == num_experts
                        and "median_step_s" in r), key=lambda r: r["median_step_s"])
        for r in timed[:3]:
            print(f"E={num_experts} best: {r['median_step_s'] * 1e3:.2f} ms "
                  f"x dense {r['x_dense']:.2f} " + " ".join(
                      f"{k}={r[k]}" for k in ("block_m", "block_n", "block_k",
                                              "max_concurrent_steps", "grid_block_n")))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
