"""DeepSeekMoE blocks: shared experts every token passes through, fine-grained expert gins, and
their parameter and activated-parameter counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.models.config import SparseConfig
from moe.models.layers import MlpBlock
from moe.models.param_count import count_parameters
from moe.models.transformer import LayerInputs, TransformerLayer
from moe.routing import SigmoidTokenChoice
from tests.models.helpers import tiny_config
from tests.models.test_gin_configs import load_model


def test_shared_experts_see_every_token_and_add_to_the_routed_output():
    # A capacity of 1 slot per expert drops most tokens from the routed experts.
    router = SigmoidTokenChoice(2, capacity_factor=0.01, min_capacity=1)
    sparse = SparseConfig(num_sparse_layers=1, num_experts=4, router=router,
                          num_shared_experts=2, d_ff=8)
    layer = TransformerLayer(tiny_config(), sparse=True, sparse_config=sparse, causal=False,
                             cross_attention=False)
    x = jax.random.normal(jax.random.key(0), (2, 12, 16))
    inputs = LayerInputs(self_bias=jnp.zeros((2, 1, 12, 12)))
    params = nn.meta.unbox(layer.init(jax.random.key(1), x, inputs)["params"])
    assert params["shared_experts"]["wi_0"].shape == (16, 2 * 8)  # K_s * expert d_ff
    # Without the routed experts' output projection, the MLP branch is the shared MLP alone.
    params["mlp"]["expert"]["wo"] = jnp.zeros_like(params["mlp"]["expert"]["wo"])
    apply = lambda p, x: layer.apply({"params": p}, x, inputs, mutable=["moe"])[0]
    without_mlp = dict(params, shared_experts=jax.tree.map(jnp.zeros_like,
                                                           params["shared_experts"]))
    branch = apply(params, x) - apply(without_mlp, x)
    normed = layer.apply({"params": params}, x, inputs, mutable=["moe", "intermediates"],
                         capture_intermediates=lambda m, _: m.name == "pre_mlp_layer_norm")
    h = normed[1]["intermediates"]["pre_mlp_layer_norm"]["__call__"][0]
    shared = MlpBlock(d_ff=16, activation="gated-gelu", dtype=jnp.float32, kernel_init_scale=1.0)
    expected = shared.apply({"params": params["shared_experts"]}, h)
    np.testing.assert_allclose(branch, expected, atol=1e-5)
    assert np.all(np.abs(np.asarray(expected)).sum(-1) > 0)  # every token got a shared output


def test_deepseek_base_parameter_counts():
    dense = count_parameters(load_model("t5_1_1_base"))
    model = load_model("deepseek_base")
    count = count_parameters(model)
    d, dense_ff, experts, expert_ff, shared, k = 768, 2048, 64, 512, 2, 6
    routed = experts * 3 * d * expert_ff  # gated-gelu: wi_0, wi_1, wo
    per_layer = routed + 3 * d * shared * expert_ff + d * experts - 3 * d * dense_ff
    assert count.total == dense.total + 12 * per_layer == 1_125_825_792
    assert count.expert == 12 * routed
    # A token uses every non-expert parameter and k of the 64 fine-grained experts: 8 x 512
    # expert hidden units with the shared ones, the FLOPs of top-2 of 16 Base-size experts.
    assert count.activated == pytest.approx(count.total - count.expert + count.expert * k / 64)
    sparse = model.module.config.encoder_sparse
    assert (sparse.router.num_selected_experts, sparse.num_shared_experts, sparse.d_ff) == (
        k, shared, expert_ff)
    assert (k + shared) * expert_ff == 2 * model.module.config.d_ff


@pytest.mark.parametrize("name", ["deepseek_tiny", "decoder_only_deepseek_tiny"])
def test_tiny_deepseek_gins_build_with_sigmoid_routers_and_shared_experts(name):
    model = load_model(name)
    config = model.module.config
    stacks = [config.decoder_sparse] + ([config.encoder_sparse] if name == "deepseek_tiny" else [])
    for sparse in stacks:
        assert isinstance(sparse.router, SigmoidTokenChoice)
        assert (sparse.num_shared_experts, sparse.num_experts, sparse.d_ff) == (1, 16, 32)
        assert sparse.router.num_selected_experts == 3
    assert config.decoder_sparse.router.causality == "causal"
    count = count_parameters(model)
    assert count.activated == pytest.approx(count.total - count.expert * 13 / 16)


def test_deepseek_decoder_only_reference_config():
    model = load_model("decoder_only_deepseek_0p1b")
    sparse = model.module.config.decoder_sparse
    assert sparse.router.bias_update_rate == 1e-3 and sparse.router.causality == "causal"
    count = count_parameters(model)
    dense_ff, expert_ff, d = 3072, 768, 768
    # 6 sparse layers of 64 routed experts and 2 shared ones (the experts' gelu: wi, wo) and a
    # router, each replacing a dense gated-gelu MLP (wi_0, wi_1, wo).
    routed = 64 * 2 * d * expert_ff
    assert count.expert == 6 * routed
    dense = count_parameters(load_model("decoder_only_0p1b_dense"))
    per_layer = routed + 2 * d * 2 * expert_ff + d * 64 - 3 * d * dense_ff
    assert count.total == dense.total + 6 * per_layer
    assert count.activated == pytest.approx(count.total - count.expert * (1 - 6 / 64))
