"""Hyperparameters of the sparse T5 models, as frozen (hashable, gin-configurable) dataclasses.

A model is a `TransformerConfig`; the encoder and the decoder each carry their own
`SparseConfig` (how many MoE layers, where, which router, ...), as in T5X's MoE configs where
NUM_ENCODER_SPARSE_LAYERS and NUM_DECODER_SPARSE_LAYERS are set separately.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import gin
import jax.numpy as jnp

from moe.errors import ConfigurationError
from moe.models.sparse_layout import sparse_layers
from moe.routing import RouterSpec, TokenChoice  # importing registers every router with gin


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """The MoE settings of one stack (encoder or decoder).

    Attributes:
      num_sparse_layers: how many of the stack's MLPs are MoE layers (0: dense stack).
      layout: 'BOTTOM', 'TOP', 'MIDDLE' or 'MIXED' (see `sparse_layout`).
      num_experts: experts per MoE layer.
      router: a router spec (`moe.routing.RouterSpec`: `TokenChoice`, `ExpertChoice`, ...).
      d_ff: hidden size of each expert (None: the stack's d_ff).
      activation: the experts' activation (None: the dense MLPs'); the Expert Choice paper's
        decoder-only models use plain 'gelu' experts next to 'gated-gelu' dense MLPs.
      dispatch: 'index', 'mask' or 'dropless' (see `MoeLayer`).
      group_size: maximum tokens per routing group (GROUP_SIZE).
      group_formula: how tokens are cut into routing groups: 'fewest' (ours: the fewest groups
        of at most group_size tokens, independent of the mesh) or 'flaxformer' (its
        `_num_groups`, for parity with T5X/flaxformer checkpoints); see `moe_layer`.
      num_expert_replicas: the expert replica count of the 'flaxformer' formula (flaxformer
        takes it from the device count: devices / (expert x model partitions)).
      num_expert_partitions: the mesh's expert axis size the layers are laid out for.
      expert_dropout_rate: dropout inside the experts (EXPERT_DROPOUT_RATE).
      extra_dense_mlp: ST-MoE: a dense MLP sublayer after each sparse one.
      num_shared_experts: DeepSeekMoE's K_s shared experts: every token passes through them
        and their output is added to the routed one. They are one dense MLP of
        K_s * (expert d_ff) hidden units (`shared_experts`), which computes the same function
        as K_s experts summed. With fine-grained experts (m-way segmented: m*E experts of
        d_ff/m, top m*K), the gins set NUM_EXPERTS, EXPERT_MLP_DIM and NUM_SELECTED_EXPERTS
        directly.
      router_init_stddev: the router kernel's initial stddev; 0 starts it at zero (see
        `MoeLayer`).
      dtype: activation dtype of the experts and of dispatch/combine (MOE_TRUNCATED_DTYPE);
        None: the model's dtype. The router always computes in float32.
    """

    num_sparse_layers: int = 0
    layout: str = "MIXED"
    num_experts: int = 8
    router: RouterSpec = dataclasses.field(default_factory=TokenChoice)
    d_ff: int | None = None
    activation: str | None = None
    dispatch: str = "index"
    group_size: int = 4096
    group_formula: str = "fewest"
    num_expert_replicas: int = 1
    num_expert_partitions: int = 1
    expert_dropout_rate: float = 0.0
    extra_dense_mlp: bool = False
    dtype: Any = None
    num_shared_experts: int = 0
    router_init_stddev: float = 2e-2

    def __post_init__(self):
        if self.num_shared_experts < 0:
            raise ConfigurationError(
                f"SparseConfig.num_shared_experts must be >= 0, got {self.num_shared_experts}."
            )
        if self.dtype is not None:
            object.__setattr__(self, "dtype", jnp.dtype(self.dtype))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """A T5.1.1-style transformer; `num_encoder_layers=0` makes it decoder-only.

    Attributes:
      vocab_size, d_model, num_heads, head_dim, d_ff: the usual sizes (no biases anywhere).
      num_encoder_layers, num_decoder_layers: depth of each stack.
      activation: dense MLP activation ('gated-gelu' for T5.1.1, 'relu' for Switch-Base).
      dropout_rate: dropout after each sublayer, on embeddings and in MLPs / attention weights.
      relative_attention_num_buckets, relative_attention_max_distance: T5's position buckets.
      logits_via_embedding: tie the output projection to the token embedding.
      scale_tied_logits: with tied logits, multiply the decoder output by 1/sqrt(d_model)
        before the embedding (T5X, Mesh TF, original T5, Switch). False for the T5 v1.1
        configs that Hugging Face transformers >= 5 writes (tied, unscaled).
      shared_embedding: one token embedding for the encoder and the decoder (T5). False gives
        each stack its own (`encoder_token_embedder`, `decoder_token_embedder`), as Hugging Face
        SwitchTransformers with untied embeddings computes since transformers 5; it needs
        untied output logits.
      kernel_init_scale: variance scale of the kernels (0.1 in T5X's MoE configs).
      dtype: activation dtype (ACTIVATION_DTYPE); parameters stay float32 and are cast.
        Output logits are always computed in float32 (T5X).
      float32_attention_logits: attention logits and softmax in float32 whatever `dtype`;
        False computes them in `dtype`, as flaxformer does by default (bfloat16 parity).
      logit_mask: flaxformer's position masks: the normed input of every sublayer and the
        final normed output of each stack are multiplied by 1 at real positions and 0
        elsewhere (encoder: token > 0; decoder: `decoder_logit_mask`, which also keeps
        position 0 and the position after each real token). Masked positions then enter the
        routers as exact zero vectors and masked decoder positions give exactly zero logits.
        Needed for parity with flaxformer when routers route padding
        (`ignore_padding_tokens=False`); with our default routers it changes no real token.
      max_length: longest sequence accepted (None: unchecked); longer inputs raise.
      remat: rematerialize each layer in the backward pass (less memory, more compute).
      scan_layers: run each stack as an `nn.scan` over its repeating block of layers (the
        layout's period: 2 layers for MoE every other layer), so that compile time does not
        grow with depth. Parameters then carry a leading 'layers' axis under
        `scanned_blocks/layers_<j>` instead of `layers_<i>`.
      encoder_sparse, decoder_sparse: each stack's MoE settings.
    """

    vocab_size: int
    d_model: int
    num_heads: int
    d_ff: int
    num_decoder_layers: int
    num_encoder_layers: int = 0
    head_dim: int = 64
    activation: str = "gated-gelu"
    dropout_rate: float = 0.0
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    logits_via_embedding: bool = False
    scale_tied_logits: bool = True
    shared_embedding: bool = True
    kernel_init_scale: float = 1.0
    dtype: Any = jnp.float32
    float32_attention_logits: bool = True
    logit_mask: bool = False
    max_length: int | None = None
    remat: bool = False
    scan_layers: bool = False
    encoder_sparse: SparseConfig = SparseConfig()
    decoder_sparse: SparseConfig = SparseConfig()

    def __post_init__(self):
        # gin binds dtypes as strings ('bfloat16', as in T5X's ACTIVATION_DTYPE).
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        sizes = ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_decoder_layers")
        for name in sizes:
            value = getattr(self, name)
            if value < 1:
                raise ConfigurationError(f"TransformerConfig.{name} must be >= 1, got {value}.")
        if not self.shared_embedding and self.logits_via_embedding:
            raise ConfigurationError(
                "shared_embedding=False needs logits_via_embedding=False: with two input "
                "embeddings there is no single one to tie the output logits to."
            )
        # Validate the layouts now, so a bad gin file fails before any tracing.
        self.encoder_layers_sparse()
        self.decoder_layers_sparse()
        for sparse in (self.encoder_sparse, self.decoder_sparse):
            if sparse.num_sparse_layers and sparse.num_experts % sparse.num_expert_partitions:
                raise ConfigurationError(
                    f"num_experts={sparse.num_experts} is not divisible by "
                    f"num_expert_partitions={sparse.num_expert_partitions}; pick "
                    "NUM_EXPERT_PARTITIONS dividing NUM_EXPERTS."
                )

    def encoder_layers_sparse(self) -> tuple[bool, ...]:
        s = self.encoder_sparse
        return sparse_layers(self.num_encoder_layers, s.num_sparse_layers, s.layout)

    def decoder_layers_sparse(self) -> tuple[bool, ...]:
        s = self.decoder_sparse
        return sparse_layers(self.num_decoder_layers, s.num_sparse_layers, s.layout)

    def sparse_config_at(self, path: Sequence[str]) -> SparseConfig:
        """The `SparseConfig` of the stack a variable path (`('encoder', ...)`) lies in."""
        return self.encoder_sparse if path[0] == "encoder" else self.decoder_sparse

    def check_length(self, length: int, what: str) -> None:
        if self.max_length is not None and length > self.max_length:
            raise ConfigurationError(
                f"{what} has length {length}, longer than the configured max_length "
                f"{self.max_length}; truncate the inputs (TASK_FEATURE_LENGTHS) or raise "
                "max_length."
            )
