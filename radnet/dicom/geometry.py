"""Slice geometry: the one place the index, the label rules and the volume builder
take the slice normal, orientation groups and positions along the normal from.

An orientation is the six values of ImageOrientationPatient (0020,0037): the row
direction cosines, then the column direction cosines, in the patient's LPS frame.
The slice normal n = row cosines × column cosines is the direction slices advance
in; a slice's position along it is ImagePositionPatient · n (mm). Plain Python
floats throughout, so the index (lists from JSON) and the volume builder (numpy
arrays) compute the same numbers.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, TypeVar

# Slices whose row and column cosines differ by less than this belong to one
# orientation group (one series): the index groups with it and the volume builder
# re-checks with it, so the builder never rejects a series the index formed.
ORIENTATION_GROUP_DEG = 1.0

Vector = tuple[float, float, float]
Item = TypeVar("Item")


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _unit(v: Sequence[float]) -> Vector | None:
    norm = math.sqrt(sum(x * x for x in v))
    return tuple(x / norm for x in v) if norm > 1e-9 else None


def direction_cosines(orientation: Sequence[float] | None) -> tuple[Vector, Vector] | None:
    """(unit row cosines, unit column cosines) of an orientation; None when it is
    missing, not six values, or either direction is zero."""
    if orientation is None or len(orientation) != 6:
        return None
    row, column = _unit(orientation[:3]), _unit(orientation[3:])
    return (row, column) if row and column else None


def _agree(a: tuple[Vector, Vector] | None, b: tuple[Vector, Vector] | None,
           cos_tol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None  # two unknown orientations go together
    return _dot(a[0], b[0]) >= cos_tol and _dot(a[1], b[1]) >= cos_tol


def same_orientation(a: Sequence[float] | None, b: Sequence[float] | None,
                     max_deg: float = ORIENTATION_GROUP_DEG) -> bool:
    """Row cosines and column cosines of ``a`` and ``b`` each within ``max_deg``
    degrees (signed: a flipped row direction is another orientation)."""
    return _agree(direction_cosines(a), direction_cosines(b),
                  math.cos(math.radians(max_deg)))


def orientation_groups(items: Sequence[Item],
                       orientation_of: Callable[[Item], Sequence[float] | None],
                       max_deg: float = ORIENTATION_GROUP_DEG) -> list[list[Item]]:
    """``items`` split into groups of one orientation, in order of first appearance.

    An item joins the first group whose first item's orientation agrees with its own
    within ``max_deg`` (:func:`same_orientation`); items without a usable orientation
    form a group of their own.
    """
    cos_tol = math.cos(math.radians(max_deg))
    firsts: list[tuple[Vector, Vector] | None] = []
    groups: list[list[Item]] = []
    for item in items:
        cosines = direction_cosines(orientation_of(item))
        for first, group in zip(firsts, groups):
            if _agree(first, cosines, cos_tol):
                group.append(item)
                break
        else:
            firsts.append(cosines)
            groups.append([item])
    return groups


def slice_normal(orientation: Sequence[float]) -> Vector:
    """Unit normal = row cosines × column cosines (the direction slices advance in).

    Raises ValueError when the two directions are parallel (or zero).
    """
    r, c = orientation[:3], orientation[3:6]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    if norm < 1e-6:
        raise ValueError("row and column cosines are parallel")
    return (n[0] / norm, n[1] / norm, n[2] / norm)


def positions_along_normal(positions_mm: Sequence[Sequence[float]],
                           orientation: Sequence[float]) -> list[float]:
    """Each ImagePositionPatient projected on the slice normal of ``orientation`` (mm).

    Raises ValueError for a degenerate orientation.
    """
    normal = slice_normal(orientation)
    return [_dot(p, normal) for p in positions_mm]


def nearest_patient_axis(normal: Sequence[float]) -> tuple[int, float]:
    """(patient axis 0=x L-R, 1=y A-P, 2=z S-I closest to ``normal``, angle to it in degrees)."""
    axis = max(range(3), key=lambda i: abs(normal[i]))
    return axis, math.degrees(math.acos(min(1.0, abs(normal[axis]))))


def oblique_angle_deg(orientation: Sequence[float]) -> float:
    """Angle between the slice normal and its nearest patient axis (degrees)."""
    return nearest_patient_axis(slice_normal(orientation))[1]


def z_extent_mm(orientation: Sequence[float], first_position_mm: Sequence[float],
                normal_extent_mm: float, spacing_mm: float, rows: int, columns: int,
                pixel_spacing_mm: Sequence[float]) -> float:
    """Superior-inferior (patient z) length of the imaged slab, from all 8 corners.

    The slab spans the voxel edges: rows × row spacing, columns × column spacing,
    and the slice centres ± half a spacing along the normal (``normal_extent_mm``: the
    first to the last slice centre; ``first_position_mm``: the first slice's
    ImagePositionPatient). For coronal and sagittal series the z extent is in-plane.
    """
    r, c = orientation[:3], orientation[3:6]
    n = slice_normal(orientation)
    row_mm, col_mm = pixel_spacing_mm[0], pixel_spacing_mm[1]  # between rows, between columns
    zs = []
    for a in (-0.5, columns - 0.5):
        for b in (-0.5, rows - 0.5):
            for d in (-0.5 * spacing_mm, normal_extent_mm + 0.5 * spacing_mm):
                zs.append(first_position_mm[2] + r[2] * a * col_mm + c[2] * b * row_mm + n[2] * d)
    return max(zs) - min(zs)
