"""3D-RADNet pretraining: Grain → sharded jit step on a mesh → Orbax, resumable.

    python -m radnet.main --config=configs/pretrain.py --workdir=DIR

Sections in order: config and dataset → mesh → input → model and optimizer → state
(restored from DIR/checkpoints if present, else initialised sharded) → compiled steps →
loop with logging, validation and checkpoints. A killed run started again with the same
command continues from its latest checkpoint and data position, and ends where an
uninterrupted run would.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from radnet import labels
from radnet import metrics as metrics_lib
from radnet.data import augment as augment_lib
from radnet.data import schema
from radnet.train import checkpoint as ckpt_lib
from radnet.train import logging_utils
from radnet.train import losses as losses_lib
from radnet.train import sharding as sharding_lib
from radnet.train import state as state_lib

# Keys of a pipeline batch that the step consumes (``index`` and ``mask`` stay on the host
# except ``mask`` in evaluation).
LABEL_KEYS = tuple(labels.CLASS_HEADS) + ("coverage", labels.SLICE_SPACING_TARGET)
TRAIN_KEYS = ("volume",) + LABEL_KEYS
EVAL_KEYS = TRAIN_KEYS + ("mask",)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


def model_inputs(volume: jax.Array) -> jax.Array:
    """uint8 [B, D, H, W] (the dataset's 256 grey levels) → float32 [B, D, H, W, 1] in [0, 1].

    The volumes travel as uint8 (4× less host→device traffic) and become floats on the
    device (radnet.data.augment.to_unit_float: evaluation and transfer use the same).
    """
    return augment_lib.to_unit_float(volume)


def _augment_fn(config):
    """On-device, label-safe augmentation (radnet.data.augment), or None when disabled.
    Measured faster in the step than in Grain workers: docs/input_pipeline.md."""
    if not config.input.augment.get("enabled", False):
        return None
    return functools.partial(augment_lib.augment, config=config.input.augment)


def make_train_step(model, optimizer, loss_weights: dict[str, float], augment_fn=None):
    """→ ``train_step(state, batch, rng) -> (state, metrics)``, pure, to be jitted."""

    def train_step(state, batch, rng):
        rng = jax.random.fold_in(rng, state["step"])
        x = model_inputs(batch["volume"])
        if augment_fn is not None:
            x = augment_fn(jax.random.fold_in(rng, 1), x, view=batch["view"])

        def loss_fn(params):
            variables = {"params": params}
            if state["batch_stats"]:
                variables["batch_stats"] = state["batch_stats"]
            outputs, updates = model.apply(
                variables, x, train=True, mutable=["batch_stats"],
                rngs={"dropout": jax.random.fold_in(rng, 2)})
            loss, per_head, stats = losses_lib.multitask_loss(outputs, batch, loss_weights)
            return loss, (per_head, stats, updates.get("batch_stats", state["batch_stats"]))

        (loss, (per_head, stats, batch_stats)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
        new_state = {"step": state["step"] + 1, "params": params,
                     "batch_stats": batch_stats, "opt_state": opt_state}
        metrics = {"loss": loss, "grad_norm": _global_norm(grads)}
        metrics.update({f"{h}/loss": v for h, v in per_head.items()})
        for head in labels.CLASS_HEADS:
            metrics[f"{head}/accuracy"] = stats[f"{head}/correct"] / jnp.maximum(
                stats[f"{head}/count"], 1.0)
        return new_state, metrics

    return train_step


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                        for g in jax.tree.leaves(tree)))


def make_eval_step(model):
    """→ ``eval_step(variables, batch) -> (summed loss statistics, outputs)``.

    Padding rows are masked in the statistics; the outputs go to radnet.metrics on the host.
    """

    def eval_step(variables, batch):
        outputs = model.apply(variables, model_inputs(batch["volume"]), train=False)
        return losses_lib.head_statistics(outputs, batch, batch["mask"]), outputs

    return eval_step


def evaluate(eval_step, variables, batches: Iterable[dict], batch_sharding,
             loss_weights) -> dict[str, float]:
    """Whole split → ``{"loss", "{head}/loss", "{head}/accuracy", ...}``.

    Losses come from the summed statistics of the jitted step; accuracy, exact match,
    spacing errors and AUCs from radnet.metrics (the evaluation report's own code) over
    the gathered outputs, padding rows dropped, so every sample counts exactly once.
    """
    from jax.experimental import multihost_utils

    totals = None
    accumulator = metrics_lib.Accumulator()
    label_keys = tuple(k for k in EVAL_KEYS if k != "volume")
    for local in batches:
        batch = sharding_lib.global_batch({k: local[k] for k in EVAL_KEYS}, batch_sharding)
        stats, outputs = eval_step(variables, batch)
        totals = stats if totals is None else jax.tree.map(jnp.add, totals, stats)
        # Every process gathers the global batch (small: logits and labels only).
        host = multihost_utils.process_allgather(
            (outputs, {k: batch[k] for k in label_keys}), tiled=True)
        accumulator.add(*host)
    if totals is None:
        raise ValueError("the evaluation split is empty: no batch came from eval_batches")
    host = {k: float(v) for k, v in jax.device_get(totals).items()}
    metrics = {k: v for k, v in losses_lib.summarize(host).items() if k.endswith("/loss")}
    metrics.update(metrics_lib.summary(accumulator.compute()))
    per_head = {h: float(v) for h, v in losses_lib.head_losses(
        {k: jnp.asarray(v) for k, v in host.items()}).items()}
    metrics["loss"] = float(losses_lib.total_loss(per_head, loss_weights))
    metrics["num_samples"] = max(host[f"{h}/count"] for h in labels.CLASS_HEADS)
    return metrics


def _resolve_config(config, workdir: str) -> ml_collections.ConfigDict:
    """A private, unlocked copy with the dataset's volume shape filled in."""
    config = ml_collections.ConfigDict(config.to_dict())
    attrs = schema.read_attributes(config.dataset)
    dataset_shape = tuple(int(s) for s in attrs["volume_shape"])
    if tuple(config.input.volume_shape) and tuple(config.input.volume_shape) != dataset_shape:
        raise ValueError(f"config.input.volume_shape={tuple(config.input.volume_shape)} but "
                         f"the dataset {config.dataset} holds volumes of {dataset_shape}")
    config.input.volume_shape = dataset_shape
    return config


def _check_batch(name: str, global_size: int, mesh, batch_axes) -> int:
    divisor = sharding_lib.batch_divisor(mesh, batch_axes)
    processes = jax.process_count()
    if global_size % divisor or global_size % processes:
        raise ValueError(f"{name}={global_size} (global) must be divisible by the {divisor} "
                         f"devices of mesh axes {tuple(batch_axes)} and by {processes} processes")
    return global_size // processes


def run(config, workdir: str) -> int:
    """Trains until ``config.train.num_steps`` (or ``stop_at_step``); returns 0."""
    from radnet.data import pipeline  # imported on use: Grain workers start lazily

    config = _resolve_config(config, workdir)
    volume_shape = tuple(config.input.volume_shape)

    # Mesh and batch layout.
    mesh = sharding_lib.make_mesh(config.mesh)
    batch_axes = tuple(config.sharding.batch_axes)
    batch_sharding = sharding_lib.batch_sharding(mesh, batch_axes)
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    local_batch = _check_batch("config.train.batch_size", config.train.batch_size, mesh, batch_axes)
    local_eval_batch = _check_batch("config.eval.batch_size", config.eval.batch_size, mesh, batch_axes)
    logging.info("mesh %s over %d devices (%d processes); global batch %d, %d per process",
                 dict(mesh.shape), mesh.size, jax.process_count(), config.train.batch_size,
                 local_batch)

    # Input.
    data_iter = pipeline.train_iterator(
        config.dataset, split="train", batch_size=local_batch, seed=config.seed,
        shuffle=config.input.shuffle, num_epochs=None, worker_count=config.input.worker_count,
        prefetch_buffer=config.input.prefetch_buffer)

    # Model, optimizer, state.
    model = state_lib.build_model(config)
    optimizer = state_lib.build_optimizer(config)
    target, state_shardings = state_lib.abstract_state(config, model, optimizer, volume_shape, mesh)
    manager = ckpt_lib.make_manager(workdir, config.checkpoint)
    ckpt_lib.save_config(workdir, config)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    start_step = manager.latest_step()
    if start_step is not None:
        state = ckpt_lib.restore(manager, start_step, target, data_iter)
        logging.info("resumed from %s at step %d", ckpt_lib.checkpoint_dir(workdir), start_step)
    else:
        state, _ = state_lib.create_sharded_state(config, model, optimizer, volume_shape, mesh,
                                                  init_rng)
        start_step = 0
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state["params"]))
    logging.info("model %s %s: %.2fM parameters", config.model_name, dict(config.model),
                 num_params / 1e6)

    # Compiled steps.
    loss_weights = dict(config.loss_weights)
    batch_shardings = {k: batch_sharding for k in TRAIN_KEYS}
    train_step = jax.jit(
        make_train_step(model, optimizer, loss_weights, _augment_fn(config)),
        in_shardings=(state_shardings, batch_shardings, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,))
    variables_shardings = {"params": state_shardings["params"],
                           "batch_stats": state_shardings["batch_stats"]}
    eval_step = jax.jit(make_eval_step(model),
                        in_shardings=(variables_shardings,
                                      {k: batch_sharding for k in EVAL_KEYS}),
                        out_shardings=(replicated, batch_sharding))

    def run_eval(step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        batches = pipeline.eval_batches(config.dataset, split=config.eval.split,
                                        batch_size=local_eval_batch)
        metrics = evaluate(eval_step, {"params": state["params"],
                                       "batch_stats": state["batch_stats"]},
                           batches, batch_sharding, loss_weights)
        writer.write(step, config.eval.split, metrics)
        logging.info("step %d %s: loss %.4f  %s  (%d samples, %.1fs)", step, config.eval.split,
                     metrics["loss"], "  ".join(
                         f"{h} {metrics[f'{h}/accuracy']:.3f}" for h in labels.CLASS_HEADS
                         if f"{h}/accuracy" in metrics),
                     metrics["num_samples"], time.perf_counter() - t0)
        return {f"{config.eval.split}/{k}": v for k, v in metrics.items()}

    writer = logging_utils.MetricWriter(workdir)
    total_steps = int(config.train.num_steps)
    end_step = total_steps
    if int(config.train.stop_at_step) > 0:
        end_step = min(end_step, int(config.train.stop_at_step))
    throughput = logging_utils.Throughput(config.train.batch_size, total_steps, start_step)
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

    step = start_step
    pending = None          # (step, metrics) of the previous step, read one step late so
    interval_losses = []    # the host never waits for the device between steps
    try:
        while step < end_step:
            local = next(data_iter)
            batch = sharding_lib.global_batch({k: local[k] for k in TRAIN_KEYS}, batch_sharding)
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
                host["learning_rate"] = float(state_lib.learning_rate_schedule(config)(step - 1))
                writer.write(step, "train", {**host, **rates})
                logging_utils.console(step, total_steps, host["loss_interval_mean"], rates)
                interval_losses = []
            eval_metrics = run_eval(step) if do_eval else None
            if do_ckpt:
                ckpt_lib.save(manager, step, state, data_iter, metrics=eval_metrics)
        if pending is not None:
            check_finite(pending[0], float(pending[1]["loss"]))
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
    logging.info("finished at step %d (of %d); checkpoints in %s", step, total_steps,
                 ckpt_lib.checkpoint_dir(workdir))
    return 0
