"""The train state, the compiled train and eval steps, and the training loop.

`Trainer` owns what is compiled: it initializes the state `{'step', 'params', 'opt_state'}`
(plus `'router_state'` for models whose routers keep state)
directly into its shardings (the partitioner's logical-axis rules), and compiles the train step
(gradient, optional microbatch accumulation, optimizer update) and the eval step with
`jax.jit(in_shardings, out_shardings)`.

`train_loop` drives it: batches from a resumable iterator, checkpoints every period (with the
iterator position), metrics averaged over each log period (with a progress line at least every
`progress_interval_s` in between), evaluation every eval period, a clean checkpoint
and exit on SIGTERM (preemption), and a stop with a clear message on a non-finite loss (the
last good checkpoint is left as it was).
"""

import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe import distributed, optimizers
from moe.checkpoints import Checkpointer, flatten_params
from moe.metrics_writer import MetricsWriter
from moe.models.param_count import total_size
from moe.partitioning import Partitioner
from moe.routing.shell import ROUTER_LOADS, ROUTER_STATE

State = dict[str, Any]
# Metrics summed (not averaged) over microbatches and eval batches.
SUMMED_METRICS = ("num_tokens", ROUTER_LOADS)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@gin.configurable
class Trainer:
    """Compiled initialization, train step and eval step for `model` on `partitioner`'s mesh.

    Args:
      model: an object with `get_initial_variables(rng, input_shapes, input_types)` and
        `loss_fn(params, batch, dropout_rng) -> (loss, metrics)` (see moe.models).
      partitioner: the mesh and shardings.
      input_shapes: model feature name -> global batch shape, for initialization.
      learning_rate: a float or a schedule `step -> rate`.
      optimizer: `(learning_rate, factor_specs) -> optax.GradientTransformation`.
      num_microbatches: split each batch into this many microbatches and accumulate gradients
        (same update as the whole batch, for losses that average over examples). Routers
        whose loss counts over the whole batch (`TokenChoice(balance_scope='batch')`) get its
        counts from a forward pass over every microbatch first (models with a
        `batch_counts` method); other models' steps have no such pass.
      seed: seeds parameter initialization and dropout (dropout key = fold_in(seed, step)).
    """

    def __init__(
        self,
        model: Any,
        partitioner: Partitioner,
        input_shapes: Mapping[str, tuple[int, ...]],
        input_types: Mapping[str, Any] | None = None,
        learning_rate: float | optimizers.Schedule = 1e-3,
        optimizer: Callable[..., optax.GradientTransformation] = optimizers.build_optimizer,
        num_microbatches: int = 1,
        seed: int = 0,
    ):
        self.model = model
        self.partitioner = partitioner
        self.input_shapes = dict(input_shapes)
        self.input_types = input_types
        self.num_microbatches = num_microbatches
        self.seed = seed
        batch = next(iter(self.input_shapes.values()))[0]
        if num_microbatches < 1 or batch % num_microbatches:
            raise ValueError(
                f"num_microbatches={num_microbatches} must divide the batch size {batch}."
            )
        self.schedule = learning_rate if callable(learning_rate) else (
            optimizers.constant_schedule(learning_rate)
        )

        key = jax.random.key(0)  # made outside the mesh: it may be a slice compiled for
        with partitioner.context():  # ahead of time, whose devices cannot run anything
            boxed = jax.eval_shape(self._init_variables, key)
        boxed_params = boxed["params"]
        # Routers with state (e.g. auxiliary-loss-free balancing) keep it beside the params.
        self.has_router_state = bool(boxed.get(ROUTER_STATE))
        self.param_shardings = partitioner.get_shardings(boxed_params)
        self.logical_param_specs = nn.get_partition_spec(boxed_params)
        # Per parameter, each axis's role in Adafactor's factoring (batch, row, column).
        self.factor_specs = optimizers.factor_specs_from_boxed(boxed_params)
        self.tx = optimizer(learning_rate=learning_rate, factor_specs=self.factor_specs)
        abstract = jax.eval_shape(self._init_state, jax.random.key(0))
        opt_shardings = partitioner.optimizer_state_shardings(
            abstract["opt_state"], abstract["params"], self.param_shardings
        )
        replicated = partitioner.replicated_sharding
        self.state_shardings = {
            "step": replicated,
            "params": self.param_shardings,
            "opt_state": opt_shardings,
        }
        if self.has_router_state:
            self.state_shardings[ROUTER_STATE] = jax.tree.map(
                lambda _: replicated, abstract[ROUTER_STATE]
            )
        self.router_state_shardings = self.state_shardings.get(ROUTER_STATE, {})
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract,
            self.state_shardings,
        )
        batch_sharding = partitioner.batch_sharding
        # The CPU compiler options below are for CPU meshes only (the mesh may be a TPU slice
        # compiled ahead of time, see moe.plan).
        on_cpu = partitioner.mesh.devices.flat[0].platform == "cpu"
        # Initialization runs once: compiled without XLA's backend optimizations, which on CPU
        # cuts its compile time by about 2.5x for a tiny model at no cost that matters.
        self._init_jit = jax.jit(
            self._init_state,
            out_shardings=self.state_shardings,
            compiler_options={"xla_backend_optimization_level": 0} if on_cpu else None,
        )
        # On CPU, XLA's backend optimization level 1 (default 3) compiles the train step about
        # 25% faster at the same step time: the matmuls are library calls either way
        # (measured with moe.benchmarks.train_speed). Other backends keep their defaults.
        step_options = {"xla_backend_optimization_level": 1} if on_cpu else None
        self.train_step = partitioner.partition(
            self._train_step,
            in_shardings=(self.state_shardings, batch_sharding),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
            compiler_options=step_options,
        )
        self.eval_step = partitioner.partition(
            self._eval_step,
            in_shardings=(self.param_shardings, batch_sharding, self.router_state_shardings),
            out_shardings=replicated,
        )

    # --- Initialization -----------------------------------------------------------------

    def _init_variables(self, rng):
        return self.model.get_initial_variables(rng, self.input_shapes, self.input_types)

    def _init_state(self, rng) -> State:
        variables = nn.meta.unbox(self._init_variables(rng))
        params = variables["params"]
        state = {
            "step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)
        }
        if variables.get(ROUTER_STATE):
            state[ROUTER_STATE] = variables[ROUTER_STATE]
        return state

    def init_state(self) -> State:
        """A fresh state (parameters from `seed`), created directly in its shardings."""
        with self.partitioner.context():
            return self._init_jit(jax.random.key(self.seed))

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch as the steps see it, without data: int32 features unless
        `input_types` says otherwise (as the feature converters give them), batch-sharded."""
        types = self.input_types or {}
        return {
            name: jax.ShapeDtypeStruct(shape, types.get(name, jnp.int32),
                                       sharding=self.partitioner.batch_sharding)
            for name, shape in self.input_shapes.items()
        }

    def lower_train_step(self) -> jax.stages.Lowered:
        """The train step traced for this trainer's state and global batch, ahead of the
        first batch: compiling it (`moe.compilation_cache.compile_in_background`) fills the
        cache the first `train_step` call looks in."""
        with self.partitioner.context():
            return self.train_step.lower(self.abstract_state, self.abstract_batch())

    def state_with_params(self, state: State, params: Any) -> State:
        """`state` with new parameters and a fresh optimizer state (fine-tuning, upcycling);
        the router state is kept as it is in `state`."""

        def fresh_state(params, router_state):
            new = {"step": jnp.zeros((), jnp.int32), "params": params,
                   "opt_state": self.tx.init(params)}
            return {**new, ROUTER_STATE: router_state} if self.has_router_state else new

        fresh = self.partitioner.partition(
            fresh_state,
            in_shardings=(self.param_shardings, self.router_state_shardings),
            out_shardings=self.state_shardings,
        )
        return fresh(params, state.get(ROUTER_STATE, {}))

    def _loss_fn(self, params, batch, rng, router_state, batch_counts=None):
        """The model's loss, given the router state only by models that have one, and the
        whole batch's routing counts only to microbatches of models whose routers ask."""
        extra = {}
        if router_state:
            extra["router_state"] = router_state
        if batch_counts:
            extra["batch_counts"] = batch_counts
        return self.model.loss_fn(params, batch, rng, **extra)

    def _batch_counts(self, params, micro, rng, router_state):
        """The routers' whole-batch counts (`model.batch_counts`) summed over the microbatches
        `micro` [k, ...] and divided by k, or None when no router of the model asks for any.

        A forward pass per microbatch with the key of its gradient pass, so that noisy routing
        (jitter, random second experts) selects the same experts in both. Whether any router
        asks is known from shapes (traced, not compiled): without one nothing is computed.
        """
        count = getattr(self.model, "batch_counts", None)
        if count is None:
            return None
        k = self.num_microbatches
        first = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), micro)
        shapes = jax.eval_shape(count, params, first, rng, router_state)
        if not jax.tree.leaves(shapes):
            return None

        def body(total, inputs):
            batch_part, i = inputs
            counts = count(params, batch_part, jax.random.fold_in(rng, i), router_state)
            return jax.tree.map(jnp.add, total, counts), None

        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(k)))
        return jax.tree.map(lambda c: c / k, total)

    # --- Steps ----------------------------------------------------------------------------

    def _loss_and_grads(self, params, batch, rng, router_state=None):
        grad_fn = jax.value_and_grad(self._loss_fn, has_aux=True)
        k = self.num_microbatches
        batch_counts = micro = None
        if k > 1:
            # Microbatch i takes examples i, i+k, i+2k, ...: each stays spread over the devices.
            micro = jax.tree.map(
                lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch
            )
            # Routers balancing over the whole batch need its counts before any gradient pass:
            # one forward pass over the microbatches, only for models with such routers.
            batch_counts = self._batch_counts(params, micro, rng, router_state)

        def one(batch_part, rng_part):
            (loss, metrics), grads = grad_fn(
                params, batch_part, rng_part, router_state, batch_counts
            )
            return grads, {**metrics, "loss": loss}

        if k == 1:
            return one(batch, rng)
        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(one, first, rng)
        )

        def body(carry, inputs):
            batch_part, i = inputs
            out = one(batch_part, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, out), None

        (grads, metrics), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(k)))
        grads = jax.tree.map(lambda g: g / k, grads)
        metrics = {n: v if n in SUMMED_METRICS else v / k for n, v in metrics.items()}
        return grads, metrics

    def _train_step(self, state: State, batch: Mapping[str, jax.Array]):
        step = state["step"]
        rng = jax.random.fold_in(jax.random.key(self.seed + 1), step)
        router_state = state.get(ROUTER_STATE, {})
        grads, metrics = self._loss_and_grads(state["params"], batch, rng, router_state)
        # The step's expert loads, summed over microbatches (and, being global arrays, over
        # every device): the routers' state moves once per step, after it.
        router_loads = metrics.pop(ROUTER_LOADS, None)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            **metrics,
            "learning_rate": self.schedule(step),
            "grad_norm": optax.global_norm(grads),
            # A non-finite update poisons the parameters before any loss shows it.
            "update_norm": optax.global_norm(updates),
        }
        metrics = jax.tree.map(lambda x: x.astype(jnp.float32), metrics)
        new_state = {"step": step + 1, "params": params, "opt_state": opt_state}
        if self.has_router_state:
            new_state[ROUTER_STATE] = self.model.update_router_state(router_state, router_loads)
        return new_state, metrics

    def _eval_step(self, params, batch, router_state):
        loss, metrics = self._loss_fn(params, batch, None, router_state)
        return jax.tree.map(lambda x: x.astype(jnp.float32), {**metrics, "loss": loss})

    def evaluate(
        self,
        params,
        batches: Iterable[Mapping[str, np.ndarray]],
        router_state: Any = None,
    ) -> dict[str, Any]:
        """Teacher-forced metrics over `batches`, weighted by their number of target tokens
        (`router_state`: the train state's, for models whose routers keep state)."""
        totals: dict[str, Any] = {}
        weight_sum = 0.0
        for batch in self._global_batches(batches):
            metrics = jax.device_get(self.eval_step(params, batch, router_state or {}))
            weight = float(metrics.get("num_tokens", 1.0))
            weight_sum += weight
            for name, value in metrics.items():
                value = np.asarray(value, np.float64)
                contribution = value if name in SUMMED_METRICS else value * weight
                totals[name] = totals.get(name, 0.0) + contribution
        if not totals:
            raise ValueError("Evaluation got no batches: is the validation split empty?")
        return {
            n: v if n in SUMMED_METRICS else v / max(weight_sum, 1e-9) for n, v in totals.items()
        }

    def _global_batches(self, batches: Iterable[Mapping[str, np.ndarray]]):
        """Global batches from this host's batches, for as long as any host has one left.

        Hosts read different shards of a finite split, which need not give each host the same
        number of batches; a host that ran out feeds all-zero (zero-weight) batches until every
        host is done, so that no host is left waiting alone in a collective.
        """
        iterator = iter(batches)
        template = None
        while True:
            host_batch = next(iterator, None)
            if not distributed.any_process(host_batch is not None):
                return
            if host_batch is None:
                host_batch = self._zero_host_batch(template)
            else:
                template = host_batch
            yield self.partitioner.shard_batch(host_batch)

    def _zero_host_batch(self, template: Mapping[str, np.ndarray] | None) -> dict[str, Any]:
        if template is not None:
            return {k: np.zeros_like(v) for k, v in template.items()}
        global_rows = next(iter(self.input_shapes.values()))[0]
        rows = global_rows // self.partitioner.get_data_layout(global_rows).num_shards
        return {k: np.zeros((rows, *shape[1:]), np.int32) for k, shape in self.input_shapes.items()}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class PreemptionWatcher:
    """Turns SIGTERM (TPU preemption, `kill`) into a request the loop sees between steps."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)
        return False


def log_param_table(params: Any, logical_specs: Any, shardings: Any) -> str:
    """One line per parameter: path, shape, logical axes, mesh sharding; then the total."""
    flat = flatten_params(params)
    specs = flatten_params(
        jax.tree.map(lambda s: str(tuple(s)), logical_specs,
                     is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    )
    shards = flatten_params(
        jax.tree.map(lambda s: str(tuple(s.spec)), shardings,
                     is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    )
    width = max(len(k) for k in flat)
    lines = [
        f"{k:<{width}}  {tuple(v.shape)!s:<18} {specs.get(k, '')!s:<36} {shards.get(k, '')}"
        for k, v in flat.items()
    ]
    lines.append(f"Total parameters: {total_size(params):,}")
    return "\n".join(lines)


class PeriodMetrics:
    """The train metrics averaged over the steps of a log period, as T5X logs them.

    Each step's metrics are added on the device (asynchronous, no transfer); the host reads
    the sums once per period. `learning_rate` is the last step's (the schedule's value where
    the row is logged), and `loss_last_step` keeps the last step's loss next to the mean.
    """

    LAST_STEP_METRICS = ("learning_rate",)

    def __init__(self):
        self._add = jax.jit(lambda total, metrics: jax.tree.map(jnp.add, total, metrics))
        self._sum: dict[str, jax.Array] | None = None
        self._last: dict[str, jax.Array] = {}
        self._count = 0

    def add(self, metrics: Mapping[str, jax.Array]) -> None:
        metrics = dict(metrics)
        self._sum = metrics if self._sum is None else self._add(self._sum, metrics)
        self._last = metrics
        self._count += 1

    def pop_means(self) -> dict[str, np.ndarray]:
        """The period's means (one device-to-host transfer); starts the next period."""
        if not self._count:
            raise ValueError("No step was added since the last log.")
        sums, last = jax.device_get((self._sum, {
            **{k: self._last[k] for k in self.LAST_STEP_METRICS if k in self._last},
            "loss_last_step": self._last["loss"],
        }))
        means = {k: np.asarray(v) / self._count for k, v in sums.items()}
        self._sum, self._last, self._count = None, {}, 0
        return {**means, **last}


