"""The collectives of a compiled program, read from its HLO text.

What a partitioned program communicates is decided by the SPMD partitioner, not by the code:
the compiled HLO is the only place that says whether the experts' tokens move by all-to-all,
whether expert weights are all-gathered, and how many bytes each step sends. Counts are
static (an op inside a loop body counts once); bytes are each op's result size per device.
"""

import dataclasses
import math
import re

COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter", "all-reduce",
               "collective-permute")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# `%name = <result type> <op>(` where op is a collective or the start of an async one (the
# matching `-done` carries the same data and is not counted again).
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(?P<type>.+?)\s+(?P<op>" + "|".join(
        re.escape(c) for c in sorted(COLLECTIVES, key=len, reverse=True)
    ) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
    """One collective of the compiled program: its kind, result shapes and bytes per device."""

    kind: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) of each result array
    num_bytes: int


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dtype, tuple(int(d) for d in dims.split(",") if d))
            for dtype, dims in _ARRAY.findall(type_text)]


def collective_ops(hlo_text: str) -> list[CollectiveOp]:
    """Every collective op of `hlo_text` (compiled HLO, as `compiled.as_text()` gives it)."""
    ops = []
    for line in hlo_text.splitlines():
        match = _OP.match(line)
        if not match:
            continue
        arrays = _arrays(match.group("type"))
        if match.group("start"):
            # An async start's result is (operands..., results..., context scalars): the
            # results are the second half of the arrays that are not scalars.
            shaped = [a for a in arrays if a[1]]
            arrays = shaped[len(shaped) // 2:] if len(shaped) > 1 else shaped
        num_bytes = sum(_BYTES[dtype] * math.prod(dims) for dtype, dims in arrays)
        ops.append(CollectiveOp(match.group("op"), tuple(arrays), num_bytes))
    return ops


def summarize(ops: list[CollectiveOp]) -> dict[str, dict[str, int]]:
    """{kind: {'count': n, 'bytes': total}} for every kind in COLLECTIVES (zeros included)."""
    summary = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    for op in ops:
        summary[op.kind]["count"] += 1
        summary[op.kind]["bytes"] += op.num_bytes
    return summary
