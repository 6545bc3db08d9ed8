"""The trainer skeleton every task runs on: mesh → input → model → shardings → step →
checkpoint → evaluation → loop.

A task (pretraining, segmentation, …) builds a ``Task`` — its model, optimizer, pure train
step, this process's Grain iterator and its evaluation — on the ``Placement`` that
``Placement.from_config`` derives, and hands it to ``train``. The loop owns the rest:

- the initial state from ``jax.eval_shape`` and the config's sharding rules, born sharded
  (``jax.jit(init, out_shardings)``), or a task's own variables placed the same way;
- the Orbax checkpoint of state + Grain iterator position; a run started again with the same
  command resumes from its latest checkpoint and ends where an uninterrupted run would;
- the NaN guard (the last good checkpoint is kept), best-checkpoint keeping by
  ``checkpoint.best_metric``, periodic evaluation, ``train.stop_at_step``;
- metrics to WORKDIR/metrics.jsonl and TensorBoard (process 0), throughput and ETA;
- any number of processes (``jax.distributed``): each feeds its share of the global batch.

Config keys it reads (the vocabulary every task config shares): ``seed``, ``mesh``,
``sharding.*``, ``input.volume_shape``, ``train.{batch_size, num_steps, stop_at_step,
log_every_steps}``, ``eval.{every_steps, split, batch_size}``, ``checkpoint.*``,
``optimizer.*`` and ``schedule.*`` (through radnet.train.state).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from radnet.train import checkpoint as ckpt_lib
from radnet.train import logging_utils
from radnet.train import sharding as sharding_lib
from radnet.train import state as state_lib


class NonFiniteLossError(FloatingPointError):
    """The training loss or state became NaN or infinite; the last good checkpoint is kept."""


class ConfigError(ValueError):
    """A config the run cannot honour, found before any step."""


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of ``tree`` is finite (ints always are)."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def _per_process(name: str, global_size: int, mesh, batch_axes) -> int:
    divisor = sharding_lib.batch_divisor(mesh, batch_axes)
    processes = jax.process_count()
    if global_size % divisor or global_size % processes:
        raise ValueError(f"{name}={global_size} (global) must be divisible by the {divisor} "
                         f"devices of mesh axes {tuple(batch_axes)} and by {processes} processes")
    return global_size // processes


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run's arrays live: the mesh, the batch layout and this process's batch sizes."""

    mesh: jax.sharding.Mesh
    batch_sharding: jax.sharding.NamedSharding
    replicated: jax.sharding.NamedSharding
    local_batch_size: int        # this process's rows of a training batch
    local_eval_batch_size: int   # … and of an evaluation batch

    @classmethod
    def from_config(cls, config) -> "Placement":
        mesh = sharding_lib.make_mesh(config.mesh)
        batch_axes = tuple(config.sharding.batch_axes)
        placement = cls(
            mesh=mesh,
            batch_sharding=sharding_lib.batch_sharding(mesh, batch_axes),
            replicated=jax.sharding.NamedSharding(mesh, jax.P()),
            local_batch_size=_per_process("config.train.batch_size", config.train.batch_size,
                                          mesh, batch_axes),
            local_eval_batch_size=_per_process("config.eval.batch_size", config.eval.batch_size,
                                               mesh, batch_axes))
        logging.info("mesh %s over %d devices (%d processes); global batch %d, %d per process",
                     dict(mesh.shape), mesh.size, jax.process_count(), config.train.batch_size,
                     placement.local_batch_size)
        return placement


@dataclasses.dataclass
class Task:
    """What a task brings to the loop.

    Attributes:
      model: the Linen module (``apply(variables, x, train=..., mutable=["batch_stats"])``).
      optimizer: the optax transformation (frozen parts already set to zero updates).
      train_step: pure ``train_step(state, batch, rng) -> (state, metrics)``; ``metrics``
        holds at least ``loss``. Compiled here with the state's and batch's shardings.
      train_iterator: this process's checkpointable Grain iterator of local batches (dicts of
        NumPy arrays, ``placement.local_batch_size`` rows).
      batch_keys: the keys of a batch that the train step receives.
      evaluate: ``evaluate(state, step) -> {name: value}`` over ``config.eval.split``, run on
        every process (collectives inside); None for a task without validation.
      initial_variables: ``() -> {"params", "batch_stats"}`` of a fresh start when the task
        draws or restores them itself; None = ``model.init``.
      metric_names: every name ``evaluate`` can return, so ``checkpoint.best_metric`` is
        checked before any work (None: not checked).
      config_extra: top-level fields added to WORKDIR/config.json.
    """

    model: Any
    optimizer: Any
    train_step: Callable
    train_iterator: Any
    batch_keys: Sequence[str]
    evaluate: Callable[[dict, int], dict[str, float]] | None = None
    initial_variables: Callable[[], dict] | None = None
    metric_names: Sequence[str] | None = None
    config_extra: dict = dataclasses.field(default_factory=dict)


def check_config(config, task: Task) -> None:
    """Config mistakes that would otherwise surface only after training: one ValueError
    naming the field, its value and what would work."""
    if int(config.train.num_steps) < 1:
        raise ConfigError(f"config.train.num_steps={config.train.num_steps}: train at least 1 step")
    for field in ("eval.every_steps", "checkpoint.every_steps", "train.stop_at_step"):
        section, key = field.split(".")
        if int(config[section][key]) < 0:
            raise ConfigError(f"config.{field}={config[section][key]}: must be ≥ 0 (0 = off)")
    if int(config.checkpoint.keep_best) > 0:
        split, metric = config.eval.split, config.checkpoint.best_metric
        if task.evaluate is None:
            raise ConfigError("config.checkpoint.keep_best > 0 but this task has no evaluation; "
                             "set config.checkpoint.keep_best=0")
        prefix = f"{split}/"
        name = metric[len(prefix):] if metric.startswith(prefix) else None
        known = sorted(task.metric_names or ())
        if name is None or (task.metric_names is not None and name not in known):
            choices = ", ".join(prefix + k for k in known) if known else prefix + "<metric>"
            raise ConfigError(f"config.checkpoint.best_metric={metric!r} is not a metric this run "
                             f"evaluates (config.eval.split={split!r}); choose one of: {choices}")


