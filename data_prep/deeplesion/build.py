"""DeepLesion (Yan et al. 2018, NIH) in its public layout → radnet's lesion dataset
(radnet/data/deeplesion.py).

Input, as downloaded::

    ROOT/DL_info.csv                      one row per lesion, the real columns (DL_COLUMNS)
    ROOT/Images_png/<patient>_<study>_<series>/<slice>.png     16-bit, HU = value − 32768

A row's ``File_name`` ``000001_01_01_109.png`` names the folder ``000001_01_01`` and the key
slice ``109``; rows with the same File_name are lesions of one key slice (one image of the
dataset). Kept exactly: ``Bounding_boxes`` (x1, y1, x2, y2 in source pixels),
``Key_slice_index``, the in-plane ``Spacing_mm_px_``, the official ``Train_Val_Test`` split
(1 train, 2 val, 3 test), ``Coarse_lesion_type`` and ``Possibly_noisy``; the diameters in mm
are ``Lesion_diameters_Pixel_`` × spacing.

Every DL_info row ends in lesions.csv with a status (ok, or the reason: bad_row,
missing_image, unreadable_image, outside_image) and every key slice in images.csv.
"""

from __future__ import annotations

import csv
import os
from collections import OrderedDict
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from radnet.data import deeplesion as dl

DL_COLUMNS = ("File_name", "Patient_index", "Study_index", "Series_ID", "Key_slice_index",
              "Measurement_coordinates", "Bounding_boxes", "Lesion_diameters_Pixel_",
              "Normalized_lesion_location", "Coarse_lesion_type", "Possibly_noisy",
              "Slice_range", "Spacing_mm_px_", "Image_size", "DICOM_windows",
              "Patient_gender", "Patient_age", "Train_Val_Test")
HU_OFFSET = 32768


class InputError(ValueError):
    """A mistake in the command's input (missing root or DL_info.csv, wrong columns)."""


def floats(text: str) -> list[float]:
    return [float(t) for t in str(text).replace(";", ",").split(",") if t.strip()]


