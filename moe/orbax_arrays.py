"""Reading named arrays of an Orbax PyTree checkpoint into host memory, whoever wrote it
(our Checkpointer, T5X): the shared step of every checkpoint source."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util


def metadata_tree(directory: Any) -> Any:
    """The stored tree with each array's metadata (shape, dtype) as its leaf."""
    metadata = ocp.PyTreeCheckpointer().metadata(directory)
    tree = getattr(metadata, "item_metadata", metadata)
    return getattr(tree, "tree", tree)


def restore_host_tree(directory: Any, template: Any) -> Any:
    """`template` (a tree of numpy arrays with the stored containers, dicts or lists) filled
    from the checkpoint at `directory`; leaves absent from the template are not read."""
    restore_args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray), template)
    return ocp.PyTreeCheckpointer().restore(
        directory,
        args=ocp.args.PyTreeRestore(item=template, restore_args=restore_args,
                                    partial_restore=True),
    )


def read_host_arrays(directory: Any, shapes: dict[str, tuple[tuple[int, ...], Any]]
                     ) -> dict[str, np.ndarray]:
    """`{'a/b/c': array}` for the '/'-joined keys of `shapes` (key -> (shape, dtype))."""
    if not shapes:
        return {}
    template = traverse_util.unflatten_dict(
        {k: np.zeros(shape, dtype) for k, (shape, dtype) in shapes.items()}, sep="/")
    flat = traverse_util.flatten_dict(restore_host_tree(directory, template), sep="/")
    return {k: np.asarray(flat[k]) for k in shapes}


__all__ = ["metadata_tree", "read_host_arrays", "restore_host_tree"]
