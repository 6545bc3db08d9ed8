"""Helpers shared by the config files (big_vision style ``get_config(arg)``)."""

from __future__ import annotations

import ml_collections

# The paper's volume rules and the orientation tolerance live in the library, which
# applies them at run time too; the index and build configs read them from here.
from radnet.dicom.geometry import ORIENTATION_GROUP_DEG  # noqa: F401
from radnet.preprocess import (  # noqa: F401
    PAPER_MAX_EFFECTIVE_SPACING_MM, PAPER_MIN_SLICES, PAPER_VOLUME_SHAPE)


def _coerce(text: str, default):
    """Parses ``text`` to the type of ``default`` (bool/int/float/str)."""
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not a boolean")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """``"depth=18,norm=group,tiny"`` → ConfigDict over ``defaults``.

    A bare word sets a boolean default to True (``tiny``). Unknown keys are an
    error naming the known ones, so a typo never passes silently.
    """
    out = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise KeyError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        if not sep:
            if not isinstance(defaults[key], bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        else:
            out[key] = _coerce(value, defaults[key])
    return out


def trainer_defaults() -> ml_collections.ConfigDict:
    """The sections every training task shares (radnet.train.loop's vocabulary), with
    pretraining's defaults; a task's config overrides what it needs.

    ``mesh``, ``sharding.*``, ``input.volume_shape``, ``optimizer.*``, ``schedule.*``,
    ``train.*``, ``eval.*``, ``checkpoint.*``.
    """
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Devices: one 'data' axis over everything by default; e.g. [("data", -1), ("model", 2)].
    config.mesh = [("data", -1)]
    config.sharding = ml_collections.ConfigDict(dict(
        batch_axes=("data",),
        # (regex on "params/encoder/block1/...", spec per dimension); first match wins.
        rules=[],
        fsdp_axis="",          # e.g. "data": FSDP-shard every array ≥ fsdp_min_size elements
        fsdp_min_size=2 ** 18,
    ))
    config.input = ml_collections.ConfigDict(dict(
        volume_shape=(),       # () = from the dataset when the run starts; in config.json
    ))
    config.optimizer = ml_collections.ConfigDict(dict(
        name="adam", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
        grad_clip_norm=1.0))   # global-norm clipping; 0 = off
    config.schedule = ml_collections.ConfigDict(dict(
        name="warmup_cosine",  # or "constant"
        warmup_steps=1000, end_lr_fraction=0.01))
    config.train = ml_collections.ConfigDict(dict(
        batch_size=8,          # GLOBAL batch (all processes and devices together)
        num_steps=100_000,
        stop_at_step=0,        # >0: stop (after a checkpoint) at this step, e.g. to fit a
                               # job time limit; the next launch resumes. 0 = run to num_steps
        log_every_steps=50,
    ))
    config.eval = ml_collections.ConfigDict(dict(
        every_steps=1000,      # validation over the whole split; 0 = only at the end
        split="val",
        batch_size=8,          # GLOBAL; the last batch is padded and masked
    ))
    config.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=1000,
        keep_latest=2,
        keep_best=1,
        best_metric="val/loss",  # "<eval.split>/<metric>", e.g. "val/sequence/accuracy"
        best_mode="min",
        async_save=True,
    ))
    return config