def train(config, workdir: str, placement: Placement, task: Task) -> tuple[dict, int]:
    """Trains until ``config.train.num_steps`` (or ``stop_at_step``); returns (state, step)."""
    check_config(config, task)
    volume_shape = tuple(config.input.volume_shape)
    mesh, replicated = placement.mesh, placement.replicated
    logging_utils.quiet_orbax()

    # State: resumed from the latest checkpoint, else initialised sharded.
    target, state_shardings = state_lib.abstract_state(config, task.model, task.optimizer,
                                                       volume_shape, mesh)
    manager = ckpt_lib.make_manager(workdir, config.checkpoint)
    ckpt_lib.save_config(workdir, config, **task.config_extra)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    start_step = manager.latest_step()
    if start_step is not None:
        state = ckpt_lib.restore(manager, start_step, target, task.train_iterator)
        logging.info("resumed from %s at step %d", ckpt_lib.checkpoint_dir(workdir), start_step)
    else:
        host_variables = task.initial_variables() if task.initial_variables else None
        state = state_lib.create_sharded_state(task.model, task.optimizer, volume_shape,
                                               state_shardings, init_rng, host_variables)
        start_step = 0
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state["params"]))
    logging.info("model %s %s: %.2fM parameters", config.model_name, dict(config.model),
                 num_params / 1e6)

    train_step = jax.jit(
        task.train_step,
        in_shardings=(state_shardings, {k: placement.batch_sharding for k in task.batch_keys},
                      replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,))

    writer = logging_utils.MetricWriter(workdir)
    split = config.eval.split
    total_steps = int(config.train.num_steps)
    end_step = total_steps
    if int(config.train.stop_at_step) > 0:
        end_step = min(end_step, int(config.train.stop_at_step))
    throughput = logging_utils.Throughput(config.train.batch_size, total_steps, start_step)
    schedule = state_lib.learning_rate_schedule(config)
    log_every = max(int(config.train.log_every_steps), 1)
    eval_every = int(config.eval.every_steps)
    ckpt_every = int(config.checkpoint.every_steps)

    def check_finite(step: int, loss: float) -> None:
        if not math.isfinite(loss):
            manager.wait_until_finished()
            raise NonFiniteLossError(
                f"training loss is {loss} at step {step}; stopping. The last good checkpoint "
                f"(step {manager.latest_step()}) is kept in {ckpt_lib.checkpoint_dir(workdir)}; "
                "lower config.optimizer.lr or check the input for corrupt volumes.")

    def run_eval(step: int) -> dict[str, float] | None:
        if task.evaluate is None:
            return None
        metrics = task.evaluate(state, step)
        writer.write(step, split, metrics)
        return {f"{split}/{k}": v for k, v in metrics.items()}

    step = start_step
    pending = None          # (step, metrics) of the previous step, read one step late so
    interval_losses = []    # the host never waits for the device between steps
    try:
        while step < end_step:
            local = next(task.train_iterator)
            batch = sharding_lib.global_batch({k: local[k] for k in task.batch_keys},
                                              placement.batch_sharding)
            state, metrics = train_step(state, batch, step_rng)
            step += 1
            if pending is not None:
                prev_step, prev = pending
                loss = float(prev["loss"])
                check_finite(prev_step, loss)
                interval_losses.append(loss)
            pending = (step, metrics)

            do_log = step % log_every == 0 or step == end_step
            do_eval = (eval_every > 0 and step % eval_every == 0) or step == total_steps
            do_ckpt = (ckpt_every > 0 and step % ckpt_every == 0) or step == end_step
            if do_log or do_eval or do_ckpt:
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                check_finite(step, host["loss"])
                interval_losses.append(host["loss"])
                pending = None
            if do_log:
                rates = throughput.report(step)
                host["loss_interval_mean"] = float(np.mean(interval_losses))
                host["learning_rate"] = float(schedule(step - 1))
                writer.write(step, "train", {**host, **rates})
                logging_utils.console(step, total_steps, host["loss_interval_mean"], rates)
                interval_losses = []
            eval_metrics = run_eval(step) if do_eval else None
            if do_ckpt:
                # The loss read above belongs to the parameters before this step's update;
                # the state about to be saved is after it. Only a finite state is saved.
                if not bool(all_finite(state)):
                    manager.wait_until_finished()
                    raise NonFiniteLossError(
                        f"the parameters or optimizer state are not finite after step {step}; "
                        f"not saved. The last good checkpoint (step {manager.latest_step()}) is "
                        f"kept in {ckpt_lib.checkpoint_dir(workdir)}; lower "
                        "config.optimizer.lr or check the input for corrupt volumes.")
                ckpt_lib.save(manager, step, state, task.train_iterator, metrics=eval_metrics)
        if pending is not None:
            check_finite(pending[0], float(pending[1]["loss"]))
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
    logging.info("finished at step %d (of %d); checkpoints in %s", step, total_steps,
                 ckpt_lib.checkpoint_dir(workdir))
    return state, step
