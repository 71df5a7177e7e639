"""The TPU v4 plan table of the published models: `python -m moe.plan_table`.

    python -m moe.plan_table --output=docs/tpu_plan.md [--json=docs/tpu_plan.json] \
        [--configs=switch_base,st_moe_32b] [--scan_layers=switch_xxl] [--timeout_s=600] \
        [--start_slice=v4-64] [--end_slice=v4-1024] [--from_json=a.json,b.json]

For each model (`CONFIGS`) at its pretraining shapes, in bfloat16 activations, this finds the
smallest TPU v4 slice its train step fits on with the partitioning `tpu_scripts/README.md`
recommends: NUM_EXPERT_PARTITIONS = min(NUM_EXPERTS, chips / NUM_MODEL_PARTITIONS) and
NUM_MODEL_PARTITIONS = 1, raised to 2 then 4 only when it does not fit. Each plan is
`moe.plan`'s: the real train step compiled ahead of time by the TPU compiler (libtpu), with
its memory, FLOPs, collectives and roofline step time per chip.

Search order, per slice from the smallest: the model partitions 1, 2, 4 (2 and 4 only when
the parameters and optimizer state take more than half a chip at 1); then, at each model
partition compiled on the slice, in the same order, its activation-memory savers, cheapest first:
`TransformerConfig.remat = True`, then remat with NUM_MICROBATCHES 2, 4, 8 (a microbatch not a
multiple of the batch shards is skipped). Only then the next slice: a bigger slice costs
chips, a saver costs step time. For an MoE model whose gin GROUP_SIZE gives some stack a
group count the batch shards (data x expert) cannot split evenly, the candidate carries the
largest GROUP_SIZE below it that splits (`split_group_size`): uneven groups make XLA gather the
layer's tokens, which is what made the temporaries grow with the data axis.

Scanned layers (`--scan_layers`) compile one block per stack instead of every layer (0.5-3
minutes per candidate instead of 5-8 for the big models on a 2-core host). The compiler's cost
analysis then counts the loop body once, as it does a microbatch: the FLOPs, step time,
utilization and tokens/s of such a row are marked per loop body (†), not scaled, since what
lies outside the loops (embeddings, logits, optimizer) is counted once either way and cannot
be told apart from the totals.
Memory figures are the whole step's.

Why subprocesses: gin's configuration is global, and a compile of a big model on a small host
can take longer than one is willing to wait. A worker process (`--worker`, this module again)
walks the candidates of one model in search order, rejecting without compiling those whose
float32 parameters and optimizer state alone exceed a chip's memory (a sound lower bound on
the step's peak: they are its arguments), and compiles at most one candidate before exiting.
The parent starts a fresh worker for the next candidate, kills one that runs past the timeout,
and writes the table (markdown and JSON) after every model, so a partial run leaves a partial
table.
"""

import os
import sys

import moe.start_up  # noqa: F401 - first: before JAX and TensorFlow load

if __name__ == "__main__":
    # Only the host's CPU backend is used (for tracing): never try to open a TPU here.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from moe.plan_table import main

    sys.exit(main())

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import platform
import re
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from moe import tpu_topology
from moe.errors import ConfigurationError
from moe.moe_layer import group_shape

