"""The lesion-detection dataset (DeepLesion import and mined RECIST measurements share it):
its format, the slab preparation (HU window, in-plane resampling) and the reader.

Layout of DATASET (written by ``python -m data_prep.deeplesion`` or ``python -m
data_prep.lesions --dataset_out``)::

    zarr.json      group; attributes: kind="lesions", context (k), num_slices (2k+1),
                   mm_per_pixel (0 = native), size, window_hu, source
    image/         uint8 [N, 2k+1, size, size]: the key slice (centre) and k context
                   slices on each side, HU windowed to 0..255, resampled in plane to
                   mm_per_pixel, padded (zeros) or cropped at the bottom/right to size;
                   one chunk per image
    images.csv     one row per key slice: index (row of image/), image_key, split, status,
                   reason, key_slice_index, spacing_mm (in plane, source), slice_interval_mm,
                   scale (dataset px per source px), rows, columns (source), num_lesions
    lesions.csv    one row per lesion: index, lesion_id, status, reason, split, x1 y1 x2 y2
                   (source pixels, as DL_info's Bounding_boxes), bx1 by1 bx2 by2 (dataset
                   pixels), lesion_type, long_mm, short_mm, possibly_noisy

Boxes are ``x1, y1, x2, y2`` with x along columns and y along rows (DeepLesion's order).
Context slices beyond the stored run of slices repeat its end slice. Lesion types are DeepLesion's
coarse types (LESION_TYPES; -1 unknown).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.ndimage
import tensorstore as ts

from radnet.data import schema

KIND = "lesions"
# DeepLesion's Coarse_lesion_type codes (Yan et al. 2018); -1 = not labelled.
LESION_TYPES = {1: "bone", 2: "abdomen", 3: "mediastinum", 4: "liver", 5: "lung",
                6: "kidney", 7: "soft_tissue", 8: "pelvis"}
TYPE_CODES = {name: code for code, name in LESION_TYPES.items()}
# DL_info.csv's Train_Val_Test codes.
SPLIT_CODES = {1: "train", 2: "val", 3: "test"}

IMAGE_COLUMNS = ("index", "image_key", "split", "status", "reason", "key_slice_index",
                 "spacing_mm", "slice_interval_mm", "scale", "rows", "columns", "num_lesions")
LESION_COLUMNS = ("index", "lesion_id", "status", "reason", "split", "x1", "y1", "x2", "y2",
                  "bx1", "by1", "bx2", "by2", "lesion_type", "long_mm", "short_mm",
                  "possibly_noisy")


def window_to_uint8(hu: np.ndarray, window_hu: Sequence[float]) -> np.ndarray:
    """HU → uint8: ``window_hu = (lo, hi)`` maps linearly to 0..255, clipped."""
    lo, hi = float(window_hu[0]), float(window_hu[1])
    if hi <= lo:
        raise ValueError(f"window_hu={tuple(window_hu)}: the upper bound must exceed the lower")
    scaled = (np.asarray(hu, np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def resample_scale(spacing_mm: float, mm_per_pixel: float) -> float:
    """Dataset pixels per source pixel (1 when ``mm_per_pixel`` is 0: native)."""
    return 1.0 if mm_per_pixel <= 0 else float(spacing_mm) / float(mm_per_pixel)


def prepare_slab(slices_hu: np.ndarray, spacing_mm: float, mm_per_pixel: float, size: int,
                 window_hu: Sequence[float]) -> tuple[np.ndarray, float]:
    """``[S, rows, cols]`` HU → (``[S, size, size]`` uint8, scale).

    Linear in-plane resampling by ``scale = spacing_mm / mm_per_pixel`` with pixel
    corners kept aligned (``scipy.ndimage.zoom(grid_mode=True)``), so a source coordinate
    ``x`` lands at ``x · scale``; then the bottom/right are zero-padded or cropped to
    ``size``.
    """
    scale = resample_scale(spacing_mm, mm_per_pixel)
    slab = np.asarray(slices_hu, np.float32)
    if scale != 1.0:
        slab = scipy.ndimage.zoom(slab, (1.0, scale, scale), order=1, grid_mode=True,
                                  mode="grid-constant", cval=float(slab.min()))
    u8 = window_to_uint8(slab, window_hu)
    out = np.zeros((u8.shape[0], size, size), np.uint8)
    h, w = min(size, u8.shape[1]), min(size, u8.shape[2])
    out[:, :h, :w] = u8[:, :h, :w]
    return out, scale


def context_indices(key: int, available: Sequence[int], k: int) -> list[int]:
    """The 2k+1 slice indices ``key - k … key + k``; where one is not in ``available`` (the
    series, or the run of slices stored around the key slice, ends) the last one found
    towards that side is repeated."""
    have = set(int(a) for a in available)
    if key not in have:
        raise ValueError(f"key slice {key} is not among the available slices")
    out = [key]
    for step in (-1, 1):
        current = key
        side = []
        for d in range(1, k + 1):
            if key + step * d in have and current == key + step * (d - 1):
                current = key + step * d
            side.append(current)
        out = (side[::-1] + out) if step < 0 else (out + side)
    return out


# ----------------------------------------------------------------------------- writing

def create(dataset: str, num_images: int, context: int, size: int, mm_per_pixel: float,
           window_hu: Sequence[float], source: str) -> ts.TensorStore:
    """The group and an empty ``image`` array for ``num_images`` slabs (replacing any)."""
    attrs = {"kind": KIND, "context": int(context), "num_slices": 2 * int(context) + 1,
             "size": int(size), "mm_per_pixel": float(mm_per_pixel),
             "window_hu": [float(w) for w in window_hu], "source": source}
    kv = ts.KvStore.open(schema.kvstore_spec(dataset.rstrip("/") + "/")).result()
    kv.write("zarr.json", json.dumps({"zarr_format": 3, "node_type": "group",
                                      "attributes": attrs}, indent=1).encode()).result()
    shape = (max(num_images, 1), 2 * context + 1, size, size)
    spec = schema.array_spec(dataset, "image", shape, "uint8", (1, *shape[1:]),
                             schema.CODECS["zstd"], 0)
    return ts.open(spec, create=True, delete_existing=True).result()


def write_tables(dataset: str, images: list[dict], lesions: list[dict]) -> None:
    for name, columns, rows in (("images.csv", IMAGE_COLUMNS, images),
                                ("lesions.csv", LESION_COLUMNS, lesions)):
        with open(os.path.join(dataset, name), "w", newline="") as f:
            w = csv.DictWriter(f, columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)


# ----------------------------------------------------------------------------- reading

@dataclass
class LesionDataset:
    """An opened dataset: ``image`` (TensorStore ``[N, S, size, size]``), the attributes,
    the rows of images.csv and lesions.csv."""

    path: str
    attributes: dict
    image: ts.TensorStore
    images: list[dict]
    lesions: list[dict]

    def indices(self, split: str | None = None) -> list[int]:
        """Rows of ``image`` holding a usable slab (of one split), in order."""
        return [int(r["index"]) for r in self.images
                if r["status"] == "ok" and (split is None or r["split"] == split)]

    def boxes(self, index: int) -> np.ndarray:
        """``[M, 4]`` float32 boxes in dataset pixels of the usable lesions of one slab."""
        return self._by_image().get(index, (np.zeros((0, 4), np.float32), []))[0]

    def lesion_rows(self, index: int) -> list[dict]:
        return self._by_image().get(index, (None, []))[1]

    def _by_image(self) -> dict[int, tuple[np.ndarray, list[dict]]]:
        if not hasattr(self, "_cache"):
            grouped: dict[int, list[dict]] = {}
            for r in self.lesions:
                if r["status"] == "ok":
                    grouped.setdefault(int(r["index"]), []).append(r)
            self._cache = {
                i: (np.array([[float(r[k]) for k in ("bx1", "by1", "bx2", "by2")] for r in rs],
                             np.float32), rs) for i, rs in grouped.items()}
        return self._cache


def _read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def open_dataset(dataset: str) -> LesionDataset:
    attrs = schema.read_attributes_of_kind(dataset, (KIND,), "lesion dataset",
                                           "python -m data_prep.lesions or data_prep.deeplesion")
    image = ts.open({"driver": "zarr3",
                     "kvstore": schema.kvstore_spec(dataset.rstrip("/") + "/image")},
                    read=True).result()
    return LesionDataset(dataset, attrs, image, _read_csv(os.path.join(dataset, "images.csv")),
                         _read_csv(os.path.join(dataset, "lesions.csv")))


class SlabReader:
    """Grain map: a slab index → ``{"image": [S, size, size] uint8, "boxes": [max_boxes, 4]
    float32 (dataset px), "box_valid": [max_boxes] bool, "index": int32}``. Opens the
    dataset lazily, so it pickles into Grain workers."""

    def __init__(self, dataset: str, max_boxes: int):
        self.dataset, self.max_boxes = dataset, int(max_boxes)
        self._ds = None

    def __getstate__(self):
        return {"dataset": self.dataset, "max_boxes": self.max_boxes, "_ds": None}

    def __call__(self, index: int) -> dict:
        if self._ds is None:
            self._ds = open_dataset(self.dataset)
        index = int(index)
        image = self._ds.image[index].read().result()
        b = self._ds.boxes(index)[: self.max_boxes]
        boxes = np.zeros((self.max_boxes, 4), np.float32)
        boxes[: len(b)] = b
        valid = np.zeros(self.max_boxes, bool)
        valid[: len(b)] = True
        return {"image": image, "boxes": boxes, "box_valid": valid,
                "index": np.int32(index)}
