"""Moving tokens to expert buffers and back, three ways that compute the same function.

- mask: one-hot dispatch tensor and einsums, [G, E, C, T] (TPU style, O(G*T*E*C*d) work);
- index: gather by slot index, O(G*E*C*d) data movement. For token choice the plan also
  names each choice's slot (`TokenChoices.slot`), and every move, forward and backward, is a
  gather (`gather_rows`): no scatter-add, which GPUs run on atomics (nondeterministic
  summation order) and TPUs slowly. Expert choice combines by scatter-add (a token may sit in
  any number of slots);
- dropless: no buffers: sort the token choices by expert and run `jax.lax.ragged_dot`
  (token choice only; no capacity, so nothing is dropped). Under a mesh with an 'expert' axis
  `moe.expert_parallel` runs the same code per device, the rows moved by an all-to-all.

The capacity forms read the same `RoutingPlan` slots, so they route identically; dropless
reads the token-major choices of the same plan. Combining runs in float32 whatever the expert
dtype (flaxformer's combine dtype): the weights are router probabilities, and rounding them to
bfloat16 would put the router's float32 precision to waste.

The mask form's one-hot einsums run at `Precision.HIGHEST` (as flaxformer runs them on TPU):
a one-hot matmul only moves values, so at full precision it equals the index form exactly,
whereas the backends' default precision rounds float32 operands (TF32 on GPU, one bf16 pass on
TPU). Soft plans' weights are real mixtures and keep the default precision of any matmul.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from moe.errors import ConfigurationError
from moe.routing.plan import RoutingPlan, TokenChoices


def _dispatch_mask(plan: RoutingPlan, dtype: jnp.dtype) -> jax.Array:
    """[G, E, C, T] one-hot of the token in each slot (all zeros for an empty slot)."""
    return jax.nn.one_hot(plan.slot_token, plan.padding_mask.shape[1], dtype=dtype)


def _mask_precision(plan: RoutingPlan) -> jax.lax.Precision | None:
    """Full precision for one-hot masks (exact data movement), the default for soft weights."""
    return jax.lax.Precision.HIGHEST if plan.soft is None else None


def dispatch_by_mask(x: jax.Array, plan: RoutingPlan) -> jax.Array:
    """x [G, T, d] -> expert buffers [G, E, C, d] (soft plans: weighted mixes of tokens)."""
    weights = _dispatch_mask(plan, x.dtype) if plan.soft is None else plan.soft.dispatch
    num_groups, num_experts, capacity, num_tokens = weights.shape
    # One slot axis [G, E*C, T]: with (E, C) as two free axes XLA:CPU's dot backward is ~50x
    # slower (measured with Soft MoE's 4096 slots x 2048 tokens).
    slots = weights.reshape(num_groups, num_experts * capacity, num_tokens).astype(x.dtype)
    buffers = jnp.einsum("gtd,gst->gsd", x, slots, precision=_mask_precision(plan))
    return buffers.reshape(num_groups, num_experts, capacity, x.shape[-1])


def combine_by_mask(expert_out: jax.Array, plan: RoutingPlan) -> jax.Array:
    """Expert outputs [G, E, C, d] -> weighted sum per token [G, T, d] (float32)."""
    if plan.soft is None:
        combine = _dispatch_mask(plan, jnp.float32) * plan.slot_weight[..., None]
    else:
        combine = plan.soft.combine
    num_groups, num_experts, capacity, num_tokens = combine.shape
    slots = num_experts * capacity  # one slot axis, as in `dispatch_by_mask`
    return jnp.einsum("gsd,gst->gtd",
                      expert_out.astype(jnp.float32).reshape(num_groups, slots, -1),
                      combine.reshape(num_groups, slots, num_tokens),
                      precision=_mask_precision(plan))


def _padded(rows: jax.Array) -> jax.Array:
    """[G, N, d] -> [G, N + 1, d]: row N is zeros (the row of every 'none' index)."""
    return jnp.pad(rows, ((0, 0), (0, 1), (0, 0)))


def _gather(rows: jax.Array, index: jax.Array) -> jax.Array:
    """rows [G, N, d] at index [G, M, K] (N: a zero row) -> [G, M, K, d]."""
    num_groups, num_out, k = index.shape
    flat = index.reshape(num_groups, num_out * k, 1)
    return jnp.take_along_axis(_padded(rows), flat, axis=1).reshape(
        num_groups, num_out, k, rows.shape[-1])


@jax.custom_vjp
def gather_rows(rows: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """`rows` [G, N, d] at `index` [G, M, K] -> [G, M, K, d], whose gradient is a gather too.

    `inverse` [G, N, J] lists, for each source row, the flat positions m * K + k that read it
    (M * K: none). The backward sums those J rows of the output gradient, where autodiff's
    gradient of a gather would scatter-add, which GPUs serialize on atomics and TPUs
    run slowly. Index positions equal to N read zeros and get no gradient.
    """
    return _gather(rows, index)


def _gather_rows_fwd(rows, index, inverse):
    return _gather(rows, index), inverse


def _gather_rows_bwd(inverse, d_out):
    num_groups, num_out, k, d_model = d_out.shape
    flat = d_out.reshape(num_groups, num_out * k, d_model)
    return jnp.sum(_gather(flat, inverse), axis=2), None, None  # indices: no gradient


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def _choice_slots(plan: RoutingPlan) -> jax.Array | None:
    """The plan's [G, T, k] slot of each choice, where its router gives one (token choice)."""
    return None if plan.choices is None else plan.choices.slot


