"""Train a dense baseline and one sparse model per router, side by side: `python -m
moe.experiments.compare_routers`.

    python -m moe.experiments.compare_routers --preset=quick --output=/tmp/compare
    python -m moe.experiments.compare_routers --output=runs_out/compare        # default preset
    python -m moe.experiments.compare_routers --output=DIR --gin.TRAIN_STEPS=2000 \
        --gin.ComparisonConfig.entries="['dense', 'gshard_top2', 'ec_cf2']"

Every model is trained by `moe.train.train` from the preset's gin
(`gin_configs/experiments/compare_routers_<preset>.gin`, plus any `--gin_file` / `--gin.X=Y`),
with only its entry's router bindings added (`moe.experiments.entries`). For each seed, every
model starts from the same initialization seed and reads the same batches in the same order
(each run records a fingerprint of the first batches its own parsed data configuration
yields, rebuilt after training; entries bind router settings only). Runs are trained one after the
other in this process, so their step times are comparable.

Outputs in `--output`: `runs/<entry>/seed<k>/` (each a MODEL_DIR with checkpoints and metrics,
plus `result.json` once finished), `results.json` (every finished run), `comparison.png` and
`report.md` (the Expert Choice paper's claims, what was measured, and whether each reproduced).

Resumable: rerun the same command. Finished runs are read back, an interrupted run continues
from its last checkpoint (the trainer's resume), the rest are trained.
"""

import sys

import moe.start_up  # noqa: F401 - first: before JAX and TensorFlow load

if __name__ == "__main__":
    from moe.experiments.compare_routers import main

    sys.exit(main())

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import gin

from moe import compilation_cache, evaluation, file_io, gin_cli
from moe.errors import ConfigurationError
from moe.experiments import entries as entries_lib
from moe.experiments import report, run_results
from moe.partitioning import Partitioner

PRESETS = ("quick", "default")
RESULT_FILE = "result.json"
FINGERPRINT_BATCHES = 4


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ComparisonConfig:
    """What the comparison trains (bound in the preset gin).

    Attributes:
      entries: names of `moe.experiments.entries` to train, the dense baseline included.
      seeds: each entry is trained once per seed (initialization and data order).
      analysis_batches: held-out batches for the routing analysis after training.
    """

    entries: Sequence[str] = ()
    seeds: Sequence[int] = (0, 1)
    analysis_batches: int = 8


@gin.configurable
def run_inputs(model: Any = gin.REQUIRED, train_dataset_cfg: Any = gin.REQUIRED,
               eval_dataset_cfg: Any = gin.REQUIRED) -> tuple[Any, Any, Any]:
    """The model and datasets the trainer is configured with (the preset binds them to the
    same gin objects as `train`), for the measurements taken around training."""
    return model, train_dataset_cfg, eval_dataset_cfg


@dataclasses.dataclass(frozen=True)
class Run:
    entry: entries_lib.ComparisonEntry
    seed: int
    directory: str

    @property
    def result_path(self) -> str:
        return file_io.join(self.directory, RESULT_FILE)


def preset_file(preset: str) -> str:
    if preset not in PRESETS:
        raise ConfigurationError(f"Unknown preset {preset!r}; use one of {list(PRESETS)}.")
    return f"experiments/compare_routers_{preset}.gin"


def _parse(files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str],
           finalize: bool = True) -> None:
    gin.clear_config()
    gin_cli.parse_gin(files, bindings, search_paths, finalize=finalize)


def plan_runs(config: ComparisonConfig, output: str) -> list[Run]:
    """Seed-major order: every entry of seed 0, then of seed 1, ... so that a slow period of
    the machine affects entries alike, and a stopped comparison has whole seeds."""
    if not config.seeds:
        raise ConfigurationError("ComparisonConfig.seeds is empty; give at least one seed.")
    chosen = entries_lib.get_entries(list(config.entries))
    if not chosen:
        raise ConfigurationError("ComparisonConfig.entries is empty; name the models to train.")
    return [Run(entry, seed, file_io.join(output, "runs", entry.name, f"seed{seed}"))
            for seed in config.seeds for entry in chosen]


def _write_json(path: str, value: Any) -> None:
    file_io.write_atomically(path, json.dumps(value, indent=1))


