"""The models a router comparison trains: one registry entry per router setting.

An entry is a name, a label and the gin bindings that turn the comparison's base model (a
sparse T5 whose encoder MLPs alternate with MoE layers, see
`gin_configs/experiments/compare_routers.gin`) into that router's model. Everything else (sizes,
data, optimizer, seeds) comes from the preset, so entries differ only in the router. Adding a
router to the comparison is one `register_entry` call; the harness, the report and the figure
read entries from here only.

Capacity settings follow the Expert Choice paper's baselines, with this codebase's capacity
formula `ceil(cf * k * T / E)`: Switch top-1 at cf 1.25; GShard top-2 at cf 1 (2T/E slots
per expert, GShard's `2N / (G E)`), with its random second-expert policy and gates
renormalized over the two; expert choice at cf 2 (the compute of top-2) and cf 1 (of top-1).
Evaluation uses the training capacity (`eval_capacity_factor` = None), so held-out loss
measures the model as trained.
"""

from __future__ import annotations

import dataclasses

from moe.errors import ConfigurationError


@dataclasses.dataclass(frozen=True)
class ComparisonEntry:
    """One model of the comparison.

    Attributes:
      name: the entry's key (`ComparisonConfig.entries`, run folder names, results.json).
      label: what the report and the figure call it.
      bindings: gin bindings applied on top of the preset (the router and nothing else).
      sparse: False for the dense baseline (its MoE layers become dense MLPs).
      discrete: whether each token goes to whole experts (False for Soft MoE, whose slots mix
        every token of a group: drops and experts per token do not apply).
    """

    name: str
    label: str
    bindings: tuple[str, ...]
    sparse: bool = True
    discrete: bool = True


ENTRIES: dict[str, ComparisonEntry] = {}

_ENCODER_ROUTER = "encoder/SparseConfig.router"


def register_entry(entry: ComparisonEntry) -> ComparisonEntry:
    """Make `entry` available to `ComparisonConfig.entries` under `entry.name`."""
    if entry.name in ENTRIES and ENTRIES[entry.name] != entry:
        raise ValueError(f"A different comparison entry is already named {entry.name!r}.")
    ENTRIES[entry.name] = entry
    return entry


def router_entry(name: str, label: str, router: str, **settings: object) -> ComparisonEntry:
    """An entry whose encoder MoE layers use gin configurable `router` with `settings`."""
    scoped = f"encoder/{router}"
    bindings = [f"{_ENCODER_ROUTER} = @{scoped}()"]
    bindings += [f"{scoped}.{key} = {value!r}" for key, value in settings.items()]
    return register_entry(ComparisonEntry(name, label, tuple(bindings)))


def get_entries(names: list[str] | tuple[str, ...]) -> list[ComparisonEntry]:
    """The entries named, in order; an unknown name is an error listing the known ones."""
    unknown = [n for n in names if n not in ENTRIES]
    if unknown:
        raise ConfigurationError(
            f"Unknown comparison entries {unknown}. Known: {sorted(ENTRIES)}. Register a new "
            "one with moe.experiments.entries.register_entry."
        )
    if len(set(names)) != len(names):
        raise ConfigurationError(f"ComparisonConfig.entries lists an entry twice: {list(names)}.")
    return [ENTRIES[n] for n in names]


register_entry(ComparisonEntry(
    "dense", "Dense T5.1.1 (same MLP width)", ("NUM_ENCODER_SPARSE_LAYERS = 0",), sparse=False,
))
router_entry("switch_top1", "Switch top-1 (cf 1.25)", "TokenChoice",
             num_selected_experts=1, capacity_factor=1.25, eval_capacity_factor=None)
router_entry("gshard_top2", "GShard top-2 (cf 1, random 2nd)", "TokenChoice",
             num_selected_experts=2, capacity_factor=1.0, eval_capacity_factor=None,
             second_expert_policy="random", normalize_gates=True)
router_entry("ec_cf2", "Expert choice (cf 2)", "ExpertChoice",
             capacity_factor=2.0, eval_capacity_factor=None)
router_entry("ec_cf1", "Expert choice (cf 1)", "ExpertChoice",
             capacity_factor=1.0, eval_capacity_factor=None)
router_entry("ec_cf0.5", "Expert choice (cf 0.5)", "ExpertChoice",
             capacity_factor=0.5, eval_capacity_factor=None)
router_entry("capped_ec_b2", "Capped expert choice (cf 2, b=2)", "CappedExpertChoice",
             capacity_factor=2.0, eval_capacity_factor=None, max_experts_per_token=2)
# Routers beyond the Expert Choice paper, at the compute of top-2.
router_entry("top2_global_balance", "Top-2, global-batch balance loss (cf 1)", "TokenChoice",
             num_selected_experts=2, capacity_factor=1.0, eval_capacity_factor=None,
             second_expert_policy="random", normalize_gates=True, balance_scope="batch")
router_entry("sigmoid_aux_free", "Sigmoid top-2, aux-loss-free bias (cf 1)",
             "SigmoidTokenChoice", num_selected_experts=2, capacity_factor=1.0,
             eval_capacity_factor=None, bias_update_rate=1e-3)
# Soft MoE mixes the tokens of one sequence (SOFT_MOE_GROUP_SIZE), with slots per expert from
# the preset so that E * slots = 2 * sequence length (the compute of top-2).
register_entry(ComparisonEntry(
    "soft_moe", "Soft MoE (per sequence, 2T/E slots per expert)",
    (f"{_ENCODER_ROUTER} = @encoder/SoftMoe()",
     "encoder/SoftMoe.slots_per_expert = %SOFT_MOE_SLOTS_PER_EXPERT",
     "encoder/SparseConfig.group_size = %SOFT_MOE_GROUP_SIZE",
     "encoder/SparseConfig.dispatch = 'mask'"),
    discrete=False,
))
# DeepSeekMoE's block rather than a router: experts split 2-way (16 of half width), one shared
# expert every token passes through, and top-3 of the routed ones: 64 + 3 x 64 hidden units a
# token, the compute of top-2 over 128-wide experts, with the same routed parameter count.
register_entry(ComparisonEntry(
    "deepseek_moe", "DeepSeekMoE block (16 half-width experts, 1 shared, top-3)",
    ("NUM_EXPERTS = 16", "EXPERT_MLP_DIM = 64", "NUM_SHARED_EXPERTS = 1",
     f"{_ENCODER_ROUTER} = @encoder/TokenChoice()",
     "encoder/TokenChoice.num_selected_experts = 3",
     "encoder/TokenChoice.capacity_factor = 1.0",
     "encoder/TokenChoice.eval_capacity_factor = None"),
))

