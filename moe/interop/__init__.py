"""Interoperability with the checkpoints researchers already have: T5X/flaxformer (Orbax and
legacy formats, gin configs) and Hugging Face transformers (safetensors, config.json).

- `flaxformer_names`: our parameter names and layouts <-> flaxformer/T5X's;
- `t5x_checkpoint`: reading T5X checkpoint directories (both formats), locally or on gs://;
- `t5x_gin`: reading a T5X model gin (its macros and the flaxformer bindings that matter)
  and writing the equivalent model gin of ours;
- `hf`: Hugging Face T5 / Switch Transformers configs and weights <-> ours.
"""
