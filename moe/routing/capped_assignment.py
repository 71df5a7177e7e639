"""EC-CAP (Zhou et al. 2022 §3): expert choice with at most b experts per token.

The paper's assignment problem, per group, for scores S [E, T]:

    max_A  <S, A> + lambda * H(A)
    s.t.   sum_t A[e, t] = k_e  (each expert takes k_e tokens)
           sum_e A[e, t] <= b   (each token gets at most b experts)
           0 <= A <= 1

The entropy term makes each constraint's KL (Bregman) projection a closed-form rescaling, and
Dykstra's algorithm cycles through them with correction terms so that the iterates converge to
the projection onto the intersection. Everything runs in the log domain: with lambda = 0.001,
exp(S / lambda) overflows float32.

The fractional solution is then rounded to a 0/1 assignment that respects both caps exactly.
"""

import jax
import jax.numpy as jnp

_NEG = -1e30  # log(0) stand-in for padding tokens; finite so that no NaN appears.


def solve_capped_assignment(
    scores: jax.Array,
    real: jax.Array,
    capacity: int,
    max_experts_per_token: int,
    entropy_weight: float,
    num_iterations: int,
) -> jax.Array:
    """log A [G, E, T] of the entropy-regularized LP solution (Dykstra, log domain).

    The log is returned because with a small lambda most entries of A underflow to 0 in float32
    while their order still matters for rounding.

    Args:
      scores: [G, E, T] router probabilities S^T.
      real: [G, T] True for real tokens (padding never receives mass).
    """
    real_b = real[:, None, :]
    log_k = jnp.log(float(capacity))
    log_b = jnp.log(float(max_experts_per_token))

    def project_expert_sums(x):  # sum_t A = k_e (rescale rows)
        return x - jax.nn.logsumexp(x, axis=2, keepdims=True) + log_k

    def project_token_caps(x):  # sum_e A <= b (shrink only the columns over the cap)
        excess = jax.nn.logsumexp(x, axis=1, keepdims=True) - log_b
        return x - jnp.maximum(excess, 0.0)

    def project_box(x):  # A <= 1
        return jnp.minimum(x, 0.0)

    projections = (project_expert_sums, project_token_caps, project_box)
    # Each projection rescales A, i.e. shifts log A, so log A = (S - sum_i d_i) / lambda where
    # d_i are Dykstra's corrections in score units (dual variables). Keeping them in score units
    # lets lambda shrink geometrically from 1 to its target over the first half of the
    # iterations (epsilon scaling): at lambda = 1e-3 from a cold start the iterates barely move
    # in 100 iterations; warm-started they converge.
    anneal_steps = max(num_iterations // 2, 1)
    decay = entropy_weight ** (1.0 / anneal_steps)

    def body(i, duals):
        lam = jnp.maximum(entropy_weight, decay**i)
        x = jnp.where(real_b, (scores - sum(duals)) / lam, _NEG)
        new_duals = []
        for project, dual in zip(projections, duals):
            y = x + dual / lam
            x = jnp.where(real_b, project(y), _NEG)
            new_duals.append(lam * (y - x))
        return tuple(new_duals)

    zeros = jnp.zeros_like(scores)
    duals = jax.lax.fori_loop(0, num_iterations, body, (zeros, zeros, zeros))
    log_a = jnp.where(real_b, (scores - sum(duals)) / entropy_weight, _NEG)
    return log_a


def _rank_among(values: jax.Array, member: jax.Array, axis: int) -> jax.Array:
    """Rank (0 = largest) of each member entry among the members along `axis`; ties by index."""
    order = jnp.argsort(jnp.where(member, -values, jnp.inf), axis=axis, stable=True)
    return jnp.argsort(order, axis=axis, stable=True)


def round_assignment(
    fractional: jax.Array, real: jax.Array, capacity: int, max_experts_per_token: int
) -> jax.Array:
    """A 0/1 assignment [G, E, T] with <= capacity tokens per expert and <= b experts per token.

    `fractional` is any increasing function of A (log A here).
    1. Each expert takes its top-`capacity` tokens by A.
    2. A token over the cap keeps its `b` largest-A experts.
    3. Experts left short refill, one after the other, from the tokens still under the cap,
       best A first.
    4. An expert still short has every under-cap token t already; it then swaps: some expert e'
       without t hands it a token u that e lacks and takes t instead (an augmenting path of
       length one), best objective change first. This fills the expert whenever another expert
       is full and lacks t, which holds in every feasible case we test, tight ones included
       (b * T == E * k_e). A slot that cannot be filled stays empty.
    """
    num_experts = fractional.shape[1]
    real_b = jnp.broadcast_to(real[:, None, :], fractional.shape)
    chosen = real_b & (_rank_among(fractional, real_b, axis=2) < capacity)
    chosen = chosen & (_rank_among(fractional, chosen, axis=1) < max_experts_per_token)

    def refill(e, chosen):
        row = chosen[:, e, :]  # [G, T]
        room = max_experts_per_token - jnp.sum(chosen, axis=1)  # [G, T]
        candidate = real & ~row & (room > 0)
        need = capacity - jnp.sum(row, axis=-1, keepdims=True)  # [G, 1]
        take = candidate & (_rank_among(fractional[:, e, :], candidate, axis=-1) < need)
        return chosen.at[:, e, :].set(row | take)

    chosen = jax.lax.fori_loop(0, num_experts, refill, chosen)
    return jax.vmap(lambda a, c, r: _swap_repair(a, c, r, capacity, max_experts_per_token))(
        fractional, chosen, real
    )


def _swap_repair(
    score: jax.Array, chosen: jax.Array, real: jax.Array, capacity: int, cap: int
) -> jax.Array:
    """Step 4 of `round_assignment` for one group: score, chosen [E, T], real [T]."""
    num_experts, num_tokens = chosen.shape
    score = jnp.where(jnp.isfinite(score), score, jnp.finfo(jnp.float32).min / 4)

    def deficit(c):
        return capacity - jnp.sum(c, axis=1)

    def can_swap(c):
        room = real & (jnp.sum(c, axis=0) < cap)
        return jnp.any(deficit(c) > 0) & jnp.any(room)

    def swap(carry):
        c, steps = carry
        e = jnp.argmax(deficit(c))
        room = real & (jnp.sum(c, axis=0) < cap)
        t = jnp.argmax(jnp.where(room, score[e], -jnp.inf))
        # (e', u): e' holds u, e lacks u, e' lacks t.
        valid = c & ~c[e][None, :] & ~c[:, t][:, None] & real[None, :]
        valid = valid.at[e].set(False)
        gain = score[e][None, :] + score[:, t][:, None] - score
        flat = jnp.argmax(jnp.where(valid, gain, -jnp.inf))
        e2, u = flat // num_tokens, flat % num_tokens
        ok = jnp.any(valid)
        swapped = c.at[e2, u].set(False).at[e, u].set(True).at[e2, t].set(True)
        # With no swap available, stop: the step count jumps past the limit.
        return jnp.where(ok, swapped, c), jnp.where(ok, steps + 1, num_experts * capacity)

    def keep_going(carry):
        c, steps = carry
        return can_swap(c) & (steps < num_experts * capacity)

    chosen, _ = jax.lax.while_loop(keep_going, swap, (chosen, jnp.int32(0)))
    return chosen