GiB = 2**30
MODEL_PARTITIONS = (1, 2, 4)
NOT_PUBLISHED = "not published here"
SCAN_BINDING = "TransformerConfig.scan_layers = True"
REMAT_BINDING = "TransformerConfig.remat = True"
MICROBATCHES = (2, 4, 8)
ENCODER_DECODER_LENGTHS = {"inputs": 512, "targets": 114}
DECODER_ONLY_LENGTHS = {"targets": 1024}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One row of the table: a model gin at its pretraining shapes."""

    key: str
    title: str
    gin_file: str
    num_experts: int | None  # None: dense (the batch is split over every chip)
    feature_lengths: Mapping[str, int]
    batch_size: int = 256
    published: str = NOT_PUBLISHED
    group_size: int = 4096  # the model gin's GROUP_SIZE (a test checks it)

    def bindings(self, expert_partitions: int, model_partitions: int,
                 scan_layers: bool = False, remat: bool = False, microbatches: int = 1,
                 group_size: int | None = None) -> list[str]:
        """The gin bindings of one candidate (with `runs/pretrain.gin` after the model gin)."""
        from moe.plan import UNUSED_MACROS

        savers = [*([REMAT_BINDING] if remat else []),
                  *([f"NUM_MICROBATCHES = {microbatches}"] if microbatches > 1 else []),
                  *([f"GROUP_SIZE = {group_size}"] if group_size else [])]
        bindings = [
            "ACTIVATION_DTYPE = 'bfloat16'",
            f"TASK_FEATURE_LENGTHS = {dict(self.feature_lengths)!r}",
            f"BATCH_SIZE = {self.batch_size}",
            f"NUM_EXPERT_PARTITIONS = {expert_partitions}",
            f"NUM_MODEL_PARTITIONS = {model_partitions}",
            *(f"{macro} = {value!r}" for macro, value in UNUSED_MACROS.items()),
        ]
        return [*bindings, *savers, *([SCAN_BINDING] if scan_layers else [])]

    def stack_lengths(self) -> tuple[int, ...]:
        """The sequence length each MoE stack sees (encoder inputs, decoder targets)."""
        return tuple(self.feature_lengths.values())


CONFIGS = (
    ModelSpec("t5_1_1_base", "T5.1.1-Base (dense)", "models/t5_1_1_base.gin", None,
              ENCODER_DECODER_LENGTHS),
    ModelSpec("switch_base", "Switch-Base-128", "models/switch_base.gin", 128,
              ENCODER_DECODER_LENGTHS, group_size=8192),
    ModelSpec("switch_large", "Switch-Large-128", "models/switch_large.gin", 128,
              ENCODER_DECODER_LENGTHS),
    ModelSpec("switch_xxl", "Switch-XXL", "models/switch_xxl.gin", 128,
              ENCODER_DECODER_LENGTHS),
    ModelSpec("st_moe_32b", "ST-MoE-32B", "models/st_moe_32b.gin", 64, ENCODER_DECODER_LENGTHS),
    ModelSpec("ec_0p1b_64e", "Expert Choice 0.1B/64E (decoder-only)",
              "models/decoder_only_0p1b_64e.gin", 64, DECODER_ONLY_LENGTHS),
    ModelSpec("ec_8b_64e", "Expert Choice 8B/64E (decoder-only)",
              "models/decoder_only_8b_64e.gin", 64, DECODER_ONLY_LENGTHS),
)
CONFIG_BY_KEY = {spec.key: spec for spec in CONFIGS}


# --- The search -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Candidate:
    """A slice and partitioning to try; `skip` says why it cannot be tried at all."""

    slice_name: str
    chips: int
    model: int
    expert: int
    skip: str | None = None
    remat: bool = False
    microbatches: int = 1
    group_size: int | None = None  # None: the model gin's GROUP_SIZE

    @property
    def data(self) -> int:
        return self.chips // (self.model * self.expert)

    @property
    def saver(self) -> bool:
        """Whether this candidate trades compute for activation memory (remat, microbatches)."""
        return self.remat or self.microbatches > 1

    @property
    def settings(self) -> list[str]:
        """What this candidate changes beyond the mesh: remat, microbatches, GROUP_SIZE."""
        return [*(["remat"] if self.remat else []),
                *([f"{self.microbatches} microbatches"] if self.microbatches > 1 else []),
                *([f"GROUP_SIZE {self.group_size}"] if self.group_size else [])]

    @property
    def label(self) -> str:
        return (f"{self.slice_name} (data {self.data}, expert {self.expert}, model {self.model}"
                + "".join(f", {e}" for e in self.settings) + ")")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def expert_partitions(num_experts: int | None, devices: int) -> int:
    """The expert axis the recommended partitioning gives on `devices` (= chips / model):
    the largest divisor of both that is at most NUM_EXPERTS (the partitioner's rule applied to
    NUM_EXPERT_PARTITIONS = min(NUM_EXPERTS, devices)); 1 for a dense model."""
    if not num_experts:
        return 1
    return max(d for d in range(1, min(num_experts, devices) + 1)
               if devices % d == 0 and num_experts % d == 0)


def _groups(tokens: int, group_size: int, expert: int) -> int:
    """The MoE layer's group count ('fewest' formula)."""
    return group_shape(tokens, group_size, expert)[0]


def split_group_size(stack_tokens: Sequence[int], default: int, expert: int,
                     shards: int) -> int | None:
    """None when the model gin's GROUP_SIZE `default` already gives every MoE stack (tokens
    per microbatch each) a group count that the mesh's batch shards (data x expert) split
    evenly; else the group sizes of the largest GROUP_SIZE below it that does, written as the
    tokens per group they give (e.g. 2048 rather than 4095 for 64 x 4096 tokens on 128 batch
    shards: the same groups). Uneven groups make XLA gather the layer's tokens across devices
    (the MoE layer warns), which is what made the temporaries of a wide data axis grow."""
    def splits(size: int) -> bool:
        return all(_groups(n, size, expert) % shards == 0 for n in stack_tokens)

    if splits(default):
        return None
    size = next((s for s in range(default - 1, 0, -1) if splits(s)), None)
    if size is None:
        return None
    tokens = max(math.ceil(n / _groups(n, size, expert)) for n in stack_tokens)
    same = all(_groups(n, tokens, expert) == _groups(n, size, expert) for n in stack_tokens)
    return tokens if same else size


