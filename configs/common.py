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
