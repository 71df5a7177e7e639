"""Parameter counts of a model, from an abstract initialization (no memory is allocated).

`activated` counts what one token uses: every non-expert parameter, plus, in each MoE layer,
the parameters of as many experts as a token reaches on average (k for top-k token choice,
the capacity factor for expert choice: its slots are cf times the tokens).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax

from moe.models.config import SparseConfig
from moe.models.model import BaseModel


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    total: int
    expert: int  # parameters in expert weights (stacked [E, ...] kernels)
    activated: float  # parameters one token uses on average


def experts_per_token(sparse: SparseConfig) -> float:
    """Average experts a token is processed by (without drops)."""
    return sparse.router.experts_per_token(sparse.group_size, sparse.num_experts)


def total_size(params: Any) -> int:
    """Number of scalars in a tree of arrays (or shape structs)."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def abstract_params(model: BaseModel, length: int = 8) -> dict:
    """Parameter shapes (unboxed ShapeDtypeStructs) from `jax.eval_shape` of the init."""
    shapes = {name: (1, length) for name in model.required_inputs}
    shapes["decoder_target_tokens"] = (1, length)
    boxed = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), shapes))
    return nn.meta.unbox(boxed["params"])


def count_parameters(model: BaseModel) -> ParameterCount:
    """Total, expert and activated parameter counts of `model`."""
    config = model.module.config
    total = expert = 0
    activated = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(model))[0]:
        names = [getattr(k, "key", str(k)) for k in path]
        size = math.prod(leaf.shape)
        total += size
        if "expert" in names:
            expert += size
            sparse = config.sparse_config_at(names)
            activated += size / sparse.num_experts * experts_per_token(sparse)
        else:
            activated += size
    return ParameterCount(total=total, expert=expert, activated=activated)
