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


def input_shape(config) -> tuple[int, ...]:
    """The model's input ``[D, H, W, C]`` of one example: ``config.input.volume_shape`` + 1."""
    shape = tuple(int(s) for s in config.input.volume_shape)
    if len(shape) != 3:
        raise ValueError(f"config.input.volume_shape={shape}: expected [D, H, W] (resolved "
                         "from the dataset when the run starts)")
    return (*shape, 1)


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


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm``'s transform (same empty state, so checkpoints and their
    optimizer-state trees are unchanged), with the scaling as one multiply by a scalar.

    Why not optax's: it writes ``select(norm < max, g, (g / norm) * max)``; XLA treats the
    divide as expensive and will not duplicate it into its two consumers (Adam's first and
    second moments), so every clipped gradient is written out and read back — 54 M floats per
    VNet step. ``g * s`` with the scalar ``s = 1 if norm < max else max / norm`` fuses into
    both: the VNet step at 16×64×64 0.36 → 0.34 s on 2 cores (two A/B pairs, docs/performance.md
    "Host memory and the clip"). Unclipped gradients are passed exactly (``s`` is 1.0);
    clipped ones differ from optax's by at most a rounding of the scale.
    """
    max_norm = float(max_norm)

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.where(norm < max_norm, jnp.ones_like(norm), max_norm / norm)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


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
        parts.append(clip_by_global_norm(float(opt.grad_clip_norm)))
    parts.append(core)
    return optax.chain(*parts)


def state_from_variables(optimizer, variables) -> dict:
    """``{"params", "batch_stats"}`` → the training state (a fresh optimizer state)."""
    params = variables["params"]
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": variables.get("batch_stats", {}),
        "opt_state": optimizer.init(params),
    }


def make_init_fn(model, optimizer, volume_shape):
    """``init(rng) -> state`` with the variables of ``model.init`` on a zero volume."""
    def init(rng):
        variables = model.init(rng, jnp.zeros((1, *volume_shape, 1), jnp.float32), train=False)
        return state_from_variables(optimizer, variables)
    return init


def abstract_state(config, model, optimizer, volume_shape, mesh) -> tuple[Any, Any]:
    """ShapeDtypeStructs with shardings (restore targets) and the shardings themselves,
    from ``jax.eval_shape`` of the initialiser and the config's sharding rules."""
    init = make_init_fn(model, optimizer, tuple(volume_shape))
    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding_lib.tree_shardings(abstract, mesh, config.sharding)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    return target, shardings


def create_sharded_state(model, optimizer, volume_shape, shardings, rng,
                         host_variables=None):
    """The initial state, each array born where it lives (``jax.jit(init, out_shardings)``),
    so a model that fits only when sharded never materialises whole on one device.

    ``host_variables`` (a task's own draw, a restored encoder) replace ``model.init``'s:
    they are placed with the parameters' shardings and the optimizer state is initialised
    on the devices from them.
    """
    if host_variables is None:
        init = make_init_fn(model, optimizer, tuple(volume_shape))
        return jax.jit(init, out_shardings=shardings)(rng)
    variables = {"params": host_variables["params"],
                 "batch_stats": host_variables.get("batch_stats", {})}
    placed = jax.device_put(variables, {k: shardings[k] for k in variables})
    return jax.jit(lambda v: state_from_variables(optimizer, v), out_shardings=shardings)(placed)
