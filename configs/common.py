"""Helpers shared by the config files (big_vision style ``get_config(arg)``)."""

from __future__ import annotations

import ml_collections

# The paper's volume rules (Du & Vardhanabhuti 2020, 2.1.5), shared by the index
# (configs/index.py), which predicts them, and the volume builder
# (configs/build_volumes.py), which applies them: one place, so the two never drift.
PAPER_VOLUME_SHAPE = (48, 192, 192)  # slices along the normal, rows, columns
PAPER_MIN_SLICES = 16  # fewer slices: too_few_slices
PAPER_MAX_EFFECTIVE_SPACING_MM = 15.0  # effective slice spacing above it: spacing_too_large
# The geometric tolerance of both: slices whose row and column cosines differ by less
# than this belong to one orientation group (one series).
ORIENTATION_GROUP_DEG = 1.0


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
