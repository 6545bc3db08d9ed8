"""Orbax checkpoints of a pretraining workdir.

Layout (docs/interfaces.md)::

    WORKDIR/config.json          the resolved config of the run
    WORKDIR/checkpoints/<step>/  state/      {step, params, batch_stats, opt_state}
                                 data_iter/  the Grain iterator state, one file per process

Saves are asynchronous (training continues while the arrays are written); the manager
keeps the latest ``keep_latest`` checkpoints and the ``keep_best`` best by a validation
metric. ``load_for_inference`` restores only parameters and batch statistics, onto the
devices of the process that asks, whatever mesh the run trained on.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from radnet.train import sharding as sharding_lib

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"

_preservation = ocp.checkpoint_managers.preservation_policy


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def make_manager(workdir: str, checkpoint_config, *, read_only: bool = False) -> ocp.CheckpointManager:
    """The run's CheckpointManager: latest k + best by ``checkpoint_config.best_metric``."""
    policies = [_preservation.LatestN(n=int(checkpoint_config.keep_latest))]
    if int(checkpoint_config.keep_best) > 0:
        metric = checkpoint_config.best_metric
        mode = checkpoint_config.best_mode
        if mode not in ("min", "max"):
            raise ValueError(f"config.checkpoint.best_mode={mode!r}; choose 'min' or 'max'")
        policies.append(_preservation.BestN(
            get_metric_fn=lambda metrics: float(metrics[metric]),
            # BestN keeps the tail of the sorted order: descending order for "min".
            reverse=(mode == "min"), n=int(checkpoint_config.keep_best),
            # steps saved between evaluations carry no metric; LatestN decides for them.
            keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=_preservation.AnyPreservationPolicy(policies),
        enable_async_checkpointing=bool(checkpoint_config.get("async_save", True)),
        read_only=read_only,
        create=not read_only,
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_names=("state", "data_iter"))


def save(manager: ocp.CheckpointManager, step: int, state, data_iter=None,
         metrics: dict[str, float] | None = None) -> bool:
    """Starts an async save of ``state`` (and the data iterator's position) at ``step``."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    return manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iter=None):
    """Restores ``state`` onto ``abstract_state``'s shardings; ``data_iter`` is set in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]


def save_config(workdir: str, config) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
        f.write("\n")
    os.replace(tmp, path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} is not a radnet run directory: {CONFIG_FILE} is missing")
    with open(path) as f:
        raw = json.load(f)
    # JSON turns tuples into lists; mesh and sharding rules are read as sequences anyway.
    return ml_collections.ConfigDict(raw)


def load_for_inference(workdir: str, step: int | None = None):
    """→ (config, {"params", "batch_stats"}) of a pretraining run, for evaluation and transfer.

    ``step`` None takes the latest checkpoint. Only parameters and batch statistics are
    read (the optimizer state, often twice the parameters, stays on disk); arrays land
    replicated on this process's devices regardless of the training mesh.
    """
    from radnet.train import state as state_lib  # the model factory; imported on use

    config = load_config(workdir)
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{workdir} has no {CHECKPOINT_DIR}/ directory")
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            read_only=True, create=False), item_names=("state", "data_iter")) as manager:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"{directory} holds no finished checkpoint")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise ValueError(f"no checkpoint at step {step} in {directory}; available: {sorted(steps)}")

        model = state_lib.build_model(config)
        volume_shape = tuple(config.input.volume_shape)
        abstract = jax.eval_shape(
            lambda: model.init(jax.random.key(0),
                               np.zeros((1, *volume_shape, 1), np.float32), train=False))
        replicated = jax.sharding.NamedSharding(
            sharding_lib.make_mesh([("data", -1)], devices=jax.local_devices()), jax.P())
        target = {
            "params": abstract["params"],
            "batch_stats": abstract.get("batch_stats", {}),
        }
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), target)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True)))
    variables = {"params": restored["state"]["params"],
                 "batch_stats": restored["state"].get("batch_stats", {})}
    logging.info("loaded %s step %d for inference", workdir, step)
    return config, variables


