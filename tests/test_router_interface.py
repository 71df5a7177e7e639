"""The router interface: a new router is one class implementing `RouterSpec`, nothing else.

The router defined here (each token goes to the expert its position hashes to, as in hash
layers) is registered like the built-in ones and then works, unchanged, in every place that
uses routers: gin, the MoE layer with each dispatch, the causal check and the parameter count.
"""

import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import moe_layer as moe_layer_module
from moe.errors import ConfigurationError
from moe.models.config import SparseConfig
from moe.models.param_count import count_parameters
from moe.moe_layer import MoeLayer
from moe.routing import (
    ROUTERS,
    ExpertChoice,
    RouterSpec,
    RoutingPlan,
    SoftMoe,
    TokenChoice,
    losses,
    register_router,
)
from moe.routing.interface import DISPATCHES, RouterDefaults
from moe.routing.plan import real_mask
from moe.routing.token_choice import TokenChoices, slots_from_choices
from tests.models.helpers import encdec_model, tiny_config


@register_router
@dataclasses.dataclass(frozen=True)
class PositionHashRouter(RouterDefaults):
    """Token t of a group goes to expert t mod E, weighted by its router probability.

    `RouterDefaults` gives it no noise, no router state and one logit per expert; it
    implements the rest.
    """

    capacity_factor: float = 1.0
    ignore_padding_tokens: bool = True
    allow_causal: bool = False

    causality = "causal"
    dispatches = DISPATCHES

    def experts_per_token(self, group_size, num_experts):
        return 1.0

    def validate(self, num_experts):
        if self.capacity_factor <= 0:
            raise ConfigurationError("PositionHashRouter.capacity_factor must be > 0.")

    def capacity(self, num_tokens, num_experts, deterministic):
        slots = int(np.ceil(self.capacity_factor * num_tokens / num_experts))
        return max(1, min(num_tokens, slots))

    def route(self, logits, padding_mask, *, deterministic=True, rng=None, capacity=None):
        num_groups, num_tokens, num_experts = logits.shape
        capacity = self.group_capacity(logits, capacity, deterministic)
        real = real_mask(padding_mask, (num_groups, num_tokens))
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        experts = jnp.broadcast_to(jnp.arange(num_tokens) % num_experts, (num_groups, num_tokens))
        experts = experts[..., None].astype(jnp.int32)  # [G, T, 1]
        gates = jnp.take_along_axis(probs, experts, axis=-1)
        selected = real[..., None]
        # No `slot` in its choices: the index dispatch then combines by scatter (a router
        # need not give the inverse map).
        slot_token, slot_weight, kept, _ = slots_from_choices(
            experts, gates, selected, None, num_experts, capacity
        )
        return RoutingPlan(
            slot_token=slot_token,
            slot_weight=slot_weight,
            probs=probs,
            logits=logits,
            padding_mask=real,
            auxiliary_loss=jnp.zeros((), jnp.float32),
            router_z_loss=losses.router_z_loss(logits, real),
            choices=TokenChoices(experts=experts, gates=gates, selected=selected, kept=kept),
        )


def test_the_layer_refuses_a_dispatch_the_router_cannot_run():
    for spec, dispatch in [(SoftMoe(), "index"), (SoftMoe(), "dropless"),
                           (ExpertChoice(), "dropless")]:
        with pytest.raises(ConfigurationError, match=f"dispatch={spec.dispatches[0]!r}"):
            MoeLayer(4, 16, router=spec, dispatch=dispatch).check_config()


def test_every_registered_router_implements_the_interface():
    assert {"TokenChoice", "ExpertChoice", "CappedExpertChoice"} <= set(ROUTERS)
    for name, cls in ROUTERS.items():
        assert isinstance(cls(), RouterSpec), name


def test_a_new_router_is_configurable_from_gin():
    try:
        gin.parse_config("moe.routing.PositionHashRouter.capacity_factor = 3.0")
        spec = gin.get_configurable("moe.routing.PositionHashRouter")()
    finally:
        gin.clear_config()
    assert spec == PositionHashRouter(capacity_factor=3.0)


def test_a_new_router_runs_in_every_dispatch_and_they_agree():
    spec = PositionHashRouter(capacity_factor=1.0)
    x = jax.random.normal(jax.random.key(0), (2, 16, 8))
    mask = jnp.arange(16)[None, :] < jnp.array([[16], [11]])
    outputs = {}
    for dispatch in ("index", "mask", "dropless"):
        layer = MoeLayer(4, 16, router=spec, dispatch=dispatch, max_group_size=16)
        params = layer.init(jax.random.key(1), x, mask)["params"]
        outputs[dispatch] = layer.apply({"params": params}, x, mask)
    for dispatch in ("mask", "dropless"):
        np.testing.assert_allclose(outputs[dispatch], outputs["index"], atol=1e-5)
    # Position t went to expert t mod 4 only: padding positions get exactly zero.
    assert np.all(np.asarray(outputs["index"])[1, 11:] == 0)


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_causal_stacks_refuse_routers_that_look_ahead(name):
    spec = ROUTERS[name]()
    dispatch = spec.dispatches[0]  # one the router runs with
    layer = MoeLayer(4, 16, router=spec, causal=True, dispatch=dispatch)
    if spec.causality == "looks_ahead":
        with pytest.raises(ConfigurationError, match="leaks the future"):
            layer.check_config()
    else:
        layer.check_config()
    MoeLayer(4, 16, router=dataclasses.replace(spec, allow_causal=True), causal=True,
             dispatch=dispatch).check_config()


def test_capacity_leaks_are_warned_once_and_not_for_causal_fill_orders(caplog):
    leaky = TokenChoice(2, capacity_factor=1.1)
    for _ in range(2):
        MoeLayer(4, 16, router=leaky, causal=True).check_config()
    warned = [r for r in caplog.records if "leaks the future through capacity" in r.getMessage()]
    assert len(warned) == 1
    # The warning is remembered per spec: forget it, so that each quiet case could warn.
    moe_layer_module._warn_capacity_leak.cache_clear()
    for quiet in (
        MoeLayer(4, 16, router=dataclasses.replace(leaky, fill_order="token"), causal=True),
        MoeLayer(4, 16, router=leaky, causal=True, dispatch="dropless"),
        MoeLayer(4, 16, router=dataclasses.replace(leaky, allow_causal=True), causal=True),
        MoeLayer(4, 16, router=dataclasses.replace(leaky, min_capacity=5), causal=False),
    ):
        quiet.check_config()
    warned = [r for r in caplog.records if "leaks the future through capacity" in r.getMessage()]
    assert len(warned) == 1


def test_parameter_counts_read_experts_per_token_from_the_router():
    one = count_parameters(encdec_model(tiny_config(router=PositionHashRouter())))
    two = count_parameters(encdec_model(tiny_config(
        router=dataclasses.replace(PositionHashRouter(), capacity_factor=2.0))))
    assert one.total == two.total and one.expert > 0
    # 4 experts per layer, 1 reached per token: a quarter of the expert parameters is activated.
    assert one.activated == pytest.approx(one.total - one.expert + one.expert / 4)
    assert SparseConfig(router=PositionHashRouter()).router.experts_per_token(64, 4) == 1.0
