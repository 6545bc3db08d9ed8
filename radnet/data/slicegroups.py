"""Slice groups of a chest CT (LIDC-IDRI dataset of data_prep.lidc): labels, sectors, input.

A stored series is ``[n_slices, H, W]`` uint8 at 1 mm, **superior first**. It is cut into
groups of ``group_slices`` consecutive slices (the last one padded with blank slices) and
into ``sector_num`` sectors along z: a group's sector is the one holding its centre
(sector 0 at the top of the chest, as the report numbers its bins).

Labels (``config.labels``), from the consensus nodules of nodules.csv: a nodule counts
when ≥ ``min_readers`` readers marked it and its diameter is ≥ ``min_diameter_mm`` (sub-3 mm
marks never count); it is **malignant** when its median malignancy ≥ ``malignant_min``,
**benign** when ≤ ``benign_max``, otherwise indeterminate. A group whose slices overlap a
malignant nodule is malignant, else benign if it overlaps a benign one, else unknown (-1,
left out) if it overlaps an indeterminate one, else non-nodule. A group that holds only
the first or last ``min_overlap_slices − 1`` slices of a nodule is unknown too (an edge of a
nodule in a slab is neither clearly a nodule group nor clearly free of one). The report's choice:
``benign_max=2.5, malignant_min=3`` (mean ≥ 3 malignant); the stricter choice common in
LIDC studies and nnU-Net-style conversions: ``benign_max=2, malignant_min=4`` (3 left out).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
from typing import Sequence

import grain
import numpy as np
import tensorstore as ts

from radnet.data import nifti, schema

CLASSES = ("non_nodule", "benign", "malignant")
NON_NODULE, BENIGN, MALIGNANT, UNKNOWN = 0, 1, 2, -1
CHUNK_SLICES = 8
MANIFEST_COLUMNS = ("series_key", "status", "reason", "split", "n_files", "source_slices",
                    "n_slices", "source_slice_spacing_mm", "pixel_spacing_mm", "top_z_mm",
                    "step_mm", "n_readers", "n_nodules")
NODULE_COLUMNS = ("series_key", "nodule", "kind", "n_readers", "malignancy_median",
                  "malignancy_spread", "malignancy_ratings", "diameter_mm", "volume_mm3",
                  "z_min_mm", "z_max_mm", "x_mm", "y_mm", "z_mm", "slice_first", "slice_last")


def array_spec(dataset: str, key: str, shape=None) -> dict:
    return schema.slices_array_spec(dataset, f"image/{key}", CHUNK_SLICES, shape)


def read_attributes(dataset: str) -> dict:
    return schema.read_attributes_of_kind(dataset, ("lidc",), "LIDC dataset",
                                          "python -m data_prep.lidc")


def _read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@dataclasses.dataclass(frozen=True)
class Group:
    series_key: str
    split: str
    index: int          # group number within the series, from the top
    start: int          # first stored slice
    sector: int
    label: int
    nodules: str        # ';'-joined nodule numbers it overlaps (consensus ones)


def nodule_class(row: dict, labels) -> int | None:
    """BENIGN / MALIGNANT / UNKNOWN for a counting nodule, None for one that does not count."""
    if row["kind"] != "nodule" or int(row["n_readers"]) < int(labels.min_readers):
        return None
    if float(row["diameter_mm"] or 0) < float(labels.min_diameter_mm):
        return None
    if not row["malignancy_median"]:
        return UNKNOWN
    m = float(row["malignancy_median"])
    if m >= float(labels.malignant_min):
        return MALIGNANT
    if m <= float(labels.benign_max):
        return BENIGN
    return UNKNOWN


def sector_of(start: int, group_slices: int, n_slices: int, sector_num: int) -> int:
    centre = min(start + group_slices / 2, n_slices)
    return min(int(centre / n_slices * sector_num), sector_num - 1)


def make_groups(dataset: str, group_slices: int, sector_num: int, labels) -> list[Group]:
    """Every slice group of every included series, labelled (module docstring)."""
    manifest = _read_csv(os.path.join(dataset, "manifest.csv"))
    by_series: dict[str, list[dict]] = {}
    for r in _read_csv(os.path.join(dataset, "nodules.csv")):
        by_series.setdefault(r["series_key"], []).append(r)
    out = []
    for s in manifest:
        if s["status"] != "included":
            continue
        n = int(s["n_slices"])
        counted = []
        for r in by_series.get(s["series_key"], []):
            cls = nodule_class(r, labels)
            if cls is not None:
                counted.append((int(r["slice_first"]), int(r["slice_last"]), cls, r["nodule"]))
        for g, start in enumerate(range(0, n, group_slices)):
            stop = start + group_slices - 1
            hits, edge = [], False
            for a, b, c, j in counted:
                overlap = min(b, stop) - max(a, start) + 1
                if overlap >= min(int(labels.min_overlap_slices), b - a + 1):
                    hits.append((c, j))
                elif overlap > 0:
                    edge = True
            classes = {c for c, _ in hits} | ({UNKNOWN} if edge else set())
            label = (MALIGNANT if MALIGNANT in classes else BENIGN if BENIGN in classes
                     else UNKNOWN if UNKNOWN in classes else NON_NODULE)
            out.append(Group(s["series_key"], s["split"], g, start,
                             sector_of(start, group_slices, n, sector_num), label,
                             ";".join(j for _, j in hits)))
    return out


def balance(groups: Sequence[Group], mode: str, seed: int) -> list[Group]:
    """Training groups after class balancing; unknown labels dropped.

    ``oversample``: every class repeated up to the largest class's count; ``undersample``
    (the report's): per sector, non-nodule groups limited to the count of the larger
    nodule class there (at least 1); ``none``: as they are.
    """
    groups = [g for g in groups if g.label != UNKNOWN]
    rng = np.random.default_rng(seed)
    if mode == "none":
        return list(groups)
    if mode == "oversample":
        by = {c: [g for g in groups if g.label == c] for c in range(len(CLASSES))}
        top = max(len(v) for v in by.values())
        out = []
        for c, v in by.items():
            if v:
                reps = -(-top // len(v))
                out += (v * reps)[:top]
        return out
    if mode == "undersample":
        out = []
        for sector in sorted({g.sector for g in groups}):
            here = [g for g in groups if g.sector == sector]
            nod = [g for g in here if g.label != NON_NODULE]
            non = [g for g in here if g.label == NON_NODULE]
            cap = max(1, max(sum(g.label == c for g in nod) for c in (BENIGN, MALIGNANT)))
            keep = rng.permutation(len(non))[:cap]
            out += nod + [non[i] for i in sorted(keep)]
        return out
    raise ValueError(f"balance mode {mode!r}; choose oversample, undersample or none")


@functools.lru_cache(maxsize=64)
def _open(dataset: str, key: str) -> ts.TensorStore:
    return ts.open(array_spec(dataset, key), read=True).result()


def downsample(slab: np.ndarray, in_plane: int) -> np.ndarray:
    """[D, H, W] → [D, in_plane, in_plane] by the mean of each block (H a multiple)."""
    h = slab.shape[1]
    if h == in_plane:
        return slab
    if h % in_plane:
        raise ValueError(f"stored in-plane size {h} is not a multiple of in_plane={in_plane}")
    f = h // in_plane
    blocks = slab.reshape(slab.shape[0], in_plane, f, in_plane, f).astype(np.float32)
    return np.round(blocks.mean(axis=(2, 4))).astype(np.uint8)


def read_slab(dataset: str, key: str, start: int, group_slices: int, in_plane: int) -> np.ndarray:
    """Stored slices [start, start + group_slices), blank past the end: ``[D, H, W]`` uint8."""
    return downsample(nifti.read_window(_open(dataset, key), start, group_slices), in_plane)


class SlabReader(grain.transforms.Map):
    """Group → ``{"image": uint8 [D, H, W], "sector": int32, "label": int32}``."""

    def __init__(self, dataset: str, group_slices: int, in_plane: int):
        self.dataset, self.group_slices, self.in_plane = dataset, group_slices, in_plane

    def map(self, g: Group) -> dict[str, np.ndarray]:
        return {"image": read_slab(self.dataset, g.series_key, g.start, self.group_slices,
                                   self.in_plane),
                "sector": np.int32(g.sector), "label": np.int32(g.label)}


def train_iterator(dataset: str, groups: Sequence[Group], group_slices: int, in_plane: int,
                   batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
    """This process's shuffled, repeated, checkpointable batches of training groups."""
    if not groups:
        raise ValueError("no training groups")
    stream = grain.MapDataset.source(list(groups)).seed(seed).shuffle().repeat(None)
    return iter(stream[process_index::process_count]
                .map(SlabReader(dataset, group_slices, in_plane))
                .batch(batch_size)
                .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))
