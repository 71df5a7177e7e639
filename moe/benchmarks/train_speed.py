"""Benchmark: time to the first training step (cold and warm compilation cache) and steps/s.

    python -m moe.benchmarks.train_speed --json bench_out/train_speed.json [--startup_runs 3]

The configuration is flaxformer's tokens_choose_tiny (`models/tokens_choose_tiny.gin`: 2 + 2
layers, d_model 32, d_ff 64, 8 experts, top-2, BPR in the encoder), batch 8, feature lengths
inputs 64 / targets 16, span corruption on the embedded pydoc corpus, byte vocabulary, the
pretraining optimizer (Adafactor, rsqrt decay).

Every figure comes from a fresh process (`--child`), started the way `moe.train` starts: the
persistent compilation cache turned on (`moe.compilation_cache`), the train step compiled in the
background while the input pipeline starts and the state initializes. Each of `--startup_runs`
rounds runs one process on an empty cache directory (cold: everything compiles and is written)
and then one on the same directory (warm: a repeated or resumed run loads what the first
compiled). Per process:

- startup_seconds: interpreter and imports (TensorFlow, seqio, JAX, Orbax), from the spawn;
- init_seconds: gin, the model, the mesh, the trainer (the train step traced), the state
  initialized;
- first_step_seconds: from there to the first step's metrics: the first batch, the rest of the
  train step's compilation, the step;
- time_to_first_step_seconds: init + first step (what the reference figures count);
- total_seconds: from the spawn to the first step's metrics.

The table shows the median over the rounds; the last warm process also measures steps/s (the
median over `--repeats` windows of `--steps` steps after `--warmup`, data loading and the loss
sync included, as in training). The t5x + flaxformer figures below were recorded on another
machine (t5x and flaxformer do not install here): they are printed beside ours for scale, not
as a ratio measured in this run.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from moe.benchmarks.flags import positive_int

# Recorded once, not measured by this benchmark: t5x's train.py with flaxformer on this
# configuration, on a 2-core machine, on 2026-11-23 (the figures this benchmark was written to
# compare against).
RECORDED_T5X_FLAXFORMER = {
    "source": "t5x + flaxformer train.py, tokens_choose_tiny, batch 8, inputs 64 / targets 16",
    "machine": "a 2-core CPU machine (not this one)",
    "date": "2026-11-23",
    "init_seconds": 5.5,
    "first_step_seconds": 10.0,
    "time_to_first_step_seconds": 15.5,
    "steps_per_second": 27.0,
}
PHASES = ("startup_seconds", "init_seconds", "first_step_seconds", "time_to_first_step_seconds",
          "total_seconds")


def run(model_gin: str, steps: int, repeats: int, warmup: int, batch_size: int,
        lengths: dict[str, int]) -> dict:
    """One measurement in this process: the phases up to the first step, then steps/s
    (`steps` 0: none). Times are `time.time()` stamps, comparable with the parent's."""
    started = time.time()
    # Imported here so that the parent, which only spawns and reads, stays light.
    import moe.start_up  # noqa: F401 - first, as in the entry points
    # isort: split
    import gin
    import jax

    from moe import compilation_cache, data, gin_cli
    from moe.partitioning import Partitioner
    from moe.train import input_shapes_for
    from moe.trainer import Trainer

    imported = time.time()
    cache_dir = compilation_cache.enable()  # as every entry point does first
    gin_cli.parse_gin([model_gin, "runs/pretrain.gin"], finalize=False)
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    cfg = data.DatasetConfig("pydoc_topics_span_corruption", lengths, batch_size=batch_size)
    partitioner = Partitioner()
    converter = model.feature_converter_cls(pack=False)
    # Optimizer and schedule as runs/pretrain.gin binds them (Adafactor, rsqrt decay).
    trainer = Trainer(model, partitioner, input_shapes_for(converter, lengths, batch_size))
    # As moe.train does: the train step compiles and the input pipeline starts in the
    # background while the state initializes.
    step_compiled = compilation_cache.compile_in_background(trainer.lower_train_step())
    batches = data.ResumableIterator(lambda: data.get_dataset(cfg, converter))
    state = trainer.init_state()
    jax.block_until_ready(state)
    initialized = time.time()
    step_compiled.result()
    state, metrics = trainer.train_step(state, partitioner.shard_batch(next(batches)))
    jax.block_until_ready(metrics)
    first_step = time.time()

    result = {
        "imports_done": imported, "started": started, "initialized": initialized,
        "first_step_done": first_step, "compilation_cache_dir": cache_dir,
        "init_seconds": initialized - imported,
        "first_step_seconds": first_step - initialized,
        "time_to_first_step_seconds": first_step - imported,
    }
    if steps:
        for _ in range(warmup):
            state, metrics = trainer.train_step(state, partitioner.shard_batch(next(batches)))
        jax.block_until_ready(metrics)
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                state, metrics = trainer.train_step(state, partitioner.shard_batch(next(batches)))
                float(metrics["loss"])  # the loop checks every loss for NaN: include that sync
            rates.append(steps / (time.perf_counter() - t0))
        result.update(steps_per_second=statistics.median(rates), steps_per_second_windows=rates,
                      final_loss=float(metrics["loss"]))
    batches.close()
    result["devices"] = [str(d) for d in jax.devices()]
    return result


