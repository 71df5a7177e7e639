"""Plan a training run on a TPU v4 slice without one: `python -m moe.plan`.

    python -m moe.plan --gin_file=models/switch_base.gin --gin_file=runs/pretrain.gin \
        --gin.TASK_FEATURE_LENGTHS="{'inputs': 512, 'targets': 114}" \
        --gin.NUM_EXPERT_PARTITIONS=16 --topology=v4-32 [--json=plan.json]

The gin files and bindings are the trainer's. The configured model's real train step (and
eval step) is compiled for the slice ahead of time on this machine, with the partitioner's
mesh over the slice's chips (libtpu from the `tpu` extra), and the TPU compiler's own analyses
are printed per chip: parameter, optimizer-state and temporary bytes against the chip's HBM,
FLOPs and bytes accessed, the collectives of the compiled program, and a roofline estimate of
the step time. A configuration that does not fit is an error (exit status 2) naming what
overflows and what to change; so is a mesh the model cannot be split over.

Macros the plan does not need (MODEL_DIR, MIXTURE_OR_TASK_NAME, TRAIN_STEPS) may be left
unset; the task is not loaded (the feature lengths and the batch size give the shapes).
"""

import os
import sys

import moe.start_up  # noqa: F401 - first: before JAX and TensorFlow load

if __name__ == "__main__":
    # The host's own backend is only used for tracing: never try to open a TPU here.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from moe.plan import main

    sys.exit(main())

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax

from moe import hlo_collectives, tpu_topology
from moe.entry_point import run_entry_point
from moe.errors import ConfigurationError
from moe.partitioning import Partitioner
from moe.routing.shell import ROUTER_STATE
from moe.trainer import Trainer

GiB = 2**30
# Roofline assumptions, printed with every plan.
ASSUMPTIONS = (
    "step time = max(FLOPs / peak, bytes accessed / HBM bandwidth) + collective bytes / ICI "
    "bandwidth (communication not overlapped with compute: an upper bound); all-reduce bytes "
    "count twice (reduce-scatter + all-gather); FLOPs and bytes are the TPU compiler's cost "
    "analysis per chip, where a loop body (scanned layers, microbatches) counts once"
)
# Macros that runs/*.gin leave required and the plan never reads.
UNUSED_MACROS = {"MODEL_DIR": "/unused", "MIXTURE_OR_TASK_NAME": "unused", "TRAIN_STEPS": 1}


@dataclasses.dataclass
class StepPlan:
    """What the TPU compiler says about one compiled step, per chip."""

    name: str
    compile_s: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    flops: float
    bytes_accessed: float
    collectives: dict[str, dict[str, int]]

    @property
    def peak_bytes(self) -> int:
        """Live bytes at the step's peak: inputs, outputs not aliased to them, temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def roofline(self, chip: tpu_topology.ChipSpec) -> dict[str, float]:
        compute_s = self.flops / chip.peak_bf16_flops
        memory_s = self.bytes_accessed / chip.hbm_bytes_per_s
        sent = sum(c["bytes"] * (2 if kind == "all-reduce" else 1)
                   for kind, c in self.collectives.items())
        comm_s = sent / chip.ici_bytes_per_s
        step_s = max(compute_s, memory_s) + comm_s
        return {"compute_s": compute_s, "memory_s": memory_s, "communication_s": comm_s,
                "step_s": step_s, "flop_utilization": compute_s / step_s if step_s else 0.0}


def _resolved_train_bindings() -> dict[str, Any]:
    """`moe.train.train`'s gin arguments (model, dataset, partitions), references resolved."""
    try:
        bindings = gin.get_bindings("moe.train.train")
    except (ValueError, KeyError) as e:
        raise ConfigurationError(
            f"The gin configuration does not configure moe.train.train ({e}); give a run "
            "gin, e.g. --gin_file=runs/pretrain.gin, with the model gin."
        ) from e
    for name in ("model", "train_dataset_cfg"):
        if name not in bindings:
            raise ConfigurationError(
                f"The gin configuration binds no train.{name}; give a model gin and a run gin "
                "(e.g. --gin_file=models/switch_base.gin --gin_file=runs/pretrain.gin)."
            )
    return bindings


def _shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded abstract arrays."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(tree))


def _compile_or_explain(lowered: Any, step: str, slice_name: str) -> Any:
    """`lowered.compile()`; the TPU compiler's out-of-memory verdict becomes a
    ConfigurationError (exit 2) that names what overflows and what to change."""
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        verdict = next((line for line in lines if "exceeds" in line or "HBM" in line), lines[0])
        raise ConfigurationError(
            f"Does not fit on {slice_name}: the TPU compiler says the {step} step runs out of "
            f"memory ({verdict[:300]}). Raise NUM_MICROBATCHES or set "
            "TransformerConfig.remat = True (activations), raise NUM_EXPERT_PARTITIONS / "
            "NUM_MODEL_PARTITIONS (parameters and optimizer state), or use a larger slice."
        ) from e


