"""Our parameter names and layouts <-> flaxformer/T5X's (the `target/...` tree of a T5X
checkpoint).

The two trees differ in a few names and in the attention kernels' layout:

    ours                                              flaxformer
    .../self_attention/query [D,H,Dh] (encoder)       .../attention/query/kernel [D,H*Dh]
    .../self_attention/out [H,Dh,D]                   .../attention/out/kernel [H*Dh,D]
    encoder/layers_i/pre_self_attention_layer_norm    encoder/layers_i/pre_attention_layer_norm
    encoder/final_layer_norm                          encoder/encoder_norm
    decoder/stack/final_layer_norm                    decoder/decoder_norm
    decoder/stack/...                                 decoder/...
    logits_dense/kernel                               decoder/logits_dense/kernel
    encoder_token_embedder/embedding (not shared)     encoder/token_embedder/embedding
    .../mlp/wi_0, .../mlp/expert/wi_0, .../router/router_weights/w   the same + /kernel

Every layout difference is a row-major reshape (heads and head_dim merged), so one function
gives the name and one the stored shape; values convert with `numpy.reshape`.
"""

from __future__ import annotations

from collections.abc import Sequence

# Our leaves that are the `kernel` of a flaxformer Dense/DenseGeneral module.
_KERNEL_LEAVES = frozenset({"query", "key", "value", "out", "wi", "wi_0", "wi_1", "wo", "w"})
_QKV = frozenset({"query", "key", "value"})


def flaxformer_name(path: str) -> str:
    """flaxformer's name (without the `target/` prefix) of our parameter `path`."""
    parts = path.split("/")
    if "scanned_blocks" in parts:
        raise ValueError(
            f"{path}: layer-scanned parameters have no flaxformer counterpart; convert with "
            "TransformerConfig.scan_layers = False."
        )
    if parts == ["logits_dense", "kernel"]:
        return "decoder/logits_dense/kernel"
    if parts[0] in ("encoder_token_embedder", "decoder_token_embedder"):  # not shared
        return "/".join([parts[0].removesuffix("_token_embedder"), "token_embedder", *parts[1:]])
    if parts[:2] == ["decoder", "stack"]:
        parts = ["decoder", *parts[2:]]
    stack = parts[0]
    renamed = []
    for part in parts:
        if part == "final_layer_norm":
            part = f"{stack}_norm"
        elif stack == "encoder" and part == "self_attention":
            part = "attention"
        elif stack == "encoder" and part == "pre_self_attention_layer_norm":
            part = "pre_attention_layer_norm"
        renamed.append(part)
    if renamed[-1] in _KERNEL_LEAVES:
        renamed.append("kernel")
    return "/".join(renamed)


def flaxformer_shape(path: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape flaxformer stores our parameter `path` of `shape` in."""
    shape = tuple(shape)
    leaf = path.split("/")[-1]
    if leaf in _QKV and len(shape) == 3:  # [D, H, Dh] -> [D, H*Dh]
        return (shape[0], shape[1] * shape[2])
    if leaf == "out" and len(shape) == 3:  # [H, Dh, D] -> [H*Dh, D]
        return (shape[0] * shape[1], shape[2])
    return shape


__all__ = ["flaxformer_name", "flaxformer_shape"]