def _choice_of_slot(choices: TokenChoices, num_slots: int) -> jax.Array:
    """[G, E*C, 1] the flat choice t * k + r each slot holds (T * k: empty slot), from the
    choices' slots: the inverse `gather_rows` needs for the combine."""
    num_groups, num_tokens, k = choices.slot.shape
    groups = jnp.arange(num_groups)[:, None]
    choice = jnp.arange(num_tokens * k, dtype=jnp.int32)
    empty = jnp.full((num_groups, num_slots), num_tokens * k, jnp.int32)
    table = empty.at[groups, choices.slot.reshape(num_groups, -1)].set(choice, mode="drop")
    return table[..., None]


def dispatch_by_index(x: jax.Array, plan: RoutingPlan) -> jax.Array:
    """x [G, T, d] -> expert buffers [G, E, C, d] by gathering slot tokens (empty slots: 0).

    With the choices' slots (token choice), the gradient gathers each token's k slots back;
    otherwise (expert choice: a token may sit in any number of slots) it is autodiff's
    scatter-add.
    """
    num_groups, num_experts, capacity = plan.slot_token.shape
    slot_token = plan.slot_token.reshape(num_groups, num_experts * capacity, 1)
    choice_slots = _choice_slots(plan)
    if choice_slots is not None:
        gathered = gather_rows(x, slot_token, choice_slots)
    else:
        gathered = _gather(x, slot_token)
    return gathered.reshape(num_groups, num_experts, capacity, x.shape[-1])


def combine_by_index(expert_out: jax.Array, plan: RoutingPlan) -> jax.Array:
    """Expert outputs [G, E, C, d] -> per-token weighted sum [G, T, d] (float32).

    Token choice with the choices' slots: each token gathers its k slots, and the gradient
    gathers each slot's token (no scatter of rows either way; only the [G, E*C] table of which
    choice fills which slot is scattered). Otherwise a scatter-add of the weighted slots onto
    their tokens.
    """
    num_groups, num_tokens = plan.padding_mask.shape
    num_experts, capacity, d_model = expert_out.shape[1:]
    slots = expert_out.reshape(num_groups, num_experts * capacity, d_model)
    choices = plan.choices
    if _choice_slots(plan) is not None:
        rows = gather_rows(slots, choices.slot, _choice_of_slot(choices, slots.shape[1]))
        weights = jnp.where(choices.kept, choices.gates, 0.0)[..., None]  # [G, T, k, 1]
        # Multiply and sum, not a dot: a dot would round float32 at the default precision.
        return jnp.sum(rows.astype(jnp.float32) * weights, axis=2)
    weighted = slots.astype(jnp.float32) * plan.slot_weight.reshape(num_groups, -1)[..., None]
    out = jnp.zeros((num_groups, num_tokens + 1, d_model), jnp.float32)
    out = out.at[jnp.arange(num_groups)[:, None], plan.slot_token.reshape(num_groups, -1)].add(
        weighted
    )
    return out[:, :num_tokens]