def compile_step(name: str, lowered_fn: Any, *args: Any, slice_name: str = "the slice"
                 ) -> StepPlan:
    """Compile `lowered_fn.lower(*args)` and read the TPU compiler's analyses."""
    start = time.perf_counter()
    compiled = _compile_or_explain(lowered_fn.lower(*args), name, slice_name)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, Sequence):  # older JAX: one dict per computation
        cost = cost[0] if cost else {}
    ops = hlo_collectives.collective_ops(compiled.as_text())
    return StepPlan(
        name=name, compile_s=seconds,
        argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
        flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        collectives=hlo_collectives.summarize(ops),
    )


def build_trainer(tpu_slice_name: str) -> tuple[Trainer, dict[str, Any]]:
    """The trainer `moe.train` would build from the parsed gin, on the slice's devices."""
    from moe.train import input_shapes_for

    devices = tpu_topology.slice_devices(tpu_slice_name)
    bindings = _resolved_train_bindings()
    model, cfg = bindings["model"], bindings["train_dataset_cfg"]
    if bindings.get("partitioner") is not None:
        raise ConfigurationError(
            "The gin configuration binds train.partitioner, whose mesh is built from this "
            "machine's devices; moe.plan builds the mesh from the slice's chips. Set "
            "NUM_EXPERT_PARTITIONS / NUM_MODEL_PARTITIONS instead (and "
            "Partitioner.logical_axis_rules for other rules)."
        )
    partitioner = Partitioner(
        bindings.get("num_expert_partitions", 1), bindings.get("num_model_partitions", 1),
        devices=devices,
    )
    if cfg.batch_size % partitioner.num_batch_shards:
        raise ConfigurationError(
            f"BATCH_SIZE={cfg.batch_size} is not divisible by the {partitioner.num_batch_shards} "
            f"batch shards of the mesh {dict(partitioner.mesh.shape)} on {tpu_slice_name}; use a "
            f"multiple of {partitioner.num_batch_shards}."
        )
    converter = model.feature_converter_cls(pack=cfg.pack)
    shapes = input_shapes_for(converter, dict(cfg.task_feature_lengths), cfg.batch_size)
    trainer = Trainer(model=model, partitioner=partitioner, input_shapes=shapes)
    return trainer, {"batch_size": cfg.batch_size,
                     "task_feature_lengths": dict(cfg.task_feature_lengths)}


def plan_steps(trainer: Trainer, with_eval: bool = True, slice_name: str = "the slice"
               ) -> list[StepPlan]:
    """The compiled train step (and eval step) of `trainer`, analysed."""
    batch = trainer.abstract_batch()
    with trainer.partitioner.context():
        steps = [compile_step("train", trainer.train_step, trainer.abstract_state, batch,
                              slice_name=slice_name)]
        if with_eval:
            params = trainer.abstract_state["params"]
            router_state = trainer.abstract_state.get(ROUTER_STATE, {})
            steps.append(compile_step("eval", trainer.eval_step, params, batch, router_state,
                                      slice_name=slice_name))
    return steps


def _overflow_error(report: Mapping[str, Any], slice_name: str, chip: tpu_topology.ChipSpec):
    train = report["steps"]["train"]
    parts = {"parameters": report["parameter_bytes"], "optimizer state":
             report["optimizer_state_bytes"], "temporaries (activations, gradients)":
             train["temp_bytes"]}
    largest = max(parts, key=parts.get)
    fix = {
        "parameters": "raise NUM_EXPERT_PARTITIONS (experts over more chips) or "
                      "NUM_MODEL_PARTITIONS (wide matrices over more chips), or a larger slice",
        "optimizer state": "raise NUM_EXPERT_PARTITIONS or NUM_MODEL_PARTITIONS, or a larger "
                           "slice (Adafactor's factored statistics are already small)",
        "temporaries (activations, gradients)": "raise NUM_MICROBATCHES, lower BATCH_SIZE, "
            "set TransformerConfig.remat = True, or raise NUM_MODEL_PARTITIONS",
    }[largest]
    listed = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in parts.items())
    return ConfigurationError(
        f"Does not fit on {slice_name}: the train step needs {train['peak_bytes'] / GiB:.2f} GiB "
        f"per chip, more than the {chip.usable_hbm_bytes / GiB:.2f} GiB a program may use on "
        f"a {chip.name} chip "
        f"({listed}). The largest is {largest}: {fix}."
    )


