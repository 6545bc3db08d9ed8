"""Training state, optimizer and sharded initialisation.

The state is a plain dict pytree ``{"step", "params", "batch_stats", "opt_state"}``: what
the checkpoint holds, item ``state`` (docs/interfaces.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from radnet import models
from radnet.train import sharding as sharding_lib


def build_model(config):
    return models.get(config.model_name)(**config.model)


def learning_rate_schedule(config) -> optax.Schedule:
    """``config.schedule.name``: ``warmup_cosine`` (linear warm-up, cosine decay to
    ``end_lr_fraction`` × lr at ``config.train.num_steps``) or ``constant`` (after warm-up)."""
    lr = float(config.optimizer.lr)
    warmup = int(config.schedule.warmup_steps)
    name = config.schedule.name
    if name == "warmup_cosine":
        decay_steps = max(int(config.train.num_steps), warmup + 1)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
            decay_steps=decay_steps, end_value=lr * float(config.schedule.end_lr_fraction))
    if name == "constant":
        if not warmup:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    raise ValueError(f"config.schedule.name={name!r}; choose 'warmup_cosine' or 'constant'")


def build_optimizer(config) -> optax.GradientTransformation:
    """Adam (the paper) or AdamW, after global-norm gradient clipping (0 = no clipping)."""
    schedule = learning_rate_schedule(config)
    opt = config.optimizer
    if opt.name == "adam":
        core = optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps)
    elif opt.name == "adamw":
        core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay)
    else:
        raise ValueError(f"config.optimizer.name={opt.name!r}; choose 'adam' or 'adamw'")
    parts = []
    if float(opt.grad_clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(opt.grad_clip_norm)))
    parts.append(core)
    return optax.chain(*parts)


def make_init_fn(model, optimizer, volume_shape):
    def init(rng):
        variables = model.init(rng, jnp.zeros((1, *volume_shape, 1), jnp.float32), train=False)
        params = variables["params"]
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "batch_stats": variables.get("batch_stats", {}),
            "opt_state": optimizer.init(params),
        }
    return init


def create_sharded_state(config, model, optimizer, volume_shape, mesh, rng):
    """jax.eval_shape → shardings from config rules → jit(init, out_shardings).

    Returns (state, state_shardings); the arrays are born where they live, so a model
    that fits only when sharded never materialises whole on one device.
    """
    init = make_init_fn(model, optimizer, tuple(volume_shape))
    abstract = jax.eval_shape(init, rng)
    shardings = sharding_lib.tree_shardings(abstract, mesh, config.sharding)
    state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings


def abstract_state(config, model, optimizer, volume_shape, mesh) -> tuple[Any, Any]:
    """ShapeDtypeStructs with shardings (restore targets) and the shardings themselves."""
    init = make_init_fn(model, optimizer, tuple(volume_shape))
    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding_lib.tree_shardings(abstract, mesh, config.sharding)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    return target, shardings
