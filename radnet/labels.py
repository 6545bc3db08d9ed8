"""The label vocabulary of radnet: names, order and sizes of every head.

This module is the one source of truth. data_prep writes these names into CSV
files, the model heads are sized from them, and losses, metrics and reports
read their order from here. Arrays hold class indices with ``UNKNOWN`` (-1)
where a label could not be mined; CSV files hold the names, with the empty
string for unknown.
"""

from __future__ import annotations

from typing import Iterable, Sequence

UNKNOWN = -1

SEQUENCE: tuple[str, ...] = ("CT", "T1-SE", "T2-SE", "T1-FLAIR", "T2-FLAIR")
VIEW: tuple[str, ...] = ("axial", "coronal", "sagittal")
CONTRAST: tuple[str, ...] = ("no_contrast", "contrast")
COVERAGE: tuple[str, ...] = (
    "brain",
    "upper_head_neck",
    "lower_head_neck",
    "lung",
    "breast",
    "liver",
    "kidney",
    "intestine",
    "pelvis",
)

# Single-choice heads (softmax) in the order the model emits them.
CLASS_HEADS: dict[str, tuple[str, ...]] = {
    "sequence": SEQUENCE,
    "view": VIEW,
    "contrast": CONTRAST,
}
# Multi-label head (sigmoid per region).
MULTILABEL_HEADS: dict[str, tuple[str, ...]] = {"coverage": COVERAGE}
# Regression head: the effective spacing between the 48 slices of the
# resized volume, in millimetres (dataset array ``effective_spacing_mm``).
REGRESSION_HEADS: tuple[str, ...] = ("slice_spacing",)
SLICE_SPACING_TARGET = "effective_spacing_mm"

HEADS: tuple[str, ...] = tuple(CLASS_HEADS) + tuple(MULTILABEL_HEADS) + REGRESSION_HEADS


def head_size(head: str) -> int:
    """Number of outputs of a head (1 for regression)."""
    if head in CLASS_HEADS:
        return len(CLASS_HEADS[head])
    if head in MULTILABEL_HEADS:
        return len(MULTILABEL_HEADS[head])
    if head in REGRESSION_HEADS:
        return 1
    raise KeyError(f"unknown head {head!r}; heads are {HEADS}")


HEAD_SIZES: dict[str, int] = {h: head_size(h) for h in HEADS}

EXCLUSION_REASONS: tuple[str, ...] = (
    "unreadable",
    "not_image",
    "unsupported_modality",
    "too_few_slices",
    "inconsistent_geometry",
    "missing_description",
    "excluded_sequence",
    "time_series",
    "non_standard_view",
    "spacing_too_large",
    "decode_failed",
    # Faults (docs/dataset.md, "Faults"). worker_died and timeout are transient: the next
    # run tries the file or series again; the others are properties of the input.
    "worker_died",          # reading it killed the worker process each time it ran (OOM, crashing codec)
    "timeout",              # reading a header took longer than the index's header_max_s
    "too_large",            # a header beyond header_max_bytes, or a series whose decode would need more
                            # memory than build_volumes' max_series_memory_mb
    "invalid_rescale",      # a slice's RescaleSlope is 0 or not finite, or its intercept is not finite
    "pixel_data_mismatch",  # PixelData length differs from Rows × Columns × frames × BitsAllocated
    "constant_volume",      # every voxel equal after rescale and padding removal (nothing to learn)
    "swapped_dimensions",   # pixel rows run Rows wide, not Columns: Rows/Columns swapped on every slice
)
# Reasons that say nothing about the input: a re-run tries again.
TRANSIENT_REASONS: tuple[str, ...] = ("worker_died", "timeout")

SPLITS: tuple[str, ...] = ("train", "val", "test")


def _names(head: str) -> tuple[str, ...]:
    if head in CLASS_HEADS:
        return CLASS_HEADS[head]
    if head in MULTILABEL_HEADS:
        return MULTILABEL_HEADS[head]
    raise KeyError(f"head {head!r} has no class names; named heads are "
                   f"{tuple(CLASS_HEADS) + tuple(MULTILABEL_HEADS)}")


def to_index(head: str, name: str) -> int:
    """Class name → index; the empty string (unknown) → UNKNOWN."""
    if name == "":
        return UNKNOWN
    names = _names(head)
    try:
        return names.index(name)
    except ValueError:
        raise ValueError(f"{name!r} is not a {head} label; expected one of {names}") from None


def to_name(head: str, index: int) -> str:
    """Class index → name; UNKNOWN → the empty string."""
    index = int(index)
    if index == UNKNOWN:
        return ""
    names = _names(head)
    if not 0 <= index < len(names):
        raise ValueError(f"{index} is out of range for {head} ({len(names)} classes)")
    return names[index]


def coverage_to_multihot(regions: Iterable[str] | str) -> list[int]:
    """Coverage names (a list, or the ';'-joined CSV form) → 9 zeros and ones.

    The empty string means unknown coverage and gives nine UNKNOWN values.
    """
    if isinstance(regions, str):
        if regions == "":
            return [UNKNOWN] * len(COVERAGE)
        regions = [r for r in regions.split(";") if r]
    hot = [0] * len(COVERAGE)
    for r in regions:
        hot[to_index("coverage", r)] = 1
    return hot


def multihot_to_coverage(hot: Sequence[int]) -> str:
    """9 zeros and ones → the ';'-joined CSV form (in vocabulary order)."""
    if len(hot) != len(COVERAGE):
        raise ValueError(f"coverage needs {len(COVERAGE)} values, got {len(hot)}")
    if any(int(v) == UNKNOWN for v in hot):
        return ""
    return ";".join(name for name, v in zip(COVERAGE, hot) if int(v) == 1)


def split_index(name: str) -> int:
    """'train'/'val'/'test' → 0/1/2; '' → UNKNOWN."""
    if name == "":
        return UNKNOWN
    if name not in SPLITS:
        raise ValueError(f"{name!r} is not a split; expected one of {SPLITS}")
    return SPLITS.index(name)