def make_report(trainer: Trainer, steps: list[StepPlan], slice_name: str,
                data: Mapping[str, Any]) -> dict[str, Any]:
    """The plan as a JSON-able dict (what `--json` writes)."""
    tpu_slice = tpu_topology.parse_slice(slice_name)
    chip = tpu_slice.chip
    state = trainer.abstract_state
    params = _shard_bytes(state["params"])
    opt = _shard_bytes(state["opt_state"])
    total_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"]))
    return {
        "topology": slice_name, "chips": tpu_slice.chips, "hosts": tpu_slice.hosts,
        "chip": dataclasses.asdict(chip),
        "mesh": dict(trainer.partitioner.mesh.shape),
        **data,
        "num_microbatches": trainer.num_microbatches,
        "total_parameters": total_params,
        "parameter_bytes": params, "optimizer_state_bytes": opt,
        "steps": {s.name: {**dataclasses.asdict(s), "peak_bytes": s.peak_bytes,
                           "roofline": s.roofline(chip)} for s in steps},
        "fits": all(s.peak_bytes <= chip.usable_hbm_bytes for s in steps),
        "assumptions": ASSUMPTIONS,
    }


def _bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_report(report: Mapping[str, Any]) -> str:
    """The plan as the table `moe.plan` prints."""
    chip = tpu_topology.ChipSpec(**{**dataclasses.asdict(tpu_topology.TPU_V4), **report["chip"]})
    lines = [
        f"{report['topology']}: {report['chips']} chips on {report['hosts']} hosts, mesh "
        f"{report['mesh']}, batch {report['batch_size']} x {report['task_feature_lengths']}, "
        f"{report['num_microbatches']} microbatch(es), {report['total_parameters'] / 1e6:,.1f}M "
        "parameters",
        f"chip: {chip.describe()}",
        f"per chip: parameters {_bytes(report['parameter_bytes'])}, optimizer state "
        f"{_bytes(report['optimizer_state_bytes'])}",
        "",
        "| step | peak / chip | of usable HBM | temporaries | TFLOP | GB accessed | "
        "est. step s | FLOP util. | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for step in report["steps"].values():
        roof = step["roofline"]
        lines.append(
            f"| {step['name']} | {_bytes(step['peak_bytes'])} | "
            f"{step['peak_bytes'] / chip.usable_hbm_bytes:.1%} | {_bytes(step['temp_bytes'])} | "
            f"{step['flops'] / 1e12:.4g} | {step['bytes_accessed'] / 1e9:.3g} | "
            f"{roof['step_s']:.3g} | {roof['flop_utilization']:.0%} | {step['compile_s']:.1f} |"
        )
    lines += ["", "| step | collective | count (static) | bytes / chip |", "|---|---|---|---|"]
    for step in report["steps"].values():
        for kind, c in step["collectives"].items():
            if c["count"]:
                lines.append(f"| {step['name']} | {kind} | {c['count']} | {_bytes(c['bytes'])} |")
    lines += ["", f"assumptions: {report['assumptions']}"]
    return "\n".join(lines)


def plan(topology: str = "v4-8", json_path: str | None = None,
         with_eval: bool = True) -> dict[str, Any]:
    """Compile the configured train (and eval) step for `topology` and report it."""
    trainer, data = build_trainer(topology)
    steps = plan_steps(trainer, with_eval, topology)
    report = make_report(trainer, steps, topology, data)
    print(format_report(report), flush=True)
    if json_path:
        from moe import file_io

        file_io.write_text(json_path, json.dumps(report, indent=2) + "\n")
    if not report["fits"]:
        raise _overflow_error(report, topology, tpu_topology.parse_slice(topology).chip)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--topology", default="v4-8",
                        help=f"TPU v4 slice, one of {tpu_topology.known_slices()}")
    parser.add_argument("--json", default=None, help="also write the plan as JSON here")
    parser.add_argument("--no_eval", action="store_true", help="compile the train step only")
    own, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    # Macros the run gins leave required and the plan never reads: set unless given.
    rest += [f"--gin.{macro}={value!r}" for macro, value in UNUSED_MACROS.items()
             if not any(arg.startswith((f"--gin.{macro}=", f"--gin_bindings={macro}"))
                        for arg in rest)]
    code, _ = run_entry_point(
        "Compile the configured model's train step for a TPU v4 slice, deviceless, and "
        "report memory, FLOPs, collectives and a step-time estimate per chip "
        "(--topology=v4-32, --json=FILE, --no_eval).",
        lambda: plan(own.topology, own.json, not own.no_eval), rest,
    )
    return code
