"""Reader annotations → physical nodules: measurements per mark, clustering across readers.

Every outlined mark gets its centroid (mm), diameter (the longest in-plane chord of any of
its inclusion outlines, mm), volume (outline areas × slice spacing, exclusion outlines
subtracted, mm³) and z range. Marks of different readers are then joined into one physical
nodule when their centroids lie within ``max(min_tolerance_mm, tolerance_factor × the
larger diameter)`` of each other — closest pairs first, and never two marks of one reader in
one nodule (a reader marks a nodule once). scipy's hierarchical clustering has no such
cannot-link rule, hence the small union-find here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.spatial.distance import pdist

from data_prep.lidc import readxml


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Pixel → patient mm of an axial series (from its first slice's header)."""

    origin_xy_mm: tuple[float, float]        # ImagePositionPatient x, y
    row_cosine: tuple[float, float]          # x, y of ImageOrientationPatient[:3] (along a row)
    column_cosine: tuple[float, float]       # x, y of ImageOrientationPatient[3:]
    pixel_spacing_mm: tuple[float, float]    # (between rows, between columns)
    slice_spacing_mm: float

    def to_mm(self, points_xy: np.ndarray) -> np.ndarray:
        """[N, 2] pixel (column, row) → [N, 2] patient (x, y) mm."""
        col, row = points_xy[:, 0:1], points_xy[:, 1:2]
        dr, dc = self.pixel_spacing_mm
        return (np.asarray(self.origin_xy_mm) + col * dc * np.asarray(self.row_cosine)
                + row * dr * np.asarray(self.column_cosine))


@dataclasses.dataclass
class Mark:
    annotation: readxml.Annotation
    centroid_mm: np.ndarray      # [3] x, y, z
    diameter_mm: float
    volume_mm3: float
    z_min_mm: float
    z_max_mm: float


@dataclasses.dataclass
class Nodule:
    marks: list[Mark]

    @property
    def readers(self) -> list[int]:
        return sorted(m.annotation.reader for m in self.marks)

    @property
    def ratings(self) -> list[int]:
        return sorted(m.annotation.malignancy for m in self.marks
                      if m.annotation.malignancy is not None)

    @property
    def kind(self) -> str:
        return (readxml.NODULE if any(m.annotation.kind == readxml.NODULE for m in self.marks)
                else readxml.SMALL)

    def summary(self) -> dict:
        r = self.ratings
        outlined = [m for m in self.marks if m.annotation.kind == readxml.NODULE]
        c = np.mean([m.centroid_mm for m in self.marks], axis=0)
        return {
            "kind": self.kind,
            "n_readers": len(set(self.readers)),
            "malignancy_median": float(np.median(r)) if r else float("nan"),
            "malignancy_spread": float(max(r) - min(r)) if r else float("nan"),
            "malignancy_ratings": ";".join(str(v) for v in r),
            "diameter_mm": float(np.median([m.diameter_mm for m in outlined])) if outlined else 0.0,
            "volume_mm3": float(np.median([m.volume_mm3 for m in outlined])) if outlined else 0.0,
            "z_min_mm": float(min(m.z_min_mm for m in self.marks)),
            "z_max_mm": float(max(m.z_max_mm for m in self.marks)),
            "x_mm": float(c[0]), "y_mm": float(c[1]), "z_mm": float(c[2]),
        }


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of a closed outline [N, 2] (mm²); 0 for fewer than 3 points."""
    if len(points) < 3:
        return 0.0
    x, y = points[:, 0], points[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def measure(annotation: readxml.Annotation, geometry: Geometry) -> Mark:
    """Centroid, diameter, volume and z range of one nodule or small-nodule mark."""
    centres, weights, diameter, volume = [], [], 0.0, 0.0
    zs = [r.z_mm for r in annotation.rois]
    for roi in annotation.rois:
        pts = geometry.to_mm(roi.points_xy)
        area = polygon_area(pts)
        if roi.inclusion:
            centres.append([*pts.mean(axis=0), roi.z_mm])
            weights.append(max(area, 1e-6))
            if len(pts) > 1:
                diameter = max(diameter, float(pdist(pts).max()))
            volume += area * geometry.slice_spacing_mm
        else:
            volume -= area * geometry.slice_spacing_mm
    if not centres:  # only exclusion outlines: place the mark at their mean
        centres = [[*geometry.to_mm(r.points_xy).mean(axis=0), r.z_mm] for r in annotation.rois]
        weights = [1.0] * len(centres)
    centroid = np.average(np.asarray(centres), axis=0, weights=np.asarray(weights))
    return Mark(annotation, centroid, diameter, max(volume, 0.0), min(zs), max(zs))


def cluster(marks: list[Mark], min_tolerance_mm: float, tolerance_factor: float) -> list[Nodule]:
    """Marks of several readers → physical nodules (module docstring)."""
    n = len(marks)
    parent = list(range(n))
    readers = [{m.annotation.reader} for m in marks]

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs = []
    for i in range(n):
        for j in range(i + 1, n):
            d = float(np.linalg.norm(marks[i].centroid_mm - marks[j].centroid_mm))
            tol = max(min_tolerance_mm,
                      tolerance_factor * max(marks[i].diameter_mm, marks[j].diameter_mm))
            if d <= tol:
                pairs.append((d, i, j))
    for _, i, j in sorted(pairs):
        a, b = root(i), root(j)
        if a != b and not (readers[a] & readers[b]):
            parent[b] = a
            readers[a] |= readers[b]
    groups: dict[int, list[Mark]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(marks[i])
    nodules = [Nodule(g) for g in groups.values()]
    nodules.sort(key=lambda nod: (nod.summary()["z_mm"], nod.summary()["x_mm"]))
    return nodules
