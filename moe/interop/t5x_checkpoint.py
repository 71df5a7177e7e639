"""Reading T5X checkpoint directories, in both formats T5X has written, locally or on gs://.

- Orbax (T5X's default since 2023): `checkpoint_N/state/` is an Orbax PyTree (OCDBT +
  TensorStore) with the parameters under `target/...`, Adafactor's statistics under
  `state/param_states/...` and the step at `state/step`.
- Legacy (most published checkpoints): `checkpoint_N/checkpoint` is a msgpack of the train
  state `{'optimizer': {'target': ..., 'state': {'step', 'param_states'}}}` in which a small
  array is inline and a large one is a TensorStore spec of a zarr directory beside the file
  (`target.encoder.layers_1.mlp.expert.wi_0.kernel/`), with a path relative to the step
  directory that is resolved against wherever the checkpoint now lives (gs:// included).

Names are flaxformer's (`encoder/layers_1/mlp/expert/wi_0/kernel`, no `target/` prefix);
`moe.interop.flaxformer_names` maps ours onto them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from etils import epath

from moe.checkpoint_errors import CheckpointError
from moe.orbax_arrays import metadata_tree, read_host_arrays

LEGACY_FILE = "checkpoint"
GIN_FILES = ("config.gin", "operative_config.gin")  # what T5X writes into its model dir
_STEP_DIR = re.compile(r"checkpoint_(\d+)$")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and not _is_ts_spec(value):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def _is_ts_spec(value: Any) -> bool:
    return isinstance(value, Mapping) and "driver" in value and "kvstore" in value


def is_step_dir(path: epath.Path) -> bool:
    """Whether `path` is one T5X checkpoint (either format)."""
    if (path / LEGACY_FILE).is_file():
        return True
    state = path / "state"
    return (state / "_METADATA").is_file() and _orbax_top_keys(state) >= {"target"}


def _orbax_top_keys(state_dir: epath.Path) -> set[str]:
    import json

    try:
        metadata = json.loads((state_dir / "_METADATA").read_text())
    except (OSError, ValueError):
        return set()
    keys = metadata.get("tree_metadata", {})
    return {k.split("'")[1] for k in keys if k.startswith("('")}


def find_step_dir(path: str | epath.Path, step: int | None = None) -> epath.Path | None:
    """The T5X step directory at `path`: `path` itself, or its `checkpoint_<step>` (the latest
    when `step` is None). None when `path` holds no T5X checkpoint."""
    root = epath.Path(path)
    if not root.is_dir():
        return None
    if is_step_dir(root):
        return root
    steps = {}
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and is_step_dir(child):
            steps[int(match.group(1))] = child
    if not steps:
        return None
    if step is None:
        return steps[max(steps)]
    if step not in steps:
        raise CheckpointError(f"No checkpoint_{step} under {root}; available: {sorted(steps)}.")
    return steps[step]


def gin_written_with(step_dir: epath.Path) -> str | None:
    """The gin T5X wrote for a checkpoint (config.gin / operative_config.gin in the step
    directory or its model directory), or None."""
    for folder in (step_dir, step_dir.parent):
        for name in GIN_FILES:
            if (folder / name).is_file():
                return str(folder / name)
    return None


def _kvstore_for(relative: str, step_dir: epath.Path) -> dict[str, Any]:
    """A TensorStore kvstore for a legacy array path relative to the step directory."""
    location = str(step_dir / relative.rstrip("/")) + "/"
    if location.startswith("gs://"):
        bucket, _, key = location[len("gs://"):].partition("/")
        return {"driver": "gcs", "bucket": bucket, "path": key}
    return {"driver": "file", "path": location}


@dataclasses.dataclass
class T5xCheckpoint:
    """One T5X checkpoint: its parameters and Adafactor statistics by flaxformer name."""

    step_dir: epath.Path
    format: str  # 'orbax' or 'legacy'
    step: int
    params: dict[str, tuple[tuple[int, ...], Any]]  # name -> (shape, dtype)
    param_states: dict[str, tuple[tuple[int, ...], Any]]  # 'name/v_row' -> (shape, dtype)
    _legacy_leaves: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, step_dir: epath.Path) -> T5xCheckpoint:
        if (step_dir / LEGACY_FILE).is_file():
            return cls._open_legacy(step_dir)
        return cls._open_orbax(step_dir)

    @classmethod
    def _open_legacy(cls, step_dir: epath.Path) -> T5xCheckpoint:
        from flax import serialization

        tree = serialization.msgpack_restore((step_dir / LEGACY_FILE).read_bytes())
        optimizer = tree.get("optimizer", {})
        if "target" not in optimizer:
            raise CheckpointError(
                f"{step_dir / LEGACY_FILE} is not a T5X train state (no optimizer/target)."
            )
        state = optimizer.get("state", {})
        leaves = {f"target/{k}": v for k, v in _flatten(optimizer["target"]).items()}
        leaves.update(
            {f"param_states/{k}": v for k, v in _flatten(state.get("param_states", {})).items()}
        )

        def shape_dtype(value):
            if _is_ts_spec(value):
                return tuple(value["metadata"]["shape"]), np.dtype(value.get("dtype", "float32"))
            array = np.asarray(value)
            return array.shape, array.dtype

        shapes = {k: shape_dtype(v) for k, v in leaves.items()}
        return cls(
            step_dir=step_dir,
            format="legacy",
            step=int(np.asarray(state.get("step", 0))),
            params=_strip(shapes, "target/"),
            param_states=_strip(shapes, "param_states/"),
            _legacy_leaves=leaves,
        )

    @classmethod
    def _open_orbax(cls, step_dir: epath.Path) -> T5xCheckpoint:
        tree = metadata_tree(step_dir / "state")
        shapes = {
            k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in _flatten_metadata(tree).items()
        }
        step = 0
        if "state/step" in shapes:
            step = int(cls._read_orbax(step_dir, ["state/step"], shapes)["state/step"])
        return cls(
            step_dir=step_dir,
            format="orbax",
            step=step,
            params=_strip(shapes, "target/"),
            param_states=_strip(shapes, "state/param_states/"),
        )

    def read(self, names: Iterable[str], group: str = "target") -> dict[str, np.ndarray]:
        """Host arrays of the named parameters (`group='target'`) or statistics
        (`group='param_states'`, names like `encoder/.../kernel/v_row`)."""
        names = list(names)
        if not names:
            return {}
        if self.format == "legacy":
            return {n: self._read_legacy(f"{group}/{n}") for n in names}
        prefix = "target/" if group == "target" else "state/param_states/"
        available = self.params if group == "target" else self.param_states
        full = {prefix + n: available[n] for n in names}
        values = self._read_orbax(self.step_dir, list(full), full)
        return {n: values[prefix + n] for n in names}

    def _read_legacy(self, key: str) -> np.ndarray:
        value = self._legacy_leaves[key]
        if not _is_ts_spec(value):
            return np.asarray(value)
        import tensorstore as ts

        spec = dict(value)
        spec["kvstore"] = _kvstore_for(value["kvstore"]["path"], self.step_dir)
        return np.asarray(ts.open(spec, open=True, read=True).result().read().result())

    @staticmethod
    def _read_orbax(step_dir: epath.Path, keys: list[str], shapes) -> dict[str, np.ndarray]:
        return read_host_arrays(step_dir / "state", {k: shapes[k] for k in keys})


def _flatten_metadata(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten_metadata(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _strip(shapes: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


__all__ = ["T5xCheckpoint", "find_step_dir", "gin_written_with", "is_step_dir"]
