"""Benchmark: training step time as one process x 8 devices vs 2 processes x 4 (and more).

    python -m moe.benchmarks.multihost --json bench_out/multihost.json

Each layout runs the same `moe.train` job through `moe.local_cluster` (real processes, one
JAX cluster over 127.0.0.1 with gloo collectives): the same model, global batch, seed and
mesh shape, so the difference is the cost of crossing process boundaries (gloo over loopback
TCP instead of in-process copies) plus per-process overheads. On a TPU pod the hosts talk
over ICI, not TCP: this measures the CPU emulation, useful to see that the multi-process path
adds no per-step stalls of its own (host syncs, per-host data) beyond collectives.

Default configuration: `models/tokens_choose_tiny.gin` (2 + 2 layers, d_model 32, 8 experts,
top-2), span corruption on the embedded pydoc corpus (byte vocabulary, no download), inputs
64 / targets 16, global batch 16, pretraining optimizer, NUM_EXPERT_PARTITIONS 8 (the expert
axis spans every process). Reported per layout, from process 0's metrics:

- steps_per_second: median over the log windows after the first (`--log_period` steps each;
  data loading, the loss sync and the metrics write included, as in training);
- step_ms: 1000 / steps_per_second;
- first_step_seconds: the first step, compilation included;
- wall_seconds: the whole run, start-up (imports, cluster join) included.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

from moe import local_cluster

DEFAULT_LAYOUTS = ("1x8", "2x4")


def parse_layout(text: str) -> tuple[int, int]:
    """'2x4' -> (2 processes, 4 devices each)."""
    try:
        processes, devices = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(
            f"Layout {text!r} must be PROCESSESxDEVICES, e.g. 2x4 (2 processes of 4 devices)."
        ) from None
    if processes < 1 or devices < 1:
        raise ValueError(f"Layout {text!r}: both counts must be >= 1.")
    return processes, devices


def train_args(model_dir: str, args: argparse.Namespace) -> list[str]:
    return [
        f"--gin_file={args.model_gin}",
        "--gin_file=runs/pretrain.gin",
        f"--gin.MODEL_DIR='{model_dir}'",
        "--gin.MIXTURE_OR_TASK_NAME='pydoc_topics_span_corruption'",
        f"--gin.TASK_FEATURE_LENGTHS={{'inputs': {args.inputs}, 'targets': {args.targets}}}",
        f"--gin.TRAIN_STEPS={args.steps}",
        f"--gin.BATCH_SIZE={args.batch_size}",
        f"--gin.NUM_EXPERT_PARTITIONS={args.expert_partitions}",
        "--gin.PACK=False",
        f"--gin.LOG_PERIOD={args.log_period}",
        f"--gin.CHECKPOINT_PERIOD={args.steps + 1}",
        "--gin.train.eval_dataset_cfg=None",
        "--gin.train.write_plots=False",
    ]


def read_metrics(model_dir: str) -> list[dict]:
    with open(os.path.join(model_dir, "train", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_layout(layout: str, args: argparse.Namespace, workdir: str) -> dict:
    processes, devices = parse_layout(layout)
    model_dir = os.path.join(workdir, layout)
    start = time.perf_counter()
    results = local_cluster.run(processes, devices, train_args(model_dir, args),
                                timeout=args.timeout, echo=None)
    wall = time.perf_counter() - start
    failed = [r for r in results if r.returncode != 0]
    if failed:
        raise RuntimeError(
            f"Layout {layout}: process {failed[0].process_id} exited with "
            f"{failed[0].returncode}:\n{failed[0].output[-4000:]}"
        )
    records = read_metrics(model_dir)
    # Windows after the first: the first logged rate follows compilation and warm-up.
    rates = [r["timing/steps_per_second"] for r in records
             if "timing/steps_per_second" in r][1:]
    if not rates:
        raise RuntimeError(f"Layout {layout}: no timed windows; raise --steps above "
                           f"2 x --log_period ({args.log_period}).")
    median = statistics.median(rates)
    first = next(r["timing/first_step_seconds"] for r in records
                 if "timing/first_step_seconds" in r)
    return {
        "layout": layout,
        "processes": processes,
        "devices_per_process": devices,
        "steps_per_second": median,
        "step_ms": 1000.0 / median,
        "steps_per_second_windows": rates,
        "first_step_seconds": first,
        "wall_seconds": wall,
        "final_loss": records[-1]["loss_last_step"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS),
                        help="Comma-separated PROCESSESxDEVICES layouts (default 1x8,2x4).")
    parser.add_argument("--model_gin", default="models/tokens_choose_tiny.gin")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--targets", type=int, default=16)
    parser.add_argument("--expert_partitions", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log_period", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", default=None, help="Write the results here.")
    args = parser.parse_args(argv)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    try:
        for layout in layouts:
            parse_layout(layout)
    except ValueError as e:
        parser.error(str(e))

    rows = []
    with tempfile.TemporaryDirectory(prefix="moe_multihost_bench_") as workdir:
        for layout in layouts:
            print(f"running {layout} ...", file=sys.stderr, flush=True)
            rows.append(run_layout(layout, args, workdir))
    base = rows[0]["step_ms"]
    print(f"{'layout':<8} {'steps/s':>9} {'step ms':>9} {'vs ' + rows[0]['layout']:>8} "
          f"{'first step s':>13} {'wall s':>8} {'final loss':>11}")
    for row in rows:
        row["step_time_ratio"] = row["step_ms"] / base
        print(f"{row['layout']:<8} {row['steps_per_second']:>9.2f} {row['step_ms']:>9.1f} "
              f"{row['step_time_ratio']:>7.2f}x {row['first_step_seconds']:>13.1f} "
              f"{row['wall_seconds']:>8.1f} {row['final_loss']:>11.4f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k not in ("json", "layouts")}
        with open(args.json, "w") as f:
            json.dump({
                "benchmark": "multihost",
                "config": config,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                            "load_average": os.getloadavg()},
                "results": rows,
            }, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
