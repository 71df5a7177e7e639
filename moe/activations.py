"""Feed-forward activations shared by dense MLPs and experts.

One table, so that a dense MLP and its upcycled experts always compute the same function.
`gated-*` activations take two input projections (T5.1.1's GEGLU: `gelu(x W0) * (x W1)`).
"""

from collections.abc import Callable

import jax

from moe.errors import ConfigurationError

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    # T5.1.1 and flaxformer use the tanh approximation of GELU.
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


def is_gated(name: str) -> bool:
    """Whether the activation `name` needs two input projections (a gate and a value)."""
    return name.startswith("gated-")


def num_input_projections(name: str) -> int:
    """How many `wi` matrices an MLP with activation `name` holds."""
    return 2 if is_gated(name) else 1


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The elementwise function behind `name` ('relu', 'gelu', 'silu', 'gated-gelu', ...)."""
    base = name.removeprefix("gated-")
    if base not in _ACTIVATIONS:
        known = sorted(list(_ACTIVATIONS) + [f"gated-{k}" for k in _ACTIVATIONS])
        raise ConfigurationError(f"Unknown activation {name!r}; choose one of {known}.")
    return _ACTIVATIONS[base]


def apply_activation(name: str, hidden: list[jax.Array]) -> jax.Array:
    """Combine the input projections `hidden` (one, or gate and value) into the MLP's hidden."""
    fn = get_activation(name)
    if is_gated(name):
        gate, value = hidden
        return fn(gate) * value
    (h,) = hidden
    return fn(h)


__all__ = ["apply_activation", "get_activation", "is_gated", "num_input_projections"]