def train_and_measure(run: Run, files: Sequence[str], bindings: Sequence[str],
                      search_paths: Sequence[str], analysis_batches: int) -> dict[str, Any] | None:
    """Train `run` (or finish it) and measure it; None when training was preempted."""
    from moe import train as moe_train  # registers `train`'s gin configurables

    file_io.makedirs(run.directory)
    run_bindings = [*bindings, *run.entry.bindings,
                    f"MODEL_DIR = {run.directory!r}", f"RANDOM_SEED = {run.seed}"]
    _parse(files, run_bindings, search_paths)
    started = time.perf_counter()
    outcome = moe_train.train(write_plots=False)
    if outcome["reason"] != "done":
        return None
    model, train_cfg, eval_cfg = run_inputs()
    converter = model.feature_converter_cls(pack=train_cfg.pack)
    # The run's latest (final) checkpoint.
    params, router_state = evaluation.load_variables(
        model, file_io.join(run.directory, "checkpoints"), eval_cfg, Partitioner(1, 1))
    eval_converter = model.feature_converter_cls(pack=eval_cfg.pack)
    from moe import data

    held_out = data.get_dataset(eval_cfg, eval_converter, drop_remainder=False)
    batches = held_out.take(analysis_batches).as_numpy_iterator()
    return {
        "entry": run.entry.name,
        "label": run.entry.label,
        "sparse": run.entry.sparse,
        "discrete": run.entry.discrete,
        "seed": run.seed,
        "bindings": list(run.entry.bindings),
        "steps": outcome["step"],
        **run_results.compute_summary(model),
        **run_results.training_curves(run.directory, eval_cfg.mixture_or_task_name),
        "layers": (run_results.routing_analysis(model, params, router_state, batches)
                   if run.entry.sparse else {}),
        "data_fingerprint": run_results.data_fingerprint(train_cfg, converter,
                                                         FINGERPRINT_BATCHES),
        "process_seconds": time.perf_counter() - started,
    }


SETTING_MACROS = (
    "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "BATCH_SIZE", "TRAIN_STEPS", "EVAL_PERIOD",
    "EVAL_STEPS", "NUM_ENCODER_LAYERS", "NUM_DECODER_LAYERS", "EMBED_DIM", "MLP_DIM",
    "NUM_HEADS", "HEAD_DIM", "NUM_EXPERTS", "NUM_ENCODER_SPARSE_LAYERS", "GROUP_SIZE",
    "AUX_LOSS_FACTOR",
)


def describe_settings() -> dict[str, Any]:
    """The preset's main settings and the machine, for the report."""
    import platform

    import jax

    out = {name: gin.query_parameter(f"%{name}") for name in SETTING_MACROS}
    out["machine"] = (f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                      f"{jax.device_count()} {jax.default_backend()} device(s), jax "
                      f"{jax.__version__}, Python {platform.python_version()}")
    return out


def run_comparison(files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str],
                   output: str, preset: str = "custom") -> dict[str, Any] | None:
    """Train what is missing, then write results.json, comparison.png and report.md.

    Returns the results, or None when a SIGTERM stopped training (rerun to continue).
    """
    # The comparison's own settings; MODEL_DIR and the seed are set per run below.
    _parse(files, bindings, search_paths, finalize=False)
    config = ComparisonConfig()
    runs = plan_runs(config, output)
    file_io.makedirs(output)
    preset_config = gin.config_str()
    settings = describe_settings()
    results = []
    for index, run in enumerate(runs, 1):
        if file_io.exists(run.result_path):
            results.append(json.loads(file_io.read_text(run.result_path)))
            print(f"[compare] {index}/{len(runs)} {run.entry.name} seed {run.seed}: done "
                  "earlier, read back.", flush=True)
            continue
        print(f"[compare] {index}/{len(runs)} {run.entry.name} seed {run.seed}: training in "
              f"{run.directory}", flush=True)
        result = train_and_measure(run, files, bindings, search_paths, config.analysis_batches)
        if result is None:
            print("[compare] Stopped by SIGTERM; rerun the same command to continue.",
                  flush=True)
            return None
        _write_json(run.result_path, result)
        results.append(result)
    summary = {
        "preset": preset,
        "entries": list(config.entries),
        "seeds": list(config.seeds),
        "settings": settings,
        "config": preset_config,
        "corpus": report.corpus_description(settings["MIXTURE_OR_TASK_NAME"]),
        "runs": results,
    }
    _write_json(file_io.join(output, "results.json"), summary)
    paths = report.write_report(summary, output)
    for path in paths:
        print(f"[compare] wrote {path}", flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    parser = gin_cli.make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default", help=f"one of {list(PRESETS)}")
    parser.add_argument("--output", required=True, help="where runs and the report go")
    try:
        args = gin_cli.parse_args(sys.argv[1:] if argv is None else argv, parser)
        compilation_cache.enable()  # the models share programs across seeds and reruns
        files = [preset_file(args.extra.preset), *args.gin_files]
        # None when a SIGTERM stopped training: rerunning continues, as with moe.train.
        run_comparison(files, args.gin_bindings, args.gin_search_paths, args.extra.output,
                       args.extra.preset)
    except ConfigurationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("[compare] Interrupted; rerun the same command to continue.", file=sys.stderr)
        return 1
    return 0


__all__ = ["PRESETS", "ComparisonConfig", "main", "plan_runs", "run_comparison", "run_inputs"]
