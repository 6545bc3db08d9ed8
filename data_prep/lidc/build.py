"""LIDC-IDRI (DICOM CT series + reading XML) → radnet slice-group dataset.

    python -m data_prep.lidc --lidc_root=DIR --out=DATASET [--config=configs/slicegroups.py]

1. Every file under ``lidc_root`` is classified: DICOM (its header is read), ``.xml``
   (parsed with data_prep.lidc.readxml), anything else (recorded, skipped).
2. Each XML is matched to its CT series by SeriesInstanceUid (StudyInstanceUID must agree
   when both are present). A series with several XML files keeps the first (by path); the
   others are recorded as ``duplicate_xml``.
3. Each annotated series: HU (pydicom's rescale), slices sorted by position and resampled
   to ``config.build.slice_spacing_mm`` (radnet.preprocess.resample_slices), resized in
   plane to ``in_plane``, windowed ``[hu_min, hu_max]`` → uint8, stored **superior first**.
4. Annotations are measured and clustered into physical nodules (data_prep.lidc.nodules);
   each nodule's slice range in the stored volume is recorded.

DATASET (zarr v3, TensorStore)::

    zarr.json             group; attributes: kind "lidc", in_plane, slice_spacing_mm, …
    image/<series_key>/   uint8 [n_slices, in_plane, in_plane], chunks of 8 slices
    manifest.csv          one row per series: status, reason, split, sizes
    files.csv             one row per input file: kind, series_key, status, reason
    xml.csv               one row per XML file: status, reason, readers, annotations
    annotations.csv       one row per reader mark: kind, malignancy, status, reason, nodule
    nodules.csv           one row per physical nodule: readers, malignancy median/spread,
                          diameter, volume, z range, slice range

Keys are keyed hashes of the Series Instance UID; no UID, name, date or free-text
annotation id is written. Slice groups and their labels are made at training time from
nodules.csv (radnet.data.slicegroups), so sector and group settings need no rebuild.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

import numpy as np
import pydicom
import tensorstore as ts
from absl import logging
from pydicom.pixels import apply_rescale
from scipy import ndimage
from tqdm import tqdm

from data_prep.lidc import nodules as nodules_lib
from data_prep.lidc import readxml
from data_prep.nifti import build as nifti_build
from radnet import preprocess
from radnet.data import slicegroups as sg
from radnet.dicom import headers as dicom_headers
from radnet.labels import SPLITS

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
FILES_COLUMNS = ("path", "kind", "series_key", "status", "reason")
XML_COLUMNS = ("path", "series_key", "status", "reason", "n_readers", "n_annotations")
ANNOTATION_COLUMNS = ("xml_path", "series_key", "reader", "mark", "kind", "malignancy",
                      "status", "reason", "nodule", "x_mm", "y_mm", "z_mm", "diameter_mm",
                      "volume_mm3", "z_min_mm", "z_max_mm")


def series_key(secret: bytes, series_uid: str) -> str:
    return dicom_headers.keyed_hash(secret, "lidc-series", series_uid)


def _write_csv(path: str, columns, rows) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _fmt(x: float, digits: int = 2) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def assign_splits(keys: list[str], fractions, seed: int) -> dict[str, str]:
    """Seeded train/val/test split of the usable series (data_prep.nifti.build's rule: at
    least one in val and test); fewer than three series all train."""
    if len(keys) < 3:
        return {k: "train" for k in keys}
    return nifti_build.assign_splits(keys, tuple(fractions), seed)


def scan(root: str) -> tuple[dict[str, list[tuple[str, Any]]], list[str], list[dict]]:
    """(series UID → [(relpath, header)], XML relpaths, rows of other files)."""
    series: dict[str, list[tuple[str, Any]]] = {}
    xmls, others = [], []
    paths = []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        paths += [os.path.join(dirpath, f) for f in sorted(files)]
    for path in tqdm(paths, desc="scan", disable=None):
        rel = os.path.relpath(path, root)
        if rel.lower().endswith(".xml"):
            xmls.append(rel)
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - any unreadable file is recorded, not fatal
            others.append({"path": rel, "kind": "other", "series_key": "", "status": "skipped",
                           "reason": "not_dicom"})
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid:
            others.append({"path": rel, "kind": "dicom", "series_key": "", "status": "skipped",
                           "reason": "no_series_uid"})
            continue
        series.setdefault(uid, []).append((rel, ds))
    return series, xmls, others


def load_series(root: str, files: list[tuple[str, Any]], build) -> tuple[np.ndarray, dict]:
    """HU → uint8 volume [n, in_plane, in_plane] (superior first) and its geometry."""
    items = []
    for rel, header in files:
        if str(header.get("SOPClassUID", "")) != CT_IMAGE_STORAGE or "ImagePositionPatient" not in header:
            continue
        items.append((float(header.ImagePositionPatient[2]), rel, header))
    if len(items) < 2:
        raise ValueError("fewer_than_2_ct_slices")
    items.sort(key=lambda t: t[0])
    z = np.array([t[0] for t in items])
    if np.any(np.diff(z) <= 1e-3):
        raise ValueError("duplicate_slice_positions")
    gaps = np.diff(z)
    if gaps.max() > 1.5 * np.median(gaps):
        raise ValueError("missing_slices")
    first = items[0][2]
    iop = [float(v) for v in first.ImageOrientationPatient]
    if abs(abs(iop[0]) - 1) > 0.01 or abs(abs(iop[4]) - 1) > 0.01:
        raise ValueError("not_axial")
    stack = []
    for _, rel, _ in items:
        ds = pydicom.dcmread(os.path.join(root, rel))
        stack.append(apply_rescale(ds.pixel_array, ds).astype(np.float32))
    rows, cols = stack[0].shape
    spacing = float(np.median(gaps))
    extent = z[-1] - z[0] + spacing
    step_mm = float(build.slice_spacing_mm)
    n_out = max(1, int(round(extent / step_mm)))
    vol = preprocess.resample_slices(np.stack(stack), z, n_out)
    size = int(build.in_plane)
    if (rows, cols) != (size, size):
        vol = ndimage.zoom(vol, (1, size / rows, size / cols), order=1)
    lo, hi = float(build.hu_min), float(build.hu_max)
    u8 = np.round((np.clip(vol, lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)
    ps = [float(v) for v in first.PixelSpacing]
    true_step = (extent) / n_out
    geometry = nodules_lib.Geometry(
        origin_xy_mm=(float(first.ImagePositionPatient[0]), float(first.ImagePositionPatient[1])),
        row_cosine=(iop[0], iop[1]), column_cosine=(iop[3], iop[4]),
        pixel_spacing_mm=(ps[0], ps[1]), slice_spacing_mm=spacing)
    # Stored slice s (superior first) is centred at top_z_mm − s · step.
    top_z = z[0] - spacing / 2 + (n_out - 0.5) * true_step
    info = {"n_files": len(files), "source_slices": len(items), "n_slices": n_out,
            "source_slice_spacing_mm": spacing, "pixel_spacing_mm": ps[0] * rows / size,
            "top_z_mm": float(top_z), "step_mm": float(true_step)}
    return u8[::-1].copy(), {"geometry": geometry, **info}


def _slice_range(info: dict, z_min: float, z_max: float) -> tuple[int, int]:
    """Stored slice indices [first, last] covering z_min..z_max (mm)."""
    top, step, n = info["top_z_mm"], info["step_mm"], info["n_slices"]
    a = int(math.floor((top - z_max) / step + 0.5))
    b = int(math.floor((top - z_min) / step + 0.5))
    return max(0, min(a, b)), min(n - 1, max(a, b))


def build(lidc_root: str, out: str, config, secret: bytes) -> dict:
    """Runs the whole tool (module docstring); returns the summary."""
    if not os.path.isdir(lidc_root):
        raise FileNotFoundError(f"--lidc_root={lidc_root} is not a folder; give the folder "
                                "holding the LIDC-IDRI patient folders (docs/lidc.md)")
    b = config.build
    os.makedirs(out, exist_ok=True)
    series, xmls, file_rows = scan(lidc_root)
    keys = {uid: series_key(secret, uid) for uid in series}
    study_of = {uid: str(files[0][1].get("StudyInstanceUID", "")) for uid, files in series.items()}

    # XML → series.
    xml_rows, annotated, parsed = [], {}, []
    for rel in xmls:
        row = {"path": rel, "series_key": "", "status": "excluded", "reason": "",
               "n_readers": 0, "n_annotations": 0}
        try:
            msg = readxml.parse(os.path.join(lidc_root, rel))
        except readxml.XmlError as e:
            row["reason"] = e.reason
            xml_rows.append(row)
            continue
        row.update(n_readers=msg.num_readers, n_annotations=len(msg.annotations))
        parsed.append((rel, msg, row))
        if msg.series_uid not in series:
            row["reason"] = "no_matching_series"
        elif msg.study_uid and study_of[msg.series_uid] and msg.study_uid != study_of[msg.series_uid]:
            row["series_key"], row["reason"] = keys[msg.series_uid], "study_uid_mismatch"
        elif msg.series_uid in annotated:
            row["series_key"], row["reason"] = keys[msg.series_uid], "duplicate_xml"
        else:
            row.update(series_key=keys[msg.series_uid], status="included")
            annotated[msg.series_uid] = (rel, msg)
        xml_rows.append(row)

    # Series → volumes, annotations → nodules.
    attrs = {"kind": "lidc", "in_plane": int(b.in_plane),
             "slice_spacing_mm": float(b.slice_spacing_mm), "hu_window": [b.hu_min, b.hu_max],
             "orientation": "slices superior->inferior, rows anterior->posterior, "
                            "columns right->left", "chunk_slices": sg.CHUNK_SLICES}
    nifti_build.write_group(out, attrs, subgroups=("image",))
    manifest, ann_rows, nodule_rows = [], [], []
    series_status = {}
    for uid in tqdm(sorted(series, key=lambda u: keys[u]), desc="series", disable=None):
        key = keys[uid]
        row = {"series_key": key, "status": "excluded", "reason": "", "split": "",
               "n_files": len(series[uid])}
        modality = str(series[uid][0][1].get("Modality", ""))
        if modality != "CT":
            row["reason"] = f"modality_{modality or 'missing'}"
        elif uid not in annotated:
            row["reason"] = "no_annotation_xml"
        else:
            try:
                volume, info = load_series(lidc_root, series[uid], b)
            except ValueError as e:
                row["reason"] = str(e)
            except Exception as e:  # noqa: BLE001 - a bad file costs its series, not the run
                logging.warning("series %s: %s: %s", key, type(e).__name__, e)
                row["reason"] = f"unreadable_pixels_{type(e).__name__}"
            else:
                store = ts.open(sg.array_spec(out, key, volume.shape), create=True,
                                delete_existing=True).result()
                store.write(volume).result()
                row.update(status="included", **{k: v for k, v in info.items() if k != "geometry"})
                xml_rel, msg = annotated[uid]
                rows_a, rows_n = _annotations(key, xml_rel, msg, info, b)
                ann_rows += rows_a
                nodule_rows += rows_n
                row["n_readers"] = msg.num_readers
                row["n_nodules"] = sum(r["kind"] == readxml.NODULE for r in rows_n)
        series_status[uid] = row
        manifest.append(row)
    for uid, (xml_rel, msg) in annotated.items():  # XML of a series that failed to load
        if series_status[uid]["status"] != "included":
            for reader_ann in msg.annotations:
                ann_rows.append({"xml_path": xml_rel, "series_key": keys[uid],
                                 "reader": reader_ann.reader, "kind": reader_ann.kind,
                                 "status": "excluded",
                                 "reason": f"series_{series_status[uid]['reason']}"})
    for rel, msg, xml_row in parsed:  # marks of an XML that was not used
        if xml_row["status"] != "included":
            for a in msg.annotations:
                ann_rows.append({"xml_path": rel, "series_key": xml_row["series_key"],
                                 "reader": a.reader, "kind": a.kind, "status": "excluded",
                                 "reason": f"xml_{xml_row['reason']}"})
    splits = assign_splits([r["series_key"] for r in manifest if r["status"] == "included"],
                           tuple(b.split_fractions), int(b.split_seed))
    for r in manifest:
        r["split"] = splits.get(r["series_key"], "")
    for uid, files in series.items():
        st = series_status[uid]
        for rel, _ in files:
            file_rows.append({"path": rel, "kind": "dicom", "series_key": keys[uid],
                              "status": "included" if st["status"] == "included" else "skipped",
                              "reason": st["reason"]})
    for r in xml_rows:
        file_rows.append({"path": r["path"], "kind": "xml", "series_key": r["series_key"],
                          "status": r["status"], "reason": r["reason"]})
    file_rows.sort(key=lambda r: r["path"])
    _write_csv(os.path.join(out, "manifest.csv"), sg.MANIFEST_COLUMNS, manifest)
    _write_csv(os.path.join(out, "files.csv"), FILES_COLUMNS, file_rows)
    _write_csv(os.path.join(out, "xml.csv"), XML_COLUMNS, xml_rows)
    _write_csv(os.path.join(out, "annotations.csv"), ANNOTATION_COLUMNS, ann_rows)
    _write_csv(os.path.join(out, "nodules.csv"), sg.NODULE_COLUMNS, nodule_rows)
    summary = {"files": len(file_rows), "xml": len(xml_rows),
               "xml_included": sum(r["status"] == "included" for r in xml_rows),
               "series": len(manifest),
               "series_included": sum(r["status"] == "included" for r in manifest),
               "annotations": len(ann_rows), "nodules": sum(r["kind"] == readxml.NODULE
                                                           for r in nodule_rows),
               **{s: sum(r["split"] == s for r in manifest) for s in SPLITS}}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    logging.info("lidc dataset %s: %s", out, summary)
    return summary


def _annotations(key: str, xml_rel: str, msg: readxml.ReadMessage, info: dict, b):
    geometry = info["geometry"]
    marks, rows = [], []
    for i, a in enumerate(msg.annotations):
        row = {"xml_path": xml_rel, "series_key": key, "reader": a.reader, "mark": i,
               "kind": a.kind, "malignancy": a.malignancy or "", "status": "included",
               "reason": a.reason, "nodule": ""}
        if a.status != "parsed":
            row.update(status="excluded", reason=a.reason)
        elif a.kind == readxml.NON_NODULE:
            roi = a.rois[0]
            xy = geometry.to_mm(roi.points_xy)[0]
            row.update(x_mm=_fmt(xy[0]), y_mm=_fmt(xy[1]), z_mm=_fmt(roi.z_mm),
                       reason="non_nodule_not_clustered")
        else:
            m = nodules_lib.measure(a, geometry)
            marks.append((m, row))
            row.update(x_mm=_fmt(m.centroid_mm[0]), y_mm=_fmt(m.centroid_mm[1]),
                       z_mm=_fmt(m.centroid_mm[2]), diameter_mm=_fmt(m.diameter_mm),
                       volume_mm3=_fmt(m.volume_mm3, 1), z_min_mm=_fmt(m.z_min_mm),
                       z_max_mm=_fmt(m.z_max_mm))
        rows.append(row)
    found = nodules_lib.cluster([m for m, _ in marks], float(b.min_tolerance_mm),
                                float(b.tolerance_factor))
    row_of = {id(m): r for m, r in marks}
    nodule_rows = []
    for j, nod in enumerate(found):
        s = nod.summary()
        for m in nod.marks:
            row_of[id(m)]["nodule"] = j
        first, last = _slice_range(info, s["z_min_mm"], s["z_max_mm"])
        nodule_rows.append({
            "series_key": key, "nodule": j, "kind": s["kind"], "n_readers": s["n_readers"],
            "malignancy_median": _fmt(s["malignancy_median"], 1),
            "malignancy_spread": _fmt(s["malignancy_spread"], 0),
            "malignancy_ratings": s["malignancy_ratings"], "diameter_mm": _fmt(s["diameter_mm"]),
            "volume_mm3": _fmt(s["volume_mm3"], 1), "z_min_mm": _fmt(s["z_min_mm"]),
            "z_max_mm": _fmt(s["z_max_mm"]), "x_mm": _fmt(s["x_mm"]), "y_mm": _fmt(s["y_mm"]),
            "z_mm": _fmt(s["z_mm"]), "slice_first": first, "slice_last": last})
    return rows, nodule_rows
