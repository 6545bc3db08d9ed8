"""Augmentation that keeps every pretraining label true, on the device (jnp) or in workers (NumPy).

Volumes are ``[B, D, H, W, C]`` float32 in [0, 1]: D slices ascending along the
slice normal, H image rows, W image columns (the acquisition plane is kept, see
docs/interfaces.md). Each operation is applied to each sample independently
with its own probability, in this order: flips, translation, gamma, intensity
scale and shift, Gaussian noise, then a clip back to [0, 1].

Why the labels stay true:

* intensity scale/shift, gamma and noise change grey values only. On MR, whose
  grey values have no physical unit, sequence and contrast are judged from tissue
  contrast *relations* (which tissue is brighter), which a monotonic mapping and
  small noise keep; view, coverage and the slice spacing are geometry, untouched.
  CT is different: its numbers are calibrated (water 0 HU, air −1000 HU) and
  contrast on CT *is* an absolute shift (enhanced blood ≈ +190 HU, a dozen of the
  256 grey levels of a min-max volume — less than the default jitter). So when the
  batch's ``sequence`` labels are passed, series labelled CT keep their grey values
  (scale, shift and gamma skipped; noise kept); ``intensity_on_ct=True`` restores
  the jitter for every series.
* an in-plane translation (``translate``, off by default) moves the rows and
  columns by a whole number of pixels; what leaves the field of view is dropped
  and zeros (air / background after min-max) come in. Sequence, contrast, view,
  spacing and the craniocaudal coverage are unchanged.
* a flip reverses one axis. It changes neither which plane the slices lie in
  (view), nor the distance between slices (effective_spacing_mm), nor the
  craniocaudal extent of the scan (coverage), nor the acquisition (sequence,
  contrast). So flips along any axis are label-safe.

Which flips are on by default: only the *patient left-right* mirror. The body is
close to bilaterally symmetric, so a left-right mirror gives an image that could
have come from a real patient. The patient left-right axis is the column axis
(W) of axial and coronal images and the slice axis (D) of sagittal ones, so when
the batch's ``view`` labels are passed the flip uses the right axis per sample;
without them (or for unknown view) it flips W, which for a sagittal series is
an anterior-posterior mirror: still label-safe, just a less realistic image.
Row flips (upside-down coronal/sagittal anatomy) and slice-order flips (the
volume builder always orders slices ascending along the normal) make images the
dataset never contains, so they are available but off by default.

``augment`` (jnp, jit-able) is the one the training step uses: measured by
bench/augment.py and explained in docs/input_pipeline.md. ``augment_numpy`` is
the same transformation for Grain workers; both apply the same parameters
through ``apply_params`` so they cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from radnet import labels

SAGITTAL = labels.VIEW.index("sagittal")
CT = labels.SEQUENCE.index("CT")


def default_augment_config() -> ml_collections.ConfigDict:
    """Augmentation settings (the pretraining config holds a copy under ``config.augment``)."""
    return ml_collections.ConfigDict(dict(
        enabled=True,
        # x * U(1 - s, 1 + s): scanner and windowing gain differences.
        intensity_scale=0.1, intensity_scale_prob=0.5,
        # x + U(-s, s): offset differences (fraction of the [0, 1] range).
        intensity_shift=0.05, intensity_shift_prob=0.5,
        # x ** g with log g ~ U(-log(1 + gamma), log(1 + gamma)): contrast curve changes.
        gamma=0.3, gamma_prob=0.3,
        # + N(0, sigma^2), sigma ~ U(0, noise_std): acquisition noise.
        noise_std=0.03, noise_prob=0.3,
        # Flips; see the module docstring for which axis and why.
        flip_left_right_prob=0.5,
        flip_rows_prob=0.0,
        flip_slices_prob=0.0,
        # In-plane translation by U(-t, t) of the rows / columns (zeros come in).
        translate=0.0, translate_prob=0.0,
        # Grey-value jitter (scale, shift, gamma) on CT too. Off: CT numbers are calibrated
        # (water 0 HU, air −1000 HU) and the contrast label on CT rests on them.
        intensity_on_ct=False,
    ))


def to_unit_float(volume: Any, xp=jnp):
    """uint8 [B, D, H, W] → float32 [B, D, H, W, 1] in [0, 1] (the model's input)."""
    return (xp.asarray(volume).astype(xp.float32) * (1.0 / 255.0))[..., None]


def _check_config(config) -> None:
    for key in ("intensity_scale_prob", "intensity_shift_prob", "gamma_prob", "noise_prob",
                "flip_left_right_prob", "flip_rows_prob", "flip_slices_prob", "translate_prob"):
        p = float(config.get(key, 0.0))
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augment config {key}={p} is not a probability in [0, 1]")
    for key in ("intensity_scale", "intensity_shift", "gamma", "noise_std"):
        if float(config[key]) < 0:
            raise ValueError(f"augment config {key}={config[key]} must be >= 0")
    if float(config.intensity_scale) >= 1:
        raise ValueError("augment config intensity_scale must be < 1 (the scale stays positive)")
    if not 0.0 <= float(config.get("translate", 0.0)) < 1.0:
        raise ValueError(f"augment config translate={config.translate} must be in [0, 1) "
                         "(a fraction of the rows / columns)")


def _draw(uniform, batch: int, config) -> dict[str, Any]:
    """Per-sample parameters from ``uniform(name, shape) -> U[0, 1)`` draws.

    Parameters of an operation that is not drawn for a sample are its identity
    (scale 1, shift 0, gamma 1, sigma 0, no flip).
    """
    def chosen(name, p):
        return uniform(name + "_p", (batch,)) < p

    def between(name, lo, hi):
        return lo + (hi - lo) * uniform(name, (batch,))

    c = config
    out = {}
    s = float(c.intensity_scale)
    out["scale"] = chosen("scale", float(c.intensity_scale_prob)), between("scale", 1 - s, 1 + s)
    s = float(c.intensity_shift)
    out["shift"] = chosen("shift", float(c.intensity_shift_prob)), between("shift", -s, s)
    log_g = float(np.log1p(float(c.gamma)))
    out["log_gamma"] = chosen("gamma", float(c.gamma_prob)), between("gamma", -log_g, log_g)
    out["sigma"] = chosen("noise", float(c.noise_prob)), between("noise", 0.0, float(c.noise_std))
    for name in ("flip_left_right", "flip_rows", "flip_slices"):
        out[name] = chosen(name, float(c[name + "_prob"])), None
    t, p = float(c.get("translate", 0.0)), float(c.get("translate_prob", 0.0))
    if t > 0 and p > 0:  # off by default: no roll in the step at all
        moved = chosen("translate", p)
        out["move_rows"] = moved, between("move_rows", -t, t)
        out["move_cols"] = moved, between("move_cols", -t, t)
    return out


def _resolve(xp, drawn: dict[str, Any]) -> dict[str, Any]:
    identity = {"scale": 1.0, "shift": 0.0, "log_gamma": 0.0, "sigma": 0.0,
                "move_rows": 0.0, "move_cols": 0.0}
    params = {}
    for name, (on, value) in drawn.items():
        params[name] = on if value is None else xp.where(on, value, identity[name]).astype(
            xp.float32)
    return params


def apply_params(xp, volume, params: dict[str, Any], noise=None, view=None, sequence=None,
                 intensity_on_ct: bool = True):
    """Applies drawn parameters; ``xp`` is ``jax.numpy`` or ``numpy``.

    Args:
      volume: float32 [B, D, H, W, C] in [0, 1].
      params: per-sample arrays [B]: scale, shift, log_gamma, sigma (floats),
        flip_left_right, flip_rows, flip_slices (bools).
      noise: standard normal [B, D, H, W, C] (None: no noise term).
      view: int [B] view labels (None or -1: left-right flips use W).
      sequence: int [B] sequence labels; where given, samples labelled CT keep their grey
        values (scale 1, shift 0, gamma 1) unless ``intensity_on_ct``.
    """
    def per_sample(x):
        return xp.reshape(x, (-1,) + (1,) * (volume.ndim - 1))

    x = volume
    lr = params["flip_left_right"]
    if view is not None:
        sagittal = xp.asarray(view) == SAGITTAL
        lr_columns, lr_slices = lr & ~sagittal, lr & sagittal
    else:
        lr_columns, lr_slices = lr, xp.zeros_like(lr)
    # Axes of [B, D, H, W, C]: 1 slices, 2 rows, 3 columns.
    for axis, flip in ((3, lr_columns), (1, lr_slices | params["flip_slices"]),
                       (2, params["flip_rows"])):
        x = xp.where(per_sample(flip), xp.flip(x, axis=axis), x)
    if "move_rows" in params:
        x = _translate(xp, x, params["move_rows"], params["move_cols"])
    log_gamma, scale, shift = params["log_gamma"], params["scale"], params["shift"]
    if sequence is not None and not intensity_on_ct:
        ct = xp.asarray(sequence) == CT
        log_gamma, scale, shift = (xp.where(ct, v, a).astype(xp.float32)
                                   for v, a in ((0.0, log_gamma), (1.0, scale), (0.0, shift)))
    x = xp.power(xp.clip(x, 0.0, 1.0), per_sample(xp.exp(log_gamma)))
    x = x * per_sample(scale) + per_sample(shift)
    if noise is not None:
        x = x + per_sample(params["sigma"]) * noise
    return xp.clip(x, 0.0, 1.0).astype(xp.float32)


def _translate(xp, x, rows, cols):
    """Moves each sample by round(rows·H) rows and round(cols·W) columns; what leaves
    the field of view is dropped and zeros come in (a roll, then the wrapped part masked)."""
    _, _, h, w, _ = x.shape
    dr = xp.round(xp.asarray(rows) * h).astype(xp.int32)
    dc = xp.round(xp.asarray(cols) * w).astype(xp.int32)
    r = xp.arange(h)[None, :] - dr[:, None]          # source row of each output row
    c = xp.arange(w)[None, :] - dc[:, None]
    keep = ((r >= 0) & (r < h))[:, None, :, None, None] & ((c >= 0) & (c < w))[:, None, None, :, None]
    if xp is np:
        moved = np.stack([np.roll(v, (a, b), axis=(1, 2)) for v, a, b in zip(x, dr, dc)])
    else:
        moved = jax.vmap(lambda v, a, b: jnp.roll(v, (a, b), axis=(1, 2)))(x, dr, dc)
    return xp.where(keep, moved, 0.0)


def augment(rng: jax.Array, volume: jax.Array, config, *, view: jax.Array | None = None,
            sequence: jax.Array | None = None) -> jax.Array:
    """On-device augmentation: float32 [B, D, H, W, C] in [0, 1] → the same.

    Pure and jit-able (``config`` is read at trace time: close over it).
    ``enabled=False`` returns ``volume`` unchanged. ``view``, int [B], lets the
    left-right flip pick the patient left-right axis of each sample.
    """
    if not config.enabled:
        return volume
    _check_config(config)
    batch = volume.shape[0]
    names = ("scale", "shift", "gamma", "noise", "flip_left_right", "flip_rows", "flip_slices")
    keys = dict(zip([n + "_p" for n in names] + list(names[:4]) + ["field"],
                    jax.random.split(rng, len(names) + 5)))

    def uniform(name, shape):
        if name not in keys:  # later additions: own streams, the others' unchanged
            keys[name] = jax.random.fold_in(rng, 1000 + sum(map(ord, name)))
        return jax.random.uniform(keys[name], shape)

    params = _resolve(jnp, _draw(uniform, batch, config))
    noise = None
    if float(config.noise_prob) > 0 and float(config.noise_std) > 0:
        noise = jax.random.normal(keys["field"], volume.shape, volume.dtype)
    return apply_params(jnp, volume, params, noise, view, sequence,
                        bool(config.get("intensity_on_ct", True)))


def augment_numpy(rng: np.random.Generator, volume: np.ndarray, config, *,
                  view: np.ndarray | None = None, sequence: np.ndarray | None = None
                  ) -> np.ndarray:
    """Worker-side variant of ``augment`` (same distribution, NumPy random stream)."""
    volume = np.asarray(volume, dtype=np.float32)
    if not config.enabled:
        return volume
    _check_config(config)
    params = _resolve(np, _draw(lambda name, shape: rng.random(shape), volume.shape[0], config))
    noise = None
    if float(config.noise_prob) > 0 and float(config.noise_std) > 0:
        noise = rng.standard_normal(volume.shape, dtype=np.float32)
    return apply_params(np, volume, params, noise, view, sequence,
                        bool(config.get("intensity_on_ct", True)))
