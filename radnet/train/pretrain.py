"""3D-RADNet pretraining: Grain → sharded jit step on a mesh → Orbax, resumable.

    python -m radnet.main --config=configs/pretrain.py --workdir=DIR

A task on the trainer skeleton (radnet.train.loop): this module brings the dataset's
Grain stream, the 3D-RADNet model, the optimizer, the multitask train step and the
validation (losses, accuracies, AUCs over the whole split through
radnet.evaluators.predict); the loop brings the sharded state, checkpoints and resume
(a killed run started again with the same command continues from its latest checkpoint
and data position, and ends where an uninterrupted run would), logging and the NaN guard.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from radnet import labels, preprocess
from radnet.evaluators import heads as metrics_lib
from radnet.data import augment as augment_lib
from radnet.data import schema
from radnet.evaluators import predict as predict_lib
from radnet.train import loop
from radnet.train import losses as losses_lib
from radnet.train import state as state_lib

# Keys of a pipeline batch that the steps consume (``index`` stays on the host; evaluation
# adds ``mask``).
LABEL_KEYS = tuple(labels.CLASS_HEADS) + ("coverage", labels.SLICE_SPACING_TARGET)
TRAIN_KEYS = ("volume",) + LABEL_KEYS
# Every name ``evaluate`` can return (metrics of a head without labelled samples are left out).
METRIC_NAMES = ("loss", "num_samples", *(f"{h}/loss" for h in labels.HEADS),
                *(f"{h}/{m}" for h in labels.CLASS_HEADS for m in ("accuracy", "mean_auc")),
                "coverage/exact_match", "coverage/mean_auc", "slice_spacing/mae_mm",
                "slice_spacing/rmse_mm")


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
            x = augment_fn(jax.random.fold_in(rng, 1), x, view=batch["view"],
                           sequence=batch["sequence"])

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
        params = optax.apply_updates(state["params"], updates)
        new_state = {"step": state["step"] + 1, "params": params,
                     "batch_stats": batch_stats, "opt_state": opt_state}
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        metrics.update({f"{h}/loss": v for h, v in per_head.items()})
        for head in labels.CLASS_HEADS:
            metrics[f"{head}/accuracy"] = stats[f"{head}/correct"] / jnp.maximum(
                stats[f"{head}/count"], 1.0)
        return new_state, metrics

    return train_step


def make_eval_step(model):
    """→ ``eval_step(variables, batch) -> (outputs, summed loss statistics)``.

    Padding rows are masked in the statistics; the outputs go to radnet.evaluators.heads on the host.
    """

    def eval_step(variables, batch):
        outputs = model.apply(variables, model_inputs(batch["volume"]), train=False)
        return outputs, losses_lib.head_statistics(outputs, batch, batch["mask"])

    return eval_step


def evaluate(eval_step, variables, batches: Iterable[dict], batch_sharding,
             loss_weights) -> dict[str, float]:
    """Whole split → ``{"loss", "{head}/loss", "{head}/accuracy", ...}``.

    Runs on radnet.evaluators.predict (pad, mask, all-gather). Losses come from the summed
    statistics of the jitted step; accuracy, exact match, spacing errors and AUCs from
    radnet.evaluators.heads (the evaluation report's own code) over the gathered outputs, so every
    sample counts exactly once.
    """
    totals = None
    accumulator = metrics_lib.Accumulator()
    for outputs, targets, sums in predict_lib.predict(
            eval_step, variables, batches, batch_sharding, device_keys=TRAIN_KEYS,
            gather_keys=LABEL_KEYS):
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        accumulator.add(outputs, targets)
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


def resolve_config(config) -> ml_collections.ConfigDict:
    """A private, unlocked copy with the dataset's volume shape filled in."""
    config = ml_collections.ConfigDict(config.to_dict())
    attrs = schema.read_attributes(config.dataset)
    dataset_shape = tuple(int(s) for s in attrs["volume_shape"])
    if tuple(config.input.volume_shape) and tuple(config.input.volume_shape) != dataset_shape:
        raise ValueError(f"config.input.volume_shape={tuple(config.input.volume_shape)} but "
                         f"the dataset {config.dataset} holds volumes of {dataset_shape}")
    config.input.volume_shape = dataset_shape
    # How the dataset's volumes were made travels with the checkpoint in config.json, so
    # inference (radnet.pretrained: preprocess, the predict task) makes volumes the same
    # way. Datasets not made by data_prep.build_volumes record none (runs without it:
    # radnet.pretrained.volume_options).
    build = (attrs.get("build") or {}).get("config") or {}
    kept = {f.name: build[f.name] for f in dataclasses.fields(preprocess.VolumeOptions)
            if f.name in build}
    if kept:
        config.input.preprocessing = kept
    return config


def run(config, workdir: str) -> int:
    """Task ``pretrain``: trains until ``config.train.num_steps`` (or ``stop_at_step``)."""
    from radnet.data import pipeline  # imported on use: Grain workers start lazily

    config = resolve_config(config)
    placement = loop.Placement.from_config(config)
    data_iter = pipeline.train_iterator(
        config.dataset, split="train", batch_size=placement.local_batch_size, seed=config.seed,
        shuffle=config.input.shuffle, num_epochs=None, worker_count=config.input.worker_count,
        prefetch_buffer=config.input.prefetch_buffer)
    model = state_lib.build_model(config)
    optimizer = state_lib.build_optimizer(config)
    loss_weights = dict(config.loss_weights)
    batch_sharding = placement.batch_sharding
    # Inputs keep the shardings they come with: the state's (FSDP or replicated) and the
    # batch's.
    eval_step = jax.jit(make_eval_step(model),
                        out_shardings=(batch_sharding, placement.replicated))

    def run_eval(state, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        batches = pipeline.eval_batches(config.dataset, split=config.eval.split,
                                        batch_size=placement.local_eval_batch_size)
        metrics = evaluate(eval_step, {"params": state["params"],
                                       "batch_stats": state["batch_stats"]},
                           batches, batch_sharding, loss_weights)
        logging.info("step %d %s: loss %.4f  %s  (%d samples, %.1fs)", step, config.eval.split,
                     metrics["loss"], "  ".join(
                         f"{h} {metrics[f'{h}/accuracy']:.3f}" for h in labels.CLASS_HEADS
                         if f"{h}/accuracy" in metrics),
                     metrics["num_samples"], time.perf_counter() - t0)
        return metrics

    loop.train(config, workdir, placement, loop.Task(
        model=model, optimizer=optimizer,
        train_step=make_train_step(model, optimizer, loss_weights, _augment_fn(config)),
        train_iterator=data_iter, batch_keys=TRAIN_KEYS, evaluate=run_eval,
        metric_names=METRIC_NAMES))
    return 0
