"""Convert checkpoints between this codebase, T5X/flaxformer and Hugging Face transformers.

    # Hugging Face (config.json + model.safetensors, or a sharded index) -> ours
    python -m moe.convert from_hf --model_dir=DIR --output=OUT
    # T5X (checkpoint_N, Orbax or legacy; the model gin next to it or --gin_file) -> ours
    python -m moe.convert from_t5x --checkpoint=DIR/checkpoint_N --output=OUT
    # ours (or T5X) -> a folder transformers' `from_pretrained` loads
    python -m moe.convert to_hf --gin_file=OUT/model.gin --checkpoint=OUT --output=HF_DIR

`from_*` write `OUT/model.gin` (our model gin for the same network, T5X macro names) and
`OUT/checkpoints/<step>/` (parameters only), so that fine-tuning starts with
`--gin_file=OUT/model.gin --gin.INITIAL_CHECKPOINT_PATH="'OUT'"`. A T5X checkpoint also works
directly as INITIAL_CHECKPOINT_PATH / CHECKPOINT_PATH; converting gives a standalone copy.
Problems a user can fix (no checkpoint, unsupported architecture, a gin that does not match)
exit with status 2 and one `error:` line.
"""

import sys

import moe.start_up  # noqa: F401 - first: before JAX and TensorFlow load

if __name__ == "__main__":
    from moe.convert import main  # gin registers the importable module's configurables once

    sys.exit(main())

import argparse
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from moe import checkpoints, file_io, gin_cli
from moe.checkpoint_errors import CheckpointError
from moe.checkpoint_sources import absolute_path, flatten_params, unflatten_like
from moe.errors import ConfigurationError
from moe.interop import hf, t5x_checkpoint, t5x_gin
from moe.interop.model_gin import build_model
from moe.models.param_count import abstract_params


def _write_converted(output: str, gin_text: str, params: Any, step: int) -> str:
    """`output/model.gin` then `output/checkpoints/<step>` (each complete or absent; `output`
    may be a `gs://` URL)."""
    file_io.makedirs(output)
    gin_path = file_io.join(output, "model.gin")
    file_io.write_atomically(gin_path, gin_text)
    directory = checkpoints.save_params(output, params, step)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"Wrote {gin_path} and {directory} ({count:,} parameters). Fine-tune with "
          f"--gin_file={gin_path} --gin.INITIAL_CHECKPOINT_PATH=\"'{output}'\"", flush=True)
    return directory


def from_t5x(checkpoint: str, output: str, gin_file: str | None = None,
             search_paths: Sequence[str] = (), step: int | None = None) -> str:
    """Convert a T5X checkpoint (either format) and its model gin into ours."""
    step_dir = t5x_checkpoint.find_step_dir(absolute_path(checkpoint), step)
    if step_dir is None:
        raise CheckpointError(
            f"No T5X checkpoint at {checkpoint!r}: expected checkpoint_<N>/ holding a legacy "
            "'checkpoint' file or an Orbax 'state/', or the model directory holding them."
        )
    gin_file = gin_file or t5x_checkpoint.gin_written_with(step_dir)
    if gin_file is None:
        raise CheckpointError(
            f"{step_dir} has no config.gin or operative_config.gin next to it; pass the model "
            "gin it was trained with: --gin_file=<T5X model gin> (and --gin_search_paths for "
            "its includes)."
        )
    text = t5x_gin.translate_gin_file(gin_file, search_paths)
    model = build_model(text)
    params, _ = checkpoints.restore_params_from(str(step_dir), abstract_params(model))
    return _write_converted(output, text, params,
                            t5x_checkpoint.T5xCheckpoint.open(step_dir).step)


def from_hf(model_dir: str, output: str) -> str:
    """Convert a Hugging Face T5 / Switch Transformers folder into ours."""
    hf_config = hf.read_hf_config(model_dir)
    text = hf.hf_model_gin(hf_config, model_dir).render()
    model = build_model(text)
    # read_hf_params checks names and shapes against the model's config (and a test, that
    # those are the model's parameter tree).
    flat = hf.read_hf_params(model_dir, model.module.config)
    params = unflatten_like(abstract_params(model), flat)
    return _write_converted(output, text, params, 0)


def to_hf(gin_files: Sequence[str], gin_bindings: Sequence[str], checkpoint: str, output: str,
          search_paths: Sequence[str] = (), step: int | None = None) -> str:
    """Write our (or a T5X) checkpoint as a Hugging Face folder."""
    model = build_model(gin_files=gin_files, bindings=gin_bindings, search_paths=search_paths)
    params, _ = checkpoints.restore_params_from(checkpoint, abstract_params(model), step=step)
    flat = {k: np.asarray(jax.device_get(v), np.float32) for k, v in
            flatten_params(params).items()}
    hf_config, tensors = hf.hf_export(model.module.config, flat)
    hf.write_hf_model(output, hf_config, tensors)
    print(f"Wrote {output} ({hf_config['architectures'][0]}, {len(tensors)} tensors): "
          "transformers.AutoModelForSeq2SeqLM.from_pretrained loads it.", flush=True)
    return output


def _parser(command: str) -> argparse.ArgumentParser:
    if command == "to_hf":
        parser = gin_cli.make_parser("Write a checkpoint as a Hugging Face folder.")
        parser.add_argument("--checkpoint", required=True,
                            help="Our checkpoint (MODEL_DIR, .../checkpoints[/<step>]) or T5X's.")
    else:
        parser = argparse.ArgumentParser(description=f"moe.convert {command}")
    if command == "from_hf":
        parser.add_argument("--model_dir", required=True,
                            help="A save_pretrained folder: config.json + model.safetensors.")
    if command == "from_t5x":
        parser.add_argument("--checkpoint", required=True,
                            help="T5X checkpoint_<N> (Orbax or legacy) or its model directory.")
        parser.add_argument("--gin_file", default=None,
                            help="The T5X model gin (default: config.gin next to it).")
        parser.add_argument("--gin_search_paths", action="append", default=[],
                            help="Folders where the T5X gin's includes are looked up.")
    parser.add_argument("--output", required=True, help="The folder to write.")
    if command in ("from_t5x", "to_hf"):
        parser.add_argument("--step", type=int, default=None, help="Checkpoint step.")
    return parser


COMMANDS = ("from_hf", "from_t5x", "to_hf")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"error: the first argument is the conversion: one of {list(COMMANDS)}, e.g. "
              "python -m moe.convert from_hf --model_dir=DIR --output=OUT", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    parser = _parser(command)
    try:
        if command == "to_hf":
            args = gin_cli.parse_args(rest, parser)
            to_hf(args.gin_files, args.gin_bindings, args.extra.checkpoint, args.extra.output,
                  args.gin_search_paths, args.extra.step)
        else:
            args = parser.parse_args(rest)
            if command == "from_hf":
                from_hf(args.model_dir, args.output)
            else:
                paths = [p for group in args.gin_search_paths for p in group.split(",") if p]
                from_t5x(args.checkpoint, args.output, args.gin_file, paths, args.step)
    except ConfigurationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