BUFFERED_DISPATCH: dict[str, tuple[Callable, Callable]] = {
    "mask": (dispatch_by_mask, combine_by_mask),
    "index": (dispatch_by_index, combine_by_index),
}


def plan_choices(plan: RoutingPlan) -> TokenChoices:
    """The plan's token-major choices, or a ConfigurationError for plans without them."""
    if plan.choices is None:
        raise ConfigurationError(
            "dispatch='dropless' needs a router whose tokens choose their experts (token "
            "choice); this plan gives each expert a fixed number of tokens. Use dispatch='index' "
            "or 'mask'."
        )
    return plan.choices


def dropless_moe(
    x: jax.Array,
    plan: RoutingPlan,
    run_experts: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:
    """Token choice without capacity: x [G, T, d] -> [G, T, d].

    Every selected (token, expert) choice is computed: choices are sorted by expert, the experts
    run as one grouped matmul (`run_experts(sorted_x [M, d], group_sizes [E])`), and the results
    are weighted and summed back per token. Unselected choices (padding, or dropped by the
    second-expert policy) are sorted past the last group and never computed.
    """
    return dropless_choices(x, plan_choices(plan), plan.probs.shape[-1], run_experts)


def dropless_choices(
    x: jax.Array,
    choices: TokenChoices,
    num_experts: int,
    run_experts: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:
    """`dropless_moe` on the choices alone: sort by expert, `run_experts`, weight and sum.

    Rows move by `gather_rows` both ways, as in index dispatch: the sorted rows gather their
    tokens (backward: each token gathers its k rows) and each token gathers its k results
    (backward: each row gathers its token), so no [rows, d] scatter-add runs forward or backward
    (on a GPU those were a quarter of the layer's time outside the matmuls). Only the int32
    table of each choice's sorted row is scattered.

    Split out so that the expert-parallel form (`moe.expert_parallel`) runs this same code on
    each device's groups, with a `run_experts` that sends the sorted rows to the experts' devices.
    """
    num_groups, num_tokens, d_model = x.shape
    k = choices.experts.shape[-1]
    num_choices = num_groups * num_tokens * k  # one sorted row each; selected ones first
    selected = choices.selected.reshape(-1)
    expert_of = jnp.where(selected, choices.experts.reshape(-1), num_experts)
    order = jnp.argsort(expert_of, stable=True).astype(jnp.int32)  # sorted row -> choice
    group_sizes = jnp.bincount(expert_of, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    choices_range = jnp.arange(num_choices, dtype=jnp.int32)
    row_of = jnp.zeros(num_choices, jnp.int32).at[order].set(choices_range)  # choice -> row
    row_of = jnp.where(selected, row_of, num_choices)  # unselected: no row (reads zeros)
    choice_of = jnp.where(selected[order], order, num_choices)  # row -> choice (none: past end)
    token_of = jnp.minimum(choice_of // k, num_groups * num_tokens)  # none -> the zero row
    sorted_x = gather_rows(x.reshape(1, -1, d_model), token_of.reshape(1, -1, 1),
                           row_of.reshape(1, -1, k))
    sorted_out = run_experts(sorted_x.reshape(num_choices, d_model), group_sizes)
    rows = gather_rows(sorted_out[None], row_of.reshape(1, -1, k),
                       choice_of.reshape(1, -1, 1))  # [1, G*T, k, d]
    gates = jnp.where(choices.selected, choices.gates, 0.0).reshape(1, -1, k, 1)
    # Multiply and sum, not a dot: a dot would round float32 at the default precision.
    out = jnp.sum(rows.astype(jnp.float32) * gates, axis=2)
    return out.reshape(num_groups, num_tokens, d_model)
