"""Mined lesions (OUT/lesions.csv) + the DICOM pixels → radnet's lesion dataset, the format
the DeepLesion import writes (radnet/data/deeplesion.py): one slab per key slice with its
2k+1 slices in geometric order, every measurement on it a box."""

from __future__ import annotations

import csv
import os
from collections import OrderedDict
from typing import Callable, Iterable

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from radnet.data import deeplesion as dl


def _floats(text):
    return [float(t) for t in str(text).split(",") if t.strip()]


def build(lesions_csv: str, archive, out: str, dcfg,
          progress: Callable[[Iterable], Iterable] = lambda it: it) -> dict:
    """``archive``: the mine.Archive whose series headers were read."""
    with open(lesions_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    groups: "OrderedDict[tuple[str, int], list[dict]]" = OrderedDict()
    for r in rows:
        groups.setdefault((r["Series_key"], int(r["Key_slice_index"])), []).append(r)
    k = int(dcfg.context)
    store = dl.create(out, len(groups), k, int(dcfg.size), float(dcfg.mm_per_pixel),
                      tuple(dcfg.window_hu), "mined")
    images, lesions = [], []
    for index, ((series_key, key), members) in enumerate(progress(list(groups.items()))):
        located = archive.series_slices[series_key]
        wanted = dl.context_indices(key, range(len(located)), k)
        split = dl.SPLIT_CODES.get(int(members[0]["Train_Val_Test"] or 0), "")
        spacing = _floats(members[0]["Spacing_mm_px_"])
        image = {"index": index, "image_key": f"{series_key}_{key:03d}", "split": split,
                 "status": "ok", "reason": "", "key_slice_index": key,
                 "spacing_mm": f"{spacing[0]:g}",
                 "slice_interval_mm": f"{spacing[2]:g}" if len(spacing) > 2 else "",
                 "num_lesions": len(members)}
        try:
            hu = np.stack([
                apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
                for ds in (pydicom.dcmread(os.path.join(archive.root, located[i]["path"]))
                           for i in wanted)])
            slab, scale = dl.prepare_slab(hu, spacing[0], float(dcfg.mm_per_pixel),
                                          int(dcfg.size), dcfg.window_hu)
        except Exception as e:  # noqa: BLE001  (a broken series is recorded; the run goes on)
            image.update(status="error", reason=f"unreadable_image:{type(e).__name__}")
            images.append(image)
            for r in members:
                lesions.append({"index": index, "lesion_id": r["Lesion_key"], "status": "error",
                                "reason": "unreadable_image", "split": split})
            continue
        if not split:
            image.update(status="error", reason="no_split")
        store[index].write(slab).result()
        image.update(scale=f"{scale:.6f}", rows=hu.shape[1], columns=hu.shape[2])
        images.append(image)
        for r in members:
            box = _floats(r["Bounding_boxes"])
            b = [min(v * scale, int(dcfg.size) - 1) for v in box]
            diam = _floats(r["Lesion_diameters_mm"])
            lesions.append({
                "index": index, "lesion_id": r["Lesion_key"],
                "status": "ok" if split else "error", "reason": "" if split else "no_split",
                "split": split,
                **{c: f"{v:g}" for c, v in zip(("x1", "y1", "x2", "y2"), box)},
                **{c: f"{v:.4f}" for c, v in zip(("bx1", "by1", "bx2", "by2"), b)},
                "lesion_type": r["Coarse_lesion_type"], "long_mm": f"{diam[0]:.3f}",
                "short_mm": f"{diam[1]:.3f}", "possibly_noisy": r["Possibly_noisy"]})
    dl.write_tables(out, images, lesions)
    ok = [r for r in images if r["status"] == "ok"]
    return {"dataset": out, "images": len(images), "images_ok": len(ok),
            **{s: sum(r["split"] == s for r in ok) for s in ("train", "val", "test")}}
