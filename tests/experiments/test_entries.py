"""Every comparison entry builds on the comparison's base model and changes only the encoder's
MoE layers: the rest of the network (attention, embeddings, the dense layers, the decoder)
has the same parameters as the dense baseline's, so entries differ only in the router (and, for
the DeepSeekMoE block, its experts)."""

import gin
import pytest

from moe import gin_cli
from moe.experiments import compare_routers, entries
from moe.models.param_count import abstract_params, count_parameters
from moe.routing.registry import ROUTERS

DEFAULT = compare_routers.preset_file("default")


def build(entry):
    try:
        gin.clear_config()
        gin_cli.parse_gin([DEFAULT], [*entry.bindings, "MODEL_DIR = '/unused'"])
        model, _, _ = compare_routers.run_inputs()
        return model
    finally:
        gin.clear_config()


def flat_shapes(model):
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(abstract_params(model))[0]
    return {"/".join(getattr(k, "key", str(k)) for k in path): leaf.shape
            for path, leaf in leaves}


@pytest.mark.parametrize("name", sorted(entries.ENTRIES))
def test_entry_builds_and_changes_only_the_moe_layers(name):
    entry = entries.ENTRIES[name]
    model = build(entry)
    dense = flat_shapes(build(entries.ENTRIES["dense"]))
    shapes = flat_shapes(model)
    sparse = model.module.config.encoder_sparse
    moe_layers = ({f"encoder/layers_{i}/{part}/" for i in (1, 3)
                   for part in ("mlp", "shared_experts")} if entry.sparse else set())
    outside = lambda table: {k: v for k, v in table.items()
                             if not any(k.startswith(p) for p in moe_layers)}
    count = count_parameters(model)
    if entry.sparse:
        assert outside(shapes) == outside(dense)
        assert count.expert > 0 and sparse.num_sparse_layers == 2
        assert type(sparse.router).__name__ in ROUTERS
    else:
        assert count.expert == 0 and sparse.num_sparse_layers == 0


def test_compute_is_matched_as_stated():
    """Experts a token reaches on average, as the report states them: EC cf 2, top-2 and Soft
    MoE at 2 (Soft MoE: E * slots = 2 x its sequence), Switch and EC cf 1 at 1."""
    per_token = {}
    for name in ("switch_top1", "gshard_top2", "ec_cf2", "ec_cf1", "soft_moe", "capped_ec_b2"):
        sparse = build(entries.ENTRIES[name]).module.config.encoder_sparse
        per_token[name] = sparse.router.experts_per_token(sparse.group_size, sparse.num_experts)
    assert per_token == {"switch_top1": 1.0, "gshard_top2": 2.0, "ec_cf2": 2.0, "ec_cf1": 1.0,
                         "soft_moe": 2.0, "capped_ec_b2": 2.0}


def test_a_new_entry_is_one_registration():
    entry = entries.router_entry("test_top3", "top-3", "TokenChoice", num_selected_experts=3)
    try:
        assert entries.get_entries(["dense", "test_top3"])[1] is entry
        assert build(entry).module.config.encoder_sparse.router.num_selected_experts == 3
    finally:
        del entries.ENTRIES["test_top3"]
