"""Eval-mode logits and sequence log-likelihoods for a batch of T5X feature arrays: the tool
that checks a port against the codebase a checkpoint came from.

    python -m moe.logits --gin_file=DIR/model.gin --gin.CHECKPOINT_PATH="'DIR'" \
        --features=in.npz --output=out.npz [--float32]

`in.npz` holds T5X's model features: `encoder_input_tokens`, `decoder_input_tokens`,
`decoder_target_tokens` (and optionally `decoder_loss_weights`); a decoder-only model takes the
`decoder_*` ones only. The checkpoint is ours or a T5X one (Orbax or legacy); the gin may be
ours or the T5X model's own gin. `out.npz` gets `logits` [batch, length, vocab] (float32),
`sequence_log_likelihood` [batch] (sum of target log-probabilities, loss weights applied) and,
for each MoE layer, `{encoder,decoder}_router_choice_{i}` [batch, length]: the most probable
expert of each token in the stack's i-th MoE layer from the bottom (0, 1, ...: the order of
Hugging Face's router logits).

`--float32` runs every activation in float32 (ACTIVATION_DTYPE and MOE_TRUNCATED_DTYPE). In
bfloat16 the tool rounds every intermediate as the program writes it (XLA's
`--xla_allow_excess_precision=false`), as an op-by-op run does, so that logits compare with
another codebase's at the last bit instead of within fusion-dependent rounding.
"""

import io
import os
import sys

import moe.start_up  # noqa: F401 - first: before JAX and TensorFlow load

if __name__ == "__main__":
    from moe.logits import main  # gin registers the importable module's configurables once

    sys.exit(main())

from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np

from moe import file_io
from moe.checkpoint_errors import CheckpointError
from moe.entry_point import run_entry_point
from moe.evaluation import restore_variables
from moe.partitioning import Partitioner

EXACT_BFLOAT16_FLAG = "--xla_allow_excess_precision=false"
FLOAT32_BINDINGS = ("ACTIVATION_DTYPE = 'float32'", "MOE_TRUNCATED_DTYPE = 'float32'",
                    "TransformerConfig.dtype = 'float32'", "SparseConfig.dtype = 'float32'")


def read_features(path: str, module_inputs: Sequence[str]) -> dict[str, np.ndarray]:
    """The model features of `path` (an .npz, local or a `gs://` URL) that the model takes, as
    int32 arrays."""
    try:
        arrays = np.load(io.BytesIO(file_io.read_bytes(path)))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot read the features file {path!r}: {e}") from e
    features = {k: np.asarray(arrays[k]) for k in arrays.files if k in module_inputs}
    if "decoder_loss_weights" in arrays.files:
        features["decoder_loss_weights"] = np.asarray(arrays["decoder_loss_weights"])
    required = [n for n in module_inputs[:2] if n not in features]
    if "decoder_target_tokens" not in features:
        required.append("decoder_target_tokens")
    if required:
        raise CheckpointError(
            f"{path} lacks {required} (it has {sorted(arrays.files)}); write T5X feature "
            "arrays: encoder_input_tokens, decoder_input_tokens, decoder_target_tokens "
            "(decoder-only: the decoder_* ones)."
        )
    return {k: v.astype(np.float32 if k == "decoder_loss_weights" else np.int32)
            for k, v in features.items()}


def router_choices(intermediates: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """`{encoder,decoder}_router_choice_{i}` from the sown `router_top1_expert` values: i counts
    the stack's MoE layers from the bottom (the order of Hugging Face's router logits)."""
    layers: dict[str, list[tuple[int, np.ndarray]]] = {"encoder": [], "decoder": []}
    flat = jax.tree_util.tree_flatten_with_path(intermediates)[0]
    for path, value in flat:
        names = [str(getattr(k, "key", k)) for k in path]
        if "router_top1_expert" not in names:
            continue
        side = "encoder" if names[0] == "encoder" else "decoder"
        layer = next(n for n in names if n.startswith("layers_"))
        layers[side].append((int(layer.removeprefix("layers_")), np.asarray(value)))
    return {f"{side}_router_choice_{i}": value
            for side, found in layers.items()
            for i, (_, value) in enumerate(sorted(found, key=lambda item: item[0]))}


@gin.configurable
def compute_logits(
    model: Any = gin.REQUIRED,
    checkpoint_path: str = gin.REQUIRED,
    features_path: str = gin.REQUIRED,
    output_path: str = gin.REQUIRED,
    checkpoint_step: int | None = None,
) -> dict[str, np.ndarray]:
    """Write `output_path` (.npz, local or a `gs://` URL; complete or absent) with the logits of
    the checkpoint on the features; returns the arrays written."""
    features = read_features(features_path, model.module_inputs)
    shapes = {k: v.shape for k, v in features.items() if k in model.module_inputs}
    partitioner = Partitioner(1, 1)
    params, router_state = restore_variables(
        model, checkpoint_path, partitioner, shapes, checkpoint_step
    )

    def run(params, batch, router_state):
        logits, intermediates = model.compute_logits(params, batch, router_state)
        return logits, model.sequence_log_likelihood(logits, batch), intermediates

    with partitioner.context():
        logits, log_likelihood, intermediates = jax.jit(run)(params, features, router_state)
    arrays = {
        "logits": np.asarray(logits, np.float32),
        "sequence_log_likelihood": np.asarray(log_likelihood, np.float32),
        **router_choices(jax.device_get(intermediates)),
    }
    file_io.makedirs(os.path.dirname(file_io.absolute(output_path)))
    npz = io.BytesIO()
    np.savez(npz, **arrays)
    file_io.write_atomically(output_path, npz.getvalue())
    print(f"Wrote logits {arrays['logits'].shape} and {len(arrays) - 2} router choice arrays "
          f"to {output_path}", flush=True)
    return arrays


def _round_bfloat16_as_written() -> None:
    """Ask XLA not to keep bfloat16 intermediates in float32 inside fusions. XLA reads its
    flags when the backend starts (the first computation), so this runs before any."""
    flags = os.environ.get("XLA_FLAGS", "")
    if EXACT_BFLOAT16_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {EXACT_BFLOAT16_FLAG}".strip()


def main(argv: Sequence[str] | None = None) -> int:
    _round_bfloat16_as_written()
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {"--features": None, "--output": None}
    rest, float32 = [], False
    for arg in argv:
        name, sep, value = arg.partition("=")
        if name in flags and sep:
            flags[name] = value
        elif arg == "--float32":
            float32 = True
        else:
            rest.append(arg)
    missing = [n for n, v in flags.items() if not v]
    if missing:
        print(f"error: {' and '.join(missing)} required, e.g. --features=in.npz "
              "--output=out.npz", file=sys.stderr)
        return 2
    rest += [
        "--gin_bindings=compute_logits.model = %MODEL",
        "--gin_bindings=compute_logits.checkpoint_path = %CHECKPOINT_PATH",
        f"--gin_bindings=compute_logits.features_path = {flags['--features']!r}",
        f"--gin_bindings=compute_logits.output_path = {flags['--output']!r}",
    ]
    if float32:
        rest += [f"--gin_bindings={b}" for b in FLOAT32_BINDINGS]
    description = "Eval-mode logits of a checkpoint (ours or T5X) for a batch of features."
    return run_entry_point(description, compute_logits, rest)[0]