def read_png_hu(path: str) -> np.ndarray:
    """A DeepLesion slice → HU as int32 ``[rows, cols]``."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.dtype != np.uint16 and arr.dtype != np.int32:
        raise ValueError(f"{path}: expected a 16-bit PNG, got {arr.dtype}")
    return arr.astype(np.int32) - HU_OFFSET


def read_dl_info(path: str) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("File_name", "Key_slice_index", "Bounding_boxes",
                               "Spacing_mm_px_", "Train_Val_Test")
                   if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path} lacks the DL_info.csv column(s) {missing}; is it "
                             "DeepLesion's DL_info.csv?")
        return list(reader)


def build(root: str, out: str, context: int = 1, mm_per_pixel: float = 0.8, size: int = 512,
          window_hu: Sequence[float] = (-1024, 1024),
          progress: Callable[[Iterable], Iterable] = lambda it: it) -> dict:
    """Imports ROOT into the dataset OUT; returns a summary of counts."""
    info = os.path.join(root, "DL_info.csv")
    if not os.path.isdir(root):
        raise InputError(f"--deeplesion_root={root} is not a folder")
    if not os.path.isfile(info):
        raise InputError(f"{info} is missing; --deeplesion_root must hold DL_info.csv and "
                         "Images_png/")
    rows = read_dl_info(info)
    os.makedirs(out, exist_ok=True)
    by_image: "OrderedDict[str, list[tuple[int, dict]]]" = OrderedDict()
    lesion_rows: list[dict] = []
    for i, r in enumerate(rows):
        by_image.setdefault(r["File_name"], []).append((i, r))
    store = dl.create(out, len(by_image), context, size, mm_per_pixel, window_hu, "deeplesion")
    image_rows: list[dict] = []
    for index, (file_name, members) in enumerate(progress(list(by_image.items()))):
        first = members[0][1]
        image = {"index": index, "image_key": file_name, "status": "ok", "reason": "",
                 "num_lesions": len(members)}
        parsed = []
        try:
            folder, _, slice_name = file_name.rpartition("_")
            key = int(first["Key_slice_index"])
            if int(os.path.splitext(slice_name)[0]) != key:
                raise ValueError("File_name and Key_slice_index disagree")
            spacing = floats(first["Spacing_mm_px_"])
            split = dl.SPLIT_CODES[int(first["Train_Val_Test"])]
            image.update(split=split, key_slice_index=key, spacing_mm=f"{spacing[0]:g}",
                         slice_interval_mm=f"{spacing[2]:g}" if len(spacing) > 2 else "")
            for i, r in members:
                box = floats(r["Bounding_boxes"])
                diam = floats(r.get("Lesion_diameters_Pixel_", "") or "0,0")
                if len(box) != 4:
                    raise ValueError(f"Bounding_boxes of row {i + 2} has {len(box)} numbers")
                parsed.append((i, r, box, diam))
        except (ValueError, KeyError, IndexError) as e:
            image.update(status="error", reason=f"bad_row: {e}")
            for i, r in members:
                lesion_rows.append({"index": index, "lesion_id": i, "status": "error",
                                    "reason": "bad_row"})
            image_rows.append(image)
            continue
        slab, status = None, "ok"
        folder_path = os.path.join(root, "Images_png", folder)
        try:
            available = [int(os.path.splitext(n)[0]) for n in os.listdir(folder_path)
                         if n.endswith(".png") and os.path.splitext(n)[0].isdigit()]
            if key not in available:
                raise FileNotFoundError(f"{folder}/{key:03d}.png")
            wanted = dl.context_indices(key, available, context)
            hu = np.stack([read_png_hu(_slice_path(folder_path, s)) for s in wanted])
            slab, scale = dl.prepare_slab(hu, spacing[0], mm_per_pixel, size, window_hu)
        except FileNotFoundError as e:
            status, reason = "missing_image", f"missing_image: {os.path.basename(str(e))}"
        except (OSError, ValueError) as e:
            status, reason = "unreadable_image", f"unreadable_image: {type(e).__name__}"
        if slab is None:
            image.update(status="error", reason=reason)
            for i, r, box, diam in parsed:
                lesion_rows.append({"index": index, "lesion_id": i, "status": "error",
                                    "reason": status, "split": split})
            image_rows.append(image)
            continue
        store[index].write(slab).result()
        image.update(scale=f"{scale:.6f}", rows=hu.shape[1], columns=hu.shape[2])
        for i, r, box, diam in parsed:
            b = [v * scale for v in box]
            ok = b[0] < size and b[1] < size
            b = [min(v, size - 1) for v in b]
            lesion_rows.append({
                "index": index, "lesion_id": i, "status": "ok" if ok else "error",
                "reason": "" if ok else "outside_image", "split": split,
                **{k: f"{v:g}" for k, v in zip(("x1", "y1", "x2", "y2"), box)},
                **{k: f"{v:.4f}" for k, v in zip(("bx1", "by1", "bx2", "by2"), b)},
                "lesion_type": int(float(r.get("Coarse_lesion_type") or -1)),
                "long_mm": f"{diam[0] * spacing[0]:.3f}" if diam else "",
                "short_mm": f"{diam[1] * spacing[0]:.3f}" if len(diam) > 1 else "",
                "possibly_noisy": int(float(r.get("Possibly_noisy") or 0))})
        image_rows.append(image)
    dl.write_tables(out, image_rows, lesion_rows)
    ok_images = [r for r in image_rows if r["status"] == "ok"]
    return {"dataset": out, "rows": len(rows), "images": len(image_rows),
            "images_ok": len(ok_images),
            "lesions_ok": sum(r["status"] == "ok" for r in lesion_rows),
            "lesions_error": sum(r["status"] != "ok" for r in lesion_rows),
            **{s: sum(r.get("split") == s for r in ok_images) for s in ("train", "val", "test")}}


def _slice_path(folder_path: str, index: int) -> str:
    """DeepLesion names slices ``%03d.png``; a folder with other zero padding still works."""
    path = os.path.join(folder_path, f"{index:03d}.png")
    if os.path.exists(path):
        return path
    for name in os.listdir(folder_path):
        stem = os.path.splitext(name)[0]
        if stem.isdigit() and int(stem) == index:
            return os.path.join(folder_path, name)
    raise FileNotFoundError(path)