class LossSinceLastLine:
    """The mean host-side loss since the last console line, for the progress lines."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, loss: float) -> None:
        self.total += loss
        self.count += 1

    def pop_mean(self) -> float | None:
        mean = self.total / self.count if self.count else None
        self.total, self.count = 0.0, 0
        return mean


def train_loop(
    trainer: Trainer,
    state: State,
    batches: Iterator[Mapping[str, np.ndarray]],
    train_steps: int,
    checkpointer: Checkpointer | None = None,
    writer: MetricsWriter | None = None,
    log_period: int = 100,
    eval_period: int | None = None,
    eval_fn: Callable[[State, int], None] | None = None,
    tokens_per_batch: int | None = None,
    progress_interval_s: float | None = 30.0,
) -> tuple[State, str]:
    """Train until `train_steps`; returns `(state, reason)` with reason 'done' or 'preempted'.

    `batches` must have `get_state()` (see `moe.data.ResumableIterator`) when checkpointing.
    Raises `NonFiniteLossError` at the first NaN/Inf loss, without saving that state.
    Metrics rows (every `log_period` steps, and the first step) hold the means over the steps
    since the previous row. Between rows, a console line (step, loss, steps/s, ETA) is printed
    once `progress_interval_s` seconds have passed since the last one (None: never).
    """
    step = start = int(jax.device_get(state["step"]))
    partitioner = trainer.partitioner
    period = PeriodMetrics()
    progress_loss = LossSinceLastLine()

    def save(force: bool) -> None:
        if checkpointer is not None:
            checkpointer.save(step, state, batches.get_state(), force=force)

    with PreemptionWatcher() as preemption:
        if writer is not None:
            writer.timing(step)
        while step < train_steps:
            # Every process must stop at the same step, whichever got the signal first.
            if distributed.any_process(preemption.requested):
                save(force=True)
                if checkpointer is not None:
                    checkpointer.wait_until_finished()
                logging.warning("Preempted: saved step %d; rerun the same command to resume.",
                                step)
                print(f"Preempted at step {step}: checkpoint saved.", flush=True)
                return state, "preempted"
            batch = partitioner.shard_batch(next(batches))
            state, metrics = trainer.train_step(state, batch)
            step += 1
            loss, update_norm = (float(x) for x in jax.device_get(
                (metrics["loss"], metrics["update_norm"])))
            if not (math.isfinite(loss) and math.isfinite(update_norm)):
                last = None
                if checkpointer is not None:
                    checkpointer.wait_until_finished()
                    last = checkpointer.latest_step()
                what = f"Loss is {loss}" if not math.isfinite(loss) else (
                    f"The parameter update is {update_norm} (loss {loss})")
                raise NonFiniteLossError(
                    f"{what} at step {step}; training stopped without saving this state. The "
                    f"last good checkpoint (step {last}) is intact. Lower the learning rate, "
                    "enable gradient clipping, or check the data of this step."
                )
            if writer is not None:
                period.add(metrics)
                progress_loss.add(loss)
                first = step == start + 1  # log the first step too: where the loss starts
                if step % log_period == 0 or step == train_steps or first:
                    _log_period(writer, step, period.pop_means(), first, tokens_per_batch)
                    progress_loss.pop_mean()
                elif (progress_interval_s is not None
                      and writer.seconds_since_console() >= progress_interval_s):
                    writer.progress(step, progress_loss.pop_mean())
            save(force=step == train_steps)
            if eval_fn is not None and eval_period and (
                step % eval_period == 0 or step == train_steps
            ):
                started = time.perf_counter()
                eval_fn(state, step)
                if writer is not None:  # steps/s measures training steps only
                    writer.exclude_from_timing(time.perf_counter() - started)
    if checkpointer is not None:
        checkpointer.wait_until_finished()
    return state, "done"


def _log_period(writer: MetricsWriter, step: int, means: Mapping[str, Any], first: bool,
                tokens_per_batch: int | None) -> None:
    """One metrics row and console line: the period's means plus its timing."""
    extra = writer.timing(step)
    if first:  # compilation included: report it as such, not as a rate
        extra = {"timing/first_step_seconds": 1 / extra["timing/steps_per_second"]}
    if tokens_per_batch and "timing/steps_per_second" in extra:
        extra["timing/tokens_per_second"] = extra["timing/steps_per_second"] * tokens_per_batch
    scalars = writer.write(step, {**means, **extra})
    writer.console(step, scalars)


__all__ = [
    "NonFiniteLossError",
    "PeriodMetrics",
    "PreemptionWatcher",
    "Trainer",
    "log_param_table",
    "train_loop",
]
