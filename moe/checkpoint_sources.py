"""Where restored parameters come from: our Orbax checkpoints or T5X checkpoints (Orbax or
legacy), behind one interface that speaks our parameter names.

A source answers, for one of our parameter names, the shape it stores that parameter in
(`stored_shape`), the shape it would have to store it in to fill a parameter of a given shape
(`expected_shape`: ours store our layout, T5X stores flaxformer's), and reads host arrays.
`moe.checkpoints.restore_params_from` works on any source, so fine-tuning, evaluation and
sparse upcycling accept a T5X checkpoint directory wherever they accept ours.

Paths accepted (local or gs://):
- ours: `MODEL_DIR`, `MODEL_DIR/checkpoints` (latest step, or `step`), `.../checkpoints/<step>`;
- T5X: `.../checkpoint_<N>` (either format, detected), or the T5X model directory holding
  `checkpoint_<N>` folders (the latest, or `step`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Protocol

import jax
import numpy as np
from etils import epath

from moe.checkpoint_errors import CheckpointError
from moe.interop import t5x_checkpoint
from moe.interop.flaxformer_names import flaxformer_name, flaxformer_shape
from moe.orbax_arrays import metadata_tree, read_host_arrays

STATE_ITEM, DATA_ITEM = "state", "data"


def _path_str(key_path) -> str:
    parts = []
    for k in key_path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def flatten_params(params: Any) -> dict[str, Any]:
    """`{'a/b/c': leaf}` for a nested dict of parameters."""
    return {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def unflatten_like(template: Any, flat: dict[str, Any]) -> Any:
    """The tree of `template` with each leaf taken from `flat` by its '/'-joined path."""
    return jax.tree_util.tree_map_with_path(lambda p, _: flat[_path_str(p)], template)


class ParamSource(Protocol):
    """A checkpoint's parameters under our names."""

    description: str
    step: int

    def stored_shape(self, name: str) -> tuple[int, ...] | None: ...

    def expected_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]: ...

    def native_name(self, name: str) -> str:
        """The checkpoint's own name for our parameter `name` (for messages)."""
        ...

    def read(self, names: list[str]) -> dict[str, np.ndarray]: ...

    def unused(self, used: set[str]) -> list[str]:
        """The checkpoint's parameters (its own names) that none of `used` (ours) covers."""
        ...


def absolute_path(path: str | epath.Path) -> epath.Path:
    """`path` made absolute (Orbax needs that), leaving URLs such as gs://... as they are."""
    path = str(path)
    return epath.Path(path if "://" in path else os.path.abspath(path))


def resolve_state_dir(path: str, step: int | None = None) -> epath.Path:
    """The `state` item directory of one of our checkpoints given as a manager dir or a step dir.

    Accepts `MODEL_DIR/checkpoints` (latest or `step`), `MODEL_DIR/checkpoints/<step>`, or
    `MODEL_DIR` itself (its `checkpoints/` folder).
    """
    root = absolute_path(path)
    if (root / STATE_ITEM).is_dir():
        return root / STATE_ITEM
    for base in (root, root / "checkpoints"):
        if base.is_dir():
            steps = sorted(int(p.name) for p in base.iterdir() if p.name.isdigit())
            if steps:
                chosen = steps[-1] if step is None else step
                if chosen not in steps:
                    raise CheckpointError(
                        f"No step {chosen} under {base}; available steps: {steps}."
                    )
                return base / str(chosen) / STATE_ITEM
    raise CheckpointError(
        f"No checkpoint found at {path!r}. Expected one of ours (a directory holding "
        f"'{STATE_ITEM}/', or numbered step directories, or MODEL_DIR with 'checkpoints/') or "
        "a T5X one ('checkpoint_<N>/' with a 'checkpoint' file or 'state/', or the T5X model "
        "directory holding them). Check INITIAL_CHECKPOINT_PATH / CHECKPOINT_PATH."
    )


@dataclasses.dataclass
class OrbaxSource:
    """One of our checkpoints (`{'step', 'params', 'opt_state'}` written by `Checkpointer`)."""

    state_dir: epath.Path
    shapes: dict[str, tuple[tuple[int, ...], Any]]
    step: int

    @classmethod
    def open(cls, state_dir: epath.Path) -> OrbaxSource:
        tree = metadata_tree(state_dir)
        if "params" not in tree:
            raise CheckpointError(f"Checkpoint {state_dir} holds no 'params'; keys: {list(tree)}.")
        shapes = {k: (tuple(m.shape), m.dtype) for k, m in flatten_params(tree["params"]).items()}
        source = cls(state_dir, shapes, 0)
        if "step" in tree:
            source.step = int(read_host_arrays(state_dir, {"step": ((), np.int32)})["step"])
        return source

    @property
    def description(self) -> str:
        return str(self.state_dir)

    def stored_shape(self, name: str) -> tuple[int, ...] | None:
        return self.shapes[name][0] if name in self.shapes else None

    def expected_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        del name
        return tuple(shape)

    def native_name(self, name: str) -> str:
        return name

    def unused(self, used: set[str]) -> list[str]:
        return sorted(set(self.shapes) - set(used))

    def read(self, names: list[str]) -> dict[str, np.ndarray]:
        arrays = read_host_arrays(self.state_dir,
                                  {f"params/{name}": self.shapes[name] for name in names})
        return {name: arrays[f"params/{name}"] for name in names}


@dataclasses.dataclass
class T5xSource:
    """A T5X checkpoint seen through our names (flaxformer names and layouts underneath)."""

    checkpoint: t5x_checkpoint.T5xCheckpoint

    @property
    def description(self) -> str:
        return f"T5X {self.checkpoint.format} checkpoint {self.checkpoint.step_dir}"

    @property
    def step(self) -> int:
        return self.checkpoint.step

    def stored_shape(self, name: str) -> tuple[int, ...] | None:
        entry = self.checkpoint.params.get(flaxformer_name(name))
        return None if entry is None else entry[0]

    def expected_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return flaxformer_shape(name, shape)

    def native_name(self, name: str) -> str:
        return flaxformer_name(name)

    def unused(self, used: set[str]) -> list[str]:
        return sorted(set(self.checkpoint.params) - {flaxformer_name(n) for n in used})

    def read(self, names: list[str]) -> dict[str, np.ndarray]:
        arrays = self.checkpoint.read([flaxformer_name(n) for n in names])
        return {n: arrays[flaxformer_name(n)] for n in names}


def open_param_source(path: str, step: int | None = None) -> ParamSource:
    """The checkpoint at `path` (ours or T5X, detected) as a source of our parameters."""
    t5x_dir = t5x_checkpoint.find_step_dir(absolute_path(path), step)
    if t5x_dir is not None:
        return T5xSource(t5x_checkpoint.T5xCheckpoint.open(t5x_dir))
    return OrbaxSource.open(resolve_state_dir(path, step))


__all__ = [
    "CheckpointError",
    "OrbaxSource",
    "ParamSource",
    "T5xSource",
    "absolute_path",
    "flatten_params",
    "open_param_source",
    "resolve_state_dir",
    "unflatten_like",
]
