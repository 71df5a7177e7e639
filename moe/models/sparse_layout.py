"""Which layers of a stack are sparse (flaxformer's `MoeLayout`).

For S sparse layers out of L:
- BOTTOM: the first S layers; TOP: the last S; MIDDLE: S layers centred in the stack;
- MIXED: the last layer of each block of L/S layers (L=12, S=6: every other layer, 1, 3, ..);
- HF_SWITCH: Hugging Face SwitchTransformers' placement, layer i is sparse iff
  i % (L // S) == 1, or every layer when L // S == 1 (the second layer of each block). Equal
  to MIXED when L / S == 2; needed to import its checkpoints with other ratios.
"""

from __future__ import annotations

from moe.errors import ConfigurationError

LAYOUTS = ("BOTTOM", "TOP", "MIDDLE", "MIXED", "HF_SWITCH")


def sparse_layers(
    num_layers: int, num_sparse_layers: int, layout: str = "MIXED"
) -> tuple[bool, ...]:
    """For each of `num_layers` layers, whether its MLP is a MoE layer."""
    layout = layout.upper()
    if layout not in LAYOUTS:
        raise ConfigurationError(f"Unknown sparse layout {layout!r}; choose one of {LAYOUTS}.")
    if not 0 <= num_sparse_layers <= num_layers:
        raise ConfigurationError(
            f"num_sparse_layers={num_sparse_layers} must be between 0 and the number of layers "
            f"({num_layers})."
        )
    if num_sparse_layers == 0:
        return (False,) * num_layers
    if layout == "BOTTOM":
        sparse = range(num_sparse_layers)
    elif layout == "TOP":
        sparse = range(num_layers - num_sparse_layers, num_layers)
    elif layout == "MIDDLE":
        start = (num_layers - num_sparse_layers) // 2
        sparse = range(start, start + num_sparse_layers)
    elif layout == "HF_SWITCH":
        step = num_layers // num_sparse_layers
        sparse = [i for i in range(num_layers) if step == 1 or i % step == 1]
    else:
        if num_layers % num_sparse_layers:
            raise ConfigurationError(
                f"MIXED layout needs num_sparse_layers ({num_sparse_layers}) to divide the "
                f"number of layers ({num_layers}); change NUM_*_SPARSE_LAYERS or the layout."
            )
        period = num_layers // num_sparse_layers
        sparse = range(period - 1, num_layers, period)
    chosen = set(sparse)
    return tuple(i in chosen for i in range(num_layers))
