"""Where metrics go: TensorBoard event files, a JSON-lines log, and one console line per period.

Only process 0 writes (multi-host runs would otherwise write every summary N times). Vector
metrics (per-expert load `[E]`, experts-per-token histograms) are written as one scalar per
element, `<name>/<index>`, so TensorBoard plots them and the plotting script can read them back
from `metrics.jsonl` without TensorFlow.

A run that resumes from a checkpoint at step S may have logged steps past S before it died
(metrics are logged every log period, checkpoints every checkpoint period). Those rows are
replaced by the resumed run's, so `MetricsWriter(resume_step=S)` first drops them from
`metrics.jsonl` (rewritten atomically) and marks the restart in TensorBoard with
`SessionLog.START` events at step S + 1, on which TensorBoard's Python event loader purges the
later steps (event files cannot be cut). TensorBoard's default data server needs no mark: a
point at a step not larger than the last one it saw for a tag replaces every point from that
step on.
"""

import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from clu import metric_writers

from moe import file_io


def to_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Flatten array metrics into named floats (vectors -> `<name>/<i>`)."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim == 0:
            out[name] = float(arr)
        else:
            for i, v in enumerate(arr.reshape(-1)):
                out[f"{name}/{i}"] = float(v)
    return out


def read_jsonl_records(path: str) -> tuple[list[dict[str, Any]], int]:
    """The records of a metrics log, and how many lines were not JSON (a write cut by a kill)."""
    records, torn = [], 0
    with file_io.open_file(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                torn += 1
    return records, torn


def rewrite_jsonl_atomically(path: str, records: list[dict[str, Any]]) -> None:
    """Replace `path` by `records`, one JSON line each; a reader sees the old or the new file."""
    file_io.write_atomically(path, "".join(json.dumps(record) + "\n" for record in records))


def discard_records_after(path: str, step: int) -> int:
    """Drop the records of `path` logged past `step` (and torn lines); returns how many went.

    The file is left untouched when there is nothing to drop.
    """
    if not file_io.exists(path):
        return 0
    records, torn = read_jsonl_records(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    dropped = len(records) - len(kept) + torn
    if dropped:
        rewrite_jsonl_atomically(path, kept)
    return dropped


def write_tensorboard_restart(log_dir: str, step: int) -> str:
    """An event file that marks a restart at `step` for TensorBoard's event loader; its path.

    The loader reads a run's files in name order; on a `SessionLog.START` event at step s it
    purges the points at steps >= s read so far, except on the first START of a run (which a
    TensorFlow 1 session wrote when it began; TensorFlow 2 writers write none). The file holds
    two, both at `step + 1`: the second purges whether or not an earlier restart left a START.
    Its name sorts after the dead run's files (an earlier second) and before the file the new
    TensorFlow writer opens next (same second, host and process id, then a longer name).
    """
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    now = time.time()
    name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
    path = os.path.join(log_dir, name)
    start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
    events = [event_pb2.Event(wall_time=now, file_version="brain.Event:2")] + [
        event_pb2.Event(wall_time=now, step=step + 1, session_log=start)] * 2
    with tf.io.gfile.GFile(path, "wb") as f:
        records = RecordWriter(f)
        for event in events:
            records.write(event.SerializeToString())
    return path


class MetricsWriter:
    """TensorBoard + `metrics.jsonl` under `log_dir` (a local folder or a URL such as `gs://`:
    `moe.file_io`), and console progress lines.

    `resume_step`: the step this run starts from; rows a previous run logged past it are
    dropped before anything is written (see the module doc).
    """

    def __init__(
        self, log_dir: str, total_steps: int | None = None, resume_step: int | None = None
    ):
        self.log_dir = log_dir
        self.total_steps = total_steps
        self.is_primary = jax.process_index() == 0
        self._writer = None
        self._jsonl = None
        if self.is_primary:
            file_io.makedirs(log_dir)
            path = file_io.join(log_dir, "metrics.jsonl")
            if resume_step is not None:
                self._discard_after(path, resume_step)
            # `create_default_writer(log_dir, asynchronous=False)` without its `epath.Path`,
            # which knows only some URL schemes: TensorFlow's writer takes any it can open.
            self._writer = metric_writers.MultiWriter(
                [metric_writers.LoggingWriter(), metric_writers.SummaryWriter(log_dir)])
            self._jsonl = file_io.open_file(path, "a")
        self._last_time: float | None = None
        self._last_step: int | None = None
        self._console_time = time.monotonic()
        self._console_step: int | None = None

    def _discard_after(self, path: str, step: int) -> None:
        dropped = discard_records_after(path, step)
        if dropped:
            write_tensorboard_restart(self.log_dir, step)
            print(f"Dropped {dropped} metrics rows logged past step {step}, where this run "
                  f"starts, from {path}.", flush=True)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Write `metrics` at `step` (process 0 only); returns them as floats."""
        scalars = to_scalars(metrics)
        if self.is_primary:
            self._writer.write_scalars(step, scalars)
            self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self._jsonl.flush()
        return scalars

    def timing(self, step: int) -> dict[str, float]:
        """Steps per second since the previous call (empty on the first call)."""
        now = time.perf_counter()
        out = {}
        if self._last_time is not None and step > self._last_step:
            out["timing/steps_per_second"] = (step - self._last_step) / (now - self._last_time)
        self._last_time, self._last_step = now, step
        return out

    def exclude_from_timing(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation run between steps) out of the next steps/s."""
        if self._last_time is not None:
            self._last_time += seconds

    def console(self, step: int, scalars: Mapping[str, float], prefix: str = "train") -> str:
        """Log one progress line: step, loss, accuracy, steps/s, ETA."""
        parts = [f"[{prefix}] step {step}" + (f"/{self.total_steps}" if self.total_steps else "")]
        for key, fmt in (("loss", "loss {:.4f}"), ("accuracy", "acc {:.3f}"),
                         ("experts/fraction_tokens_left_behind", "dropped {:.3f}"),
                         ("timing/steps_per_second", "{:.2f} steps/s"),
                         ("timing/first_step_seconds", "first step (with compilation) {:.1f}s"),
                         ("timing/tokens_per_second", "{:.0f} tok/s")):
            if key in scalars:
                parts.append(fmt.format(scalars[key]))
        rate = scalars.get("timing/steps_per_second")
        if rate and self.total_steps:
            parts.append(f"ETA {max(0, self.total_steps - step) / rate:.0f}s")
        return self._print(step, ", ".join(parts))

    def seconds_since_console(self) -> float:
        """Wall time since the last console line (or since this writer was made)."""
        return time.monotonic() - self._console_time

    def progress(self, step: int, mean_loss: float | None = None) -> str:
        """Log a progress line between log periods: step, loss, steps/s and ETA; no metrics row.

        The rate is over the steps since the previous console line, so the compilation of the
        first step is not in it once that step has been logged.
        """
        parts = [f"[progress] step {step}" + (f"/{self.total_steps}" if self.total_steps else "")]
        if mean_loss is not None:
            parts.append(f"loss {mean_loss:.4f}")
        seconds = self.seconds_since_console()
        if self._console_step is not None and step > self._console_step and seconds > 0:
            rate = (step - self._console_step) / seconds
            parts.append(f"{rate:.2f} steps/s")
            if self.total_steps:
                parts.append(f"ETA {max(0, self.total_steps - step) / rate:.0f}s")
        return self._print(step, ", ".join(parts))

    def _print(self, step: int, line: str) -> str:
        self._console_time, self._console_step = time.monotonic(), step
        if self.is_primary:
            logging.info(line)
            print(line, flush=True)
        return line

    def close(self) -> None:
        if self.is_primary:
            self._writer.flush()
            self._writer.close()
            self._jsonl.close()


__all__ = [
    "MetricsWriter",
    "discard_records_after",
    "read_jsonl_records",
    "rewrite_jsonl_atomically",
    "to_scalars",
    "write_tensorboard_restart",
]