def candidates(num_experts: int | None, batch_size: int,
               slices: Sequence[str] | None = None,
               model_partitions: Sequence[int] = MODEL_PARTITIONS,
               stack_lengths: Sequence[int] = (), group_size: int = 4096,
               savers: bool = True) -> list[Candidate]:
    """Every candidate in search order: slices from the smallest; on each slice the model
    partitions in the order they are raised, then (`savers`) the activation-memory savers per
    model partition: remat, then remat with NUM_MICROBATCHES 2, 4, 8 (`_after` keeps those of
    the model partitions compiled on the slice). A candidate whose batch (or microbatch)
    is not a multiple of its batch shards (data x expert = chips / model) is kept with its
    `skip` reason: the table says it was passed over rather than silently leaving it out. For
    an MoE model with `stack_lengths`, GROUP_SIZE is lowered where the gin's would give group
    counts the batch shards cannot split (`split_group_size`)."""
    variants = [(False, 1)] + ([(True, 1), *((True, m) for m in MICROBATCHES)] if savers else [])
    found = []
    for name in slices or tpu_topology.known_slices():
        chips = tpu_topology.parse_slice(name).chips
        plain, saving = [], []
        for model in model_partitions:
            if chips % model:
                continue
            expert = expert_partitions(num_experts, chips // model)
            shards = chips // model
            for remat, micro in variants:
                skip, size = None, None
                if (batch_size // micro) % shards or batch_size % micro:
                    what = (f"BATCH_SIZE {batch_size}" if micro == 1 else f"the microbatch of "
                            f"{batch_size // micro} (BATCH_SIZE {batch_size} / {micro})")
                    skip = (f"{what} is not a multiple of its {shards} batch shards "
                            "(data x expert)")
                elif num_experts and stack_lengths:
                    size = split_group_size([batch_size // micro * n for n in stack_lengths],
                                            group_size, expert, shards)
                cand = Candidate(name, chips, model, expert, skip, remat, micro, size)
                (saving if cand.saver else plain).append(cand)
        found += plain + saving
    return found


# --- The worker: one model, at most one compile -----------------------------------------------

def _record(path: str, **entry: Any) -> None:
    """Append one attempt to the worker's result file, at once: a killed worker leaves what
    it had done (its last entry, 'compiling', is what timed out)."""
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()


def _out_of_memory(error: Exception) -> str | None:
    """The TPU compiler's own out-of-memory message, if `error` is one (else None)."""
    text = str(error)
    verdict = re.search(r"RESOURCE_EXHAUSTED[^\n]*?exceeds available HBM \([\d.]+G\)", text)
    if verdict:
        return verdict.group(0)
    if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text:
        return text.strip().splitlines()[0]
    return None


def run_worker(spec: ModelSpec, todo: Sequence[Candidate], result_path: str,
               scan_layers: bool = False) -> None:
    """Walk `todo` in order; reject by the lower bound without compiling; compile the first
    candidate that passes it, record the outcome and return."""
    import gin
    import jax

    from moe import gin_cli, plan

    total_bytes = None
    too_big: dict[tuple[int, int], str] = {}  # (chips, model) -> why: the savers do not help
    for cand in todo:
        base = {"candidate": cand.to_json()}
        if cand.skip:
            _record(result_path, **base, status="skipped", reason=cand.skip)
            continue
        if (cand.chips, cand.model) in too_big:
            _record(result_path, **base, status="too_big", reason=too_big[cand.chips, cand.model])
            continue
        if total_bytes is not None and total_bytes / cand.chips > tpu_topology.TPU_V4.hbm_bytes:
            _record(result_path, **base, status="too_big", reason=(
                f"even split over all {cand.chips} chips the parameters need "
                f"{total_bytes / cand.chips / GiB:.1f} GiB per chip"))
            continue
        gin.clear_config()
        try:
            gin_cli.parse_gin([spec.gin_file, "runs/pretrain.gin"],
                              spec.bindings(cand.expert, cand.model, scan_layers, cand.remat,
                                            cand.microbatches, cand.group_size))
            trainer, data = plan.build_trainer(cand.slice_name)
        except ConfigurationError as e:  # a gin or mesh the model cannot be built with
            _record(result_path, **base, status="error", reason=str(e).splitlines()[0])
            return
        state = trainer.abstract_state
        total_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["params"]))
        held = plan._shard_bytes(state["params"]) + plan._shard_bytes(state["opt_state"])
        if held > tpu_topology.TPU_V4.hbm_bytes:
            too_big[cand.chips, cand.model] = (
                f"parameters + optimizer state alone are {held / GiB:.1f} GiB per chip")
            _record(result_path, **base, status="too_big", reason=too_big[cand.chips, cand.model])
            continue
        base["held_bytes"] = held
        _record(result_path, **base, status="compiling")
        try:
            steps = plan.plan_steps(trainer, with_eval=False)
        except Exception as e:  # the TPU compiler's refusal; anything else is reported as is
            oom = _out_of_memory(e)
            status, reason = ("does_not_fit", oom) if oom else (
                "error", f"{type(e).__name__}: {str(e).strip().splitlines()[0]}")
            _record(result_path, **base, status=status, reason=reason)
            return
        report = plan.make_report(trainer, steps, cand.slice_name, data)
        if report["fits"]:
            _record(result_path, **base, status="fits", report=report)
        else:
            train = report["steps"]["train"]
            _record(result_path, **base, status="does_not_fit", report=report, reason=(
                f"the train step's peak is {train['peak_bytes'] / GiB:.1f} GiB per chip"))
        return


# --- The parent: fresh workers, timeouts ------------------------------------------------------

def _read_entries(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _worker_command(spec: ModelSpec, todo: Sequence[Candidate], result_path: str,
                    scan_layers: bool) -> list[str]:
    command = [sys.executable, "-m", "moe.plan_table", "--worker", f"--configs={spec.key}",
               f"--candidates={json.dumps([c.to_json() for c in todo])}",
               f"--result={result_path}"]
    return [*command, "--scan_layers=" + spec.key] if scan_layers else command


def search(spec: ModelSpec, timeout_s: float, scan_layers: bool = False,
           log: Callable[[str], None] = print, max_timeouts: int = 2,
           progress: Callable[[dict[str, Any]], None] | None = None,
           start_slice: str | None = None, end_slice: str | None = None) -> dict[str, Any]:
    """The smallest fitting candidate of `spec`, with every attempt before it (among the slices
    from `start_slice` to `end_slice`, when given).

    A compile that runs past `timeout_s` is killed and listed as a timeout (that candidate is
    undecided; so is one whose worker was killed, e.g. by the host running out of memory) and
    the search goes on with the next one, bigger slices compiling faster when memory is less
    tight; after `max_timeouts` of them the model is given up.
    """
    todo = candidates(spec.num_experts, spec.batch_size, stack_lengths=spec.stack_lengths(),
                      group_size=spec.group_size)
    attempts: list[dict[str, Any]] = []
    if start_slice:  # smaller slices listed as not tried, so the row does not claim them
        first = tpu_topology.known_slices().index(tpu_topology.parse_slice(start_slice).name)
        passed = [c for c in todo if c.slice_name in tpu_topology.known_slices()[:first]]
        attempts += [{"candidate": c.to_json(), "status": "not_tried",
                      "reason": f"the search was started at {start_slice} (--start_slice)"}
                     for c in passed]
        todo = todo[len(passed):]
    if end_slice:
        last = tpu_topology.known_slices().index(tpu_topology.parse_slice(end_slice).name)
        todo = [c for c in todo if c.slice_name in tpu_topology.known_slices()[:last + 1]]
    started = time.perf_counter()
    timeouts = 0
    while todo:
        with tempfile.TemporaryDirectory() as tmp:
            result_path = os.path.join(tmp, "attempts.jsonl")
            command = _worker_command(spec, todo, result_path, scan_layers)
            with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) as proc:
                try:
                    output, _ = proc.communicate(timeout=timeout_s)
                    timed_out = False
                except subprocess.TimeoutExpired:
                    proc.kill()
                    output, _ = proc.communicate()
                    timed_out = True
                except BaseException:  # interrupted (SIGTERM, Ctrl-C): no orphaned compile
                    proc.kill()
                    raise
            entries = _read_entries(result_path)
        for entry in entries:
            log(f"  {spec.key}: {entry['status']:<12} {Candidate(**entry['candidate']).label}"
                + (f": {entry['reason']}" if entry.get("reason") else ""))
        done = [e for e in entries if e["status"] != "compiling"]
        attempts += done
        if progress:  # the attempts so far, written out in case the search is stopped
            progress(_result(spec, "not_finished", attempts, started, scan_layers,
                             "the search was stopped before it finished"))
        last = entries[-1] if entries else None
        killed = proc.returncode is not None and proc.returncode < 0
        if (timed_out or killed) and last and last["status"] == "compiling":
            timeouts += 1
            reason = (f"compile did not finish in {timeout_s:.0f} s" if timed_out else
                      f"compile killed by signal {-proc.returncode} (SIGKILL: most likely the "
                      "host's out-of-memory killer)")
            attempts.append({"candidate": last["candidate"], "status": "timeout",
                             "reason": reason})
            log(f"  {spec.key}: timeout      {Candidate(**last['candidate']).label}")
            if timeouts >= max_timeouts:
                return _result(spec, "failed", attempts, started, scan_layers,
                               f"{reason} on {timeouts} candidates; gave up")
            todo = _after(todo[len(done) + 1:], last)
            continue
        if timed_out or proc.returncode or last is None or last["status"] == "compiling":
            where = Candidate(**last["candidate"]).label if last else "before any candidate"
            lines = [line for line in output.strip().splitlines() if line.strip()]
            reason = (f"timed out after {timeout_s:.0f} s on {where}" if timed_out
                      else f"worker failed (exit status {proc.returncode}) on {where}: "
                      f"{lines[-1] if lines else 'no output'}")
            return _result(spec, "failed", attempts, started, scan_layers, reason)
        if last["status"] in ("fits", "error"):
            return _result(spec, last["status"], attempts, started, scan_layers,
                           last.get("reason"))
        todo = _after(todo[len(done):], last)
    return _result(spec, "no_fit", attempts, started, scan_layers,
                   f"no v4 slice up to {end_slice or tpu_topology.known_slices()[-1]} fits with "
                   f"NUM_MODEL_PARTITIONS <= {MODEL_PARTITIONS[-1]} at BATCH_SIZE "
                   f"{spec.batch_size}")


def _after(todo: list[Candidate], failed: Mapping[str, Any]) -> list[Candidate]:
    """`todo` after a compiled candidate failed (or timed out), with skips added on its slice.

    NUM_MODEL_PARTITIONS is raised as tpu_scripts/README.md calls for: only when a chip cannot
    hold its parameters and optimizer state, not when the temporaries overflow (more model
    partitions then mean fewer batch shards, so more tokens per chip). The activation-memory
    savers (remat, microbatches) of a model partition are tried when its plain candidate was
    compiled: those of the model partitions not raised to are skipped with them (those of one
    too big for its parameters are rejected as too big by the worker)."""
    cand, held = Candidate(**failed["candidate"]), failed.get("held_bytes")
    if held is None or cand.saver or cand.model != 1 or held > tpu_topology.TPU_V4.hbm_bytes / 2:
        return todo
    reason = (f"not tried: with NUM_MODEL_PARTITIONS = 1 the parameters and optimizer state "
              f"take {held / GiB:.1f} GiB per chip (the rest is temporaries), and the model "
              "partitions are raised only when those do not fit")
    return [dataclasses.replace(c, skip=reason) if c.slice_name == cand.slice_name
            and c.model > cand.model and not c.skip else c for c in todo]


def _result(spec: ModelSpec, status: str, attempts: list[dict[str, Any]], started: float,
            scan_layers: bool, reason: str | None) -> dict[str, Any]:
    fit = attempts[-1] if status == "fits" else None
    return {"config": spec.key, "title": spec.title, "gin_file": spec.gin_file,
            "batch_size": spec.batch_size, "feature_lengths": dict(spec.feature_lengths),
            "published": spec.published, "scan_layers": scan_layers, "status": status,
            "reason": reason, "report": fit["report"] if fit else None,
            "search_s": time.perf_counter() - started,
            "attempts": [{k: v for k, v in a.items() if k != "report"} for a in attempts]}


# --- The table --------------------------------------------------------------------------------

COLUMNS = ("model", "parameters", "slice", "mesh (data, expert, model)", "params / chip",
           "optimizer / chip", "peak / chip (of 30.75 GiB usable)", "TFLOP / step / chip",
           "est. step s", "FLOP util.", "est. tokens/s", "compile s", "published throughput")


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def tokens_per_step(report: Mapping[str, Any]) -> int:
    """Tokens of one global batch: every feature length (inputs and targets) x batch."""
    return report["batch_size"] * sum(report["task_feature_lengths"].values())


def _closest(attempts: Sequence[Mapping[str, Any]]) -> str | None:
    """The compiled candidate that missed by least (the TPU compiler's temporaries or the
    step's peak, in GiB), for the row of a model that fits nowhere searched."""
    misses = []
    for attempt in attempts:
        found = re.search(r"temporaries \(([\d.]+)G\)|peak is ([\d.]+) GiB",
                          attempt.get("reason") or "")
        if attempt["status"] == "does_not_fit" and found:
            gib = float(found.group(1) or found.group(2))
            what = "temporaries" if found.group(1) else "peak"
            held = attempt.get("held_bytes")
            misses.append((gib, f"{Candidate(**attempt['candidate']).label}, {what} {gib:g} "
                                f"GiB > {tpu_topology.TPU_V4.usable_hbm_bytes / GiB:g}"
                                + (f" (parameters + optimizer state alone {held / GiB:.1f} GiB "
                                   "per chip)" if held else "")))
    return min(misses)[1] if misses else None


def format_row(row: Mapping[str, Any]) -> str:
    """One markdown table row for a search result (`search`'s dict)."""
    title = row["title"] + (" (scanned layers*)" if row.get("scan_layers") else "")
    report = row.get("report")
    if row["status"] != "fits" or not report:
        closest = _closest(row.get("attempts") or ())
        reason = (row.get("reason") or "") + (f"; closest: {closest}" if closest else "")
        cells = [title, "", row["status"].replace("_", " "), reason]
        cells += [""] * (len(COLUMNS) - len(cells) - 1) + [row["published"]]
        return "| " + " | ".join(cells) + " |"
    train = report["steps"]["train"]
    chip = tpu_topology.TPU_V4  # every slice planned here is a v4
    roof = train["roofline"]
    mesh = report["mesh"]
    undecided = [a for a in row.get("attempts", ()) if a["status"] in ("timeout", "not_tried")]
    slice_cell = report["topology"] + (" (smaller: undecided, see below)" if undecided else "")
    fit = Candidate(**row["attempts"][-1]["candidate"]) if row.get("attempts") else None
    extras = fit.settings if fit else []
    # A loop (scanned layers, microbatches) is counted once by the cost analysis: see the note.
    looped = "†" if row.get("scan_layers") or (fit and fit.microbatches > 1) else ""
    cells = [
        title, _params(report["total_parameters"]), slice_cell,
        f"({mesh['data']}, {mesh['expert']}, {mesh['model']})"
        + (f" {', '.join(extras)}" if extras else ""),
        _gib(report["parameter_bytes"]), _gib(report["optimizer_state_bytes"]),
        f"{_gib(train['peak_bytes'])} ({train['peak_bytes'] / chip.usable_hbm_bytes:.0%})",
        f"{train['flops'] / 1e12:.3g}{looped}", f"{roof['step_s']:.3g}{looped}",
        f"{roof['flop_utilization']:.0%}{looped}",
        f"{tokens_per_step(report) / roof['step_s']:,.0f}{looped}",
        f"{train['compile_s']:.0f}", row["published"],
    ]
    return "| " + " | ".join(cells) + " |"


def _runs(attempts: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Consecutive attempts grouped where they were passed over for the same reason (not
    compiled: skipped, not tried, too big); each compiled one is a group of its own."""
    runs: list[list[Mapping[str, Any]]] = []
    for a in attempts:
        same = runs and a["status"] in ("skipped", "not_tried", "too_big") and (
            runs[-1][-1]["status"], runs[-1][-1].get("reason")) == (a["status"], a.get("reason"))
        if same:
            runs[-1].append(a)
        else:
            runs.append([a])
    return runs


def format_search(row: Mapping[str, Any]) -> str:
    """The attempts before the answer: why each smaller slice was passed over."""
    lines = [f"- **{row['title']}** ({row['gin_file']}, batch {row['batch_size']} x "
             f"{row['feature_lengths']}"
             + (f", search {row['search_s']:.0f} s):" if row["search_s"] else "):")]
    for run in _runs(row["attempts"]):
        label = Candidate(**run[0]["candidate"]).label
        if len(run) > 1:  # e.g. every smaller slice not tried: one line
            label = (f"{len(run)} candidates from {label} to "
                     f"{Candidate(**run[-1]['candidate']).label}")
        reason = f": {run[0]['reason']}" if run[0].get("reason") else ""
        lines.append(f"  - {label}: {run[0]['status'].replace('_', ' ')}{reason}")
    if row["status"] not in ("fits",):
        lines.append(f"  - result: {row['status'].replace('_', ' ')}: {row.get('reason')}")
    elif row["attempts"] and not any("remat" in a["candidate"] for a in row["attempts"]):
        lines.append("  - searched before remat and microbatches were part of the search: a "
                     "smaller slice with them was not tried")
    return "\n".join(lines)


def machine() -> str:
    """Where and with what the table was made (the compiler's version decides its numbers)."""
    try:
        libtpu = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        libtpu = "unknown"
    import jax

    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, Python "
            f"{platform.python_version()}, jax {jax.__version__}, libtpu {libtpu}")


def format_table(rows: Sequence[Mapping[str, Any]], command: str, made: str,
                 made_on: str, merged_from: Sequence[str] = ()) -> str:
    """The whole markdown document (`merged_from`: the commands of the runs whose rows it
    shows, when it was written by --from_json)."""
    from moe.plan import ASSUMPTIONS

    any_scanned = any(r.get("scan_layers") for r in rows)
    lines = [
        "# TPU v4 plan of the published models",
        "",
        f"Made {made} on {made_on}, without a TPU: each model's train step is compiled "
        "ahead of time by the TPU compiler (libtpu) for the slice, as `python -m moe.plan` "
        "does. Regenerate with:",
        "",
        "```",
        command,
        "```",
        "",
        *([f"This table was assembled (`--from_json`) from the rows of {len(merged_from)} "
           "runs made side by side, each over part of the models:", "", "```", *merged_from,
           "```", ""] if merged_from else []),
        "Setup: `runs/pretrain.gin` (Adafactor, float32 parameters), bfloat16 activations "
        "(`ACTIVATION_DTYPE = 'bfloat16'`, T5X's default), BATCH_SIZE 256 for every model. "
        "Encoder-decoder models: TASK_FEATURE_LENGTHS `{'inputs': 512, 'targets': 114}` (T5X's "
        "span-corruption pretraining shapes). Decoder-only Expert Choice models: "
        "`{'targets': 1024}` (the sequence length of the Expert Choice paper; its batch size "
        "is not restated in this repository, so 256 is assumed). Train step only.",
        "",
        f"Search: slices from v4-8 upward ({', '.join(tpu_topology.known_slices())}); on each, "
        "NUM_EXPERT_PARTITIONS = min(NUM_EXPERTS, chips / NUM_MODEL_PARTITIONS) with "
        "NUM_MODEL_PARTITIONS = 1, then 2, then 4 (tpu_scripts/README.md, section 4); the "
        "dense model is pure data parallel. Then the activation-memory savers, at each "
        "model partition compiled on the slice: `TransformerConfig.remat = True`, then remat "
        "with NUM_MICROBATCHES 2, 4, 8 (each microbatch a multiple of the batch shards). For "
        "an MoE model whose GROUP_SIZE would give a group count the batch shards (data x "
        "expert) cannot split evenly (XLA then gathers the layer's tokens), GROUP_SIZE is "
        "lowered to the largest value below the gin's that splits, per stack and microbatch; "
        "the mesh cell names it. The first candidate whose train step compiles "
        "within the chip's memory is the row. A slice whose batch shards (data x expert) do "
        "not divide BATCH_SIZE is skipped (the batch is not raised). A candidate whose "
        "float32 parameters and optimizer state alone exceed 32 GiB per chip is rejected "
        "without compiling (they are the step's arguments, so its peak is larger still); "
        "'does not fit' otherwise is the TPU compiler's own verdict (it allows a program "
        "30.75 GiB of a chip's 32 GiB). Every rejected candidate is listed under the table.",
        "",
        f"Roofline ({tpu_topology.TPU_V4.describe()}): {ASSUMPTIONS}. Estimated tokens/s = "
        "BATCH_SIZE x (sum of the feature lengths) / estimated step time, for the whole slice.",
    ]
    if any_scanned:
        lines += ["", "*Scanned layers (`TransformerConfig.scan_layers = True`): each stack "
                  "is one `nn.scan` over its repeating block of layers, compiled once; the "
                  "memory figures are the whole step's, for the scanned program. Without remat "
                  "its temporaries can be well above the unrolled step's (the scan keeps every "
                  "iteration's residuals), so a scanned candidate that does not fit is not "
                  "proof that the unrolled one does not."]
    if any_scanned or any(r.get("attempts") and r["status"] == "fits"
                          and r["attempts"][-1]["candidate"].get("microbatches", 1) > 1
                          for r in rows):
        lines += ["", "†Per loop body, not per step: the compiler's cost analysis counts a "
                  "loop body (the scanned block of layers, forward and backward; a microbatch) "
                  "once, and what lies outside the loops (embeddings, logits, loss, optimizer) "
                  "once too, so the step's FLOPs are not a fixed multiple of these and are not "
                  "scaled here. Memory is the whole step's."]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [format_row(r) for r in rows]
    lines += ["", "Published throughput: no paper or T5X document this repository draws on "
              "gives an absolute training throughput (tokens/s or steps/s on a named slice) "
              "for these models. Relative figures published: the Switch Transformer paper "
              "reports that Switch-Base with 64 experts reaches T5-Base's quality in 1/7 of "
              "the training time; the Expert Choice paper, that a GShard top-2 step is about "
              "20% slower than an expert choice (capacity factor 2) step; ST-MoE, that raising "
              "the train capacity factor from 1.25 to 2.0 costs about 7% step time.",
              "", "## Search", ""]
    lines += [format_search(r) for r in rows]
    return "\n".join(lines) + "\n"


# --- Command line -----------------------------------------------------------------------------

def _parse_configs(text: str | None) -> list[ModelSpec]:
    if not text:
        return list(CONFIGS)
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CONFIG_BY_KEY]
    if unknown:
        raise ConfigurationError(
            f"Unknown --configs {unknown}; choose from {sorted(CONFIG_BY_KEY)}.")
    return [CONFIG_BY_KEY[k] for k in keys]


def _write(path: str, text: str) -> None:
    from moe import file_io

    file_io.write_text(path, text)


def _not_run(spec: ModelSpec) -> dict[str, Any]:
    """The row of a model whose search did not finish in the runs the table is made from."""
    return {"config": spec.key, "title": spec.title, "gin_file": spec.gin_file,
            "batch_size": spec.batch_size, "feature_lengths": dict(spec.feature_lengths),
            "published": spec.published, "scan_layers": False, "status": "not_finished",
            "reason": "the search did not finish in the time this table was made in",
            "report": None, "search_s": 0.0, "attempts": []}


def _continued(earlier: Mapping[str, Any], later: Mapping[str, Any]) -> dict[str, Any]:
    """`later`, whose search was started at a bigger slice (--start_slice), with the attempts
    `earlier` made on the slices it lists as not tried in their place: one search in two runs."""
    def slice_of(attempt: Mapping[str, Any]) -> str:
        return attempt["candidate"]["slice_name"]

    skipped = {slice_of(a) for a in later["attempts"] if a["status"] == "not_tried"}
    before = [a for a in earlier["attempts"]
              if slice_of(a) in skipped and a["status"] != "not_tried"]
    if not before:
        return dict(later)
    covered = {slice_of(a) for a in before}
    rest = [a for a in later["attempts"]
            if not (a["status"] == "not_tried" and slice_of(a) in covered)]
    order = tpu_topology.known_slices()
    attempts = sorted(before + rest, key=lambda a: order.index(slice_of(a)))  # stable
    return {**later, "attempts": attempts,
            "search_s": later["search_s"] + earlier["search_s"]}


def _from_json(paths: Sequence[str], specs: Sequence[ModelSpec], output: str,
               json_path: str | None) -> int:
    """The table of earlier runs' rows (e.g. two halves of the models searched at once)."""
    from moe import file_io

    runs = [json.loads(file_io.read_text(p)) for p in paths]
    rows_by_key: dict[str, dict[str, Any]] = {}
    for run in runs:  # a later run's row wins; it continues an earlier one's search
        for row in run["rows"]:
            earlier = rows_by_key.get(row["config"])
            rows_by_key[row["config"]] = _continued(earlier, row) if earlier else row
    rows = [rows_by_key.get(s.key) or _not_run(s) for s in specs]
    made = " and ".join(sorted({run["made"] for run in runs}))
    # A merged run stands for the runs it was merged from.
    commands = list(dict.fromkeys(command for run in runs
                                  for command in run.get("merged_from") or [run["command"]]))
    regenerate = "python -m moe.plan_table " + " ".join(
        [f"--output={shlex.quote(output)}"] + ([f"--json={shlex.quote(json_path)}"] if json_path
                                               else []))
    if [s.key for s in specs] != [s.key for s in CONFIGS]:
        regenerate += " --configs=" + ",".join(s.key for s in specs)
    scanned = [row["config"] for row in rows if row.get("scan_layers")]
    if scanned:
        regenerate += " --scan_layers=" + ",".join(scanned)
    text = format_table(rows, regenerate, made, runs[0]["machine"], commands)
    _write(output, text)
    if json_path:
        _write(json_path, json.dumps({"made": made, "machine": runs[0]["machine"],
                                      "command": regenerate, "merged_from": commands,
                                      "rows": rows}, indent=2) + "\n")
    print(text, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="docs/tpu_plan.md", help="the markdown table")
    parser.add_argument("--json", default=None, help="also write every result as JSON here")
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated subset of {[s.key for s in CONFIGS]}")
    parser.add_argument("--scan_layers", default="",
                        help="comma-separated configs compiled with scanned layers")
    parser.add_argument("--timeout_s", type=float, default=600.0,
                        help="kill a worker (one compile) after this many seconds")
    parser.add_argument("--from_json", default=None,
                        help="comma-separated JSON files of earlier runs: write the table from "
                        "their rows (in --configs order) without compiling anything")
    parser.add_argument("--start_slice", default=None,
                        help="start every search at this slice (smaller ones: 'not tried')")
    parser.add_argument("--end_slice", default=None,
                        help="end every search at this slice (a row found with it says 'no fit "
                        "up to' it)")
    parser.add_argument("--max_timeouts", type=int, default=2,
                        help="give a model up after this many compile timeouts")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--candidates", default="[]", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        specs = _parse_configs(args.configs)
        scanned = {s.key for s in _parse_configs(args.scan_layers)} if args.scan_layers else set()
    except ConfigurationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.worker:
        todo = [Candidate(**c) for c in json.loads(args.candidates)]
        run_worker(specs[0], todo, args.result, specs[0].key in scanned)
        return 0
    command = "python -m moe.plan_table " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    made = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    made_on = machine()
    # A terminated table stops its compile too (see `search`).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if args.from_json:
        return _from_json(args.from_json.split(","), specs, args.output, args.json)
    rows = []
    for spec in specs:
        print(f"{spec.key}: searching", flush=True)

        def write(partial: dict[str, Any] | None = None) -> None:
            shown = rows + ([partial] if partial else [])
            _write(args.output, format_table(shown, command, made, made_on))
            if args.json:
                _write(args.json, json.dumps({"made": made, "machine": made_on,
                                              "command": command, "rows": shown},
                                             indent=2) + "\n")

        rows.append(search(spec, args.timeout_s, spec.key in scanned,
                           log=lambda line: print(line, flush=True),
                           max_timeouts=args.max_timeouts, progress=write,
                           start_slice=args.start_slice, end_slice=args.end_slice))
        write()
    print(format_table(rows, command, made, made_on), flush=True)
    return 0