def run_process(args: argparse.Namespace, cache_dir: str, steps: int, workdir: str) -> dict:
    """`run` in a fresh `python -m moe.benchmarks.train_speed --child` process on `cache_dir`."""
    out = os.path.join(workdir, f"child_{time.time_ns()}.json")
    command = [sys.executable, "-m", "moe.benchmarks.train_speed", "--child", out,
               f"--model_gin={args.model_gin}", f"--batch_size={args.batch_size}",
               f"--steps={steps}", f"--repeats={args.repeats}", f"--warmup={args.warmup}"]
    env = {**os.environ, "MOE_COMPILATION_CACHE_DIR": cache_dir}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the benchmark decides where the cache is
    spawned = time.time()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        result = json.load(f)
    result["startup_seconds"] = result["imports_done"] - spawned
    result["total_seconds"] = result["first_step_done"] - spawned
    result["cache_entries"] = len(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else 0
    return result


def medians(runs: list[dict]) -> dict[str, float]:
    return {phase: statistics.median(r[phase] for r in runs) for phase in PHASES}


def format_table(summary: dict) -> str:
    """The medians (cold | warm cache) and steps/s, then the recorded reference figures."""
    cold, warm = summary["median"]["cold"], summary["median"]["warm"]
    names = {
        "startup_seconds": "start-up (imports)",
        "init_seconds": "init (model, mesh, state)",
        "first_step_seconds": "first step (compile rest)",
        "time_to_first_step_seconds": "time to first step",
        "total_seconds": "total from process start",
    }
    n = summary["startup_runs"]
    lines = [f"{'median of ' + str(n) + ' fresh processes':<30} {'cold cache':>11} "
             f"{'warm cache':>11}"]
    lines += [f"{names[p]:<30} {cold[p]:>9.2f} s {warm[p]:>9.2f} s" for p in PHASES]
    if summary.get("steps_per_second") is not None:
        lines.append(f"{'steps/s after warm-up':<30} {'':>11} {summary['steps_per_second']:>11.1f}")
    ref = summary["recorded_t5x_flaxformer"]
    lines.append(
        f"recorded elsewhere ({ref['source']}; {ref['machine']}, {ref['date']}): init "
        f"{ref['init_seconds']} s + first step {ref['first_step_seconds']} s = "
        f"{ref['time_to_first_step_seconds']} s to the first step, {ref['steps_per_second']} "
        "steps/s"
    )
    lines.append(f"load average (1/5/15 min): {summary['machine']['load_average_1_5_15min']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_gin", default="models/tokens_choose_tiny.gin")
    parser.add_argument("--steps", type=int, default=100,
                        help="steps per timed window (0: time to first step only)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--startup_runs", type=positive_int, default=1,
                        help="rounds of (cold, warm) processes; the table shows their medians")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    lengths = {"inputs": 64, "targets": 16}
    if args.child:
        result = run(args.model_gin, args.steps, args.repeats, args.warmup, args.batch_size,
                     lengths)
        with open(args.child, "w") as f:
            json.dump(result, f)
        return

    runs: dict[str, list[dict]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="train_speed_") as workdir:
        for i in range(args.startup_runs):
            cache_dir = os.path.join(workdir, f"cache_{i}")  # empty: the cold run fills it
            last = i == args.startup_runs - 1
            runs["cold"].append(run_process(args, cache_dir, 0, workdir))
            runs["warm"].append(run_process(args, cache_dir, args.steps if last else 0, workdir))
    summary = {
        "config": os.path.basename(args.model_gin),
        "batch_size": args.batch_size,
        "feature_lengths": lengths,
        "startup_runs": args.startup_runs,
        "median": {kind: medians(r) for kind, r in runs.items()},
        "steps_per_second": runs["warm"][-1].get("steps_per_second"),
        "steps_per_second_windows": runs["warm"][-1].get("steps_per_second_windows"),
        "final_loss": runs["warm"][-1].get("final_loss"),
        "runs": runs,
        "recorded_t5x_flaxformer": RECORDED_T5X_FLAXFORMER,
        # Timings on a shared machine are only comparable at a low load average: record it.
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "devices": runs["warm"][-1]["devices"],
                    "load_average_1_5_15min": os.getloadavg()},
    }
    print(format_table(summary))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
