"""RECIST measurements mined from an archive's presentation states and structured reports.

    python -m data_prep.lesions --dicom_root=DIR --index=INDEX --out=OUT [--dataset_out=DS]

Reads the index's files.csv (data_prep.index): the files it found to be no image are
opened; Grayscale Softcopy Presentation States (GSPS) and SR documents (Basic, Enhanced,
Comprehensive, Comprehensive 3D) are the annotation objects. From them:

- GSPS: every graphic object (POLYLINE, ELLIPSE, CIRCLE, POINT, …) and text object of
  every graphic annotation, on the images the annotation references (pydicom: highdicom
  writes presentation states but has no reader for them);
- SR (Enhanced, Comprehensive, Comprehensive 3D): every TID 1410 planar ROI measurement group of the TID 1500 measurement report
  (highdicom's ``MeasurementReport``), its SCOORD region, its source image and finding site.

Two-point POLYLINEs in pixel units are line measurements. On each image of each object,
lines pair up into a RECIST measurement (long axis + short axis) when they are within
``perpendicular_tol_deg`` of perpendicular and cross (configs/lesions.py); the longest
lines pair first, each with the most perpendicular crossing partner. Everything else is
accounted for with a reason: ``arrow`` (text with a visible anchor), ``text``,
``ellipse``, ``circle``, ``point``, ``polyline`` (more than two points), ``single_line``,
``non_perpendicular_pair`` (crossing lines too far from 90°), ``display_units``,
``unresolved_reference`` (the image is not in the index), ``basic_text_sr`` (a Basic Text
SR, which cannot hold coordinates), ``no_measurement_report``, ``no_region``, ``unreadable``.

Outputs (no names, IDs, dates or raw UIDs; keys are keyed hashes with the index's salt):

    OUT/lesions.csv       one row per RECIST measurement, DeepLesion's DL_info.csv columns
                          with keys in place of patient/study/series numbers (LESION_COLUMNS)
    OUT/annotations.csv   one row per annotation object item: status lesion | not_lesion |
                          error, reason, the lesion it became
    OUT/summary.json      counts by status and reason
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from typing import Callable, Iterable

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from radnet.data import deeplesion as dl
from radnet.detection.boxes import recist_box
from radnet.dicom import geometry
from radnet.dicom.headers import keyed_hash

GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
# SR SOP classes highdicom reads (Enhanced, Comprehensive, Comprehensive 3D)
SR_READERS = {"1.2.840.10008.5.1.4.1.1.88.22": hd.sr.EnhancedSR,
              "1.2.840.10008.5.1.4.1.1.88.33": hd.sr.ComprehensiveSR,
              "1.2.840.10008.5.1.4.1.1.88.34": hd.sr.Comprehensive3DSR}
SR_CLASSES = set(SR_READERS)
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
LESION_COLUMNS = (
    "Lesion_key", "Patient_key", "Study_key", "Series_key", "Key_slice_index",
    "Measurement_coordinates", "Bounding_boxes", "Lesion_diameters_Pixel_",
    "Lesion_diameters_mm", "Normalized_lesion_location", "Coarse_lesion_type",
    "Possibly_noisy", "Slice_range", "Spacing_mm_px_", "Image_size", "DICOM_windows",
    "Train_Val_Test", "Source", "Noisy_reason")
ANNOTATION_COLUMNS = ("annotation_key", "object_path", "source", "item", "graphic",
                      "status", "reason", "lesion_key", "series_key", "key_slice_index")
# SR finding sites → DeepLesion coarse lesion types
SITE_TYPES = {codes.SCT.Bone.value: 1, codes.SCT.Liver.value: 4, codes.SCT.Lung.value: 5,
              codes.SCT.Kidney.value: 6, codes.SCT.LymphNode.value: 3,
              codes.SCT.SoftTissue.value: 7, codes.SCT.Mediastinum.value: 3,
              codes.SCT.Abdomen.value: 2, codes.SCT.Pelvis.value: 8}
SPLIT_NUMBERS = {name: code for code, name in dl.SPLIT_CODES.items()}


class InputError(ValueError):
    """A mistake in the command's input: one line, exit status 2."""


# ----------------------------------------------------------------------------- reading

def _item(object_path, source, item, graphic, ref_uid, points=None, units="PIXEL",
          site_type=-1):
    return {"object_path": object_path, "source": source, "item": item, "graphic": graphic,
            "ref_uid": ref_uid, "points": points, "units": units, "site_type": site_type}


def read_gsps(ds: pydicom.Dataset, object_path: str) -> list[dict]:
    """Annotation items of a presentation state, one per (graphic/text object, image)."""
    items = []
    n = 0
    for ann in ds.get("GraphicAnnotationSequence", []):
        refs = [r.ReferencedSOPInstanceUID for r in ann.get("ReferencedImageSequence", [])]
        if not refs:  # "all images of the presentation state"
            refs = [i.ReferencedSOPInstanceUID for s in ds.get("ReferencedSeriesSequence", [])
                    for i in s.get("ReferencedImageSequence", [])]
        for obj in ann.get("GraphicObjectSequence", []):
            pts = np.asarray(obj.GraphicData, np.float64).reshape(-1, 2)
            kind = str(obj.GraphicType)
            for ref in refs:
                items.append(_item(object_path, "gsps", n, kind, ref, pts,
                                   str(obj.get("GraphicAnnotationUnits", "PIXEL"))))
            n += 1
        for obj in ann.get("TextObjectSequence", []):
            visible = str(obj.get("AnchorPointVisibility", "N")) == "Y"
            has_anchor = "AnchorPoint" in obj
            kind = "ARROW" if (visible and has_anchor) else "TEXT"
            for ref in refs:
                items.append(_item(object_path, "gsps", n, kind, ref))
            n += 1
    return items


def read_sr(ds: pydicom.Dataset, object_path: str) -> list[dict]:
    """Annotation items of an SR document: one per planar ROI measurement group."""
    items = []
    try:
        sr = SR_READERS[str(ds.SOPClassUID)].from_dataset(ds, copy=False)
        report = hd.sr.MeasurementReport.from_sequence([sr])
    except (ValueError, AttributeError, KeyError):
        return [_item(object_path, "sr", 0, "NO_MEASUREMENT_REPORT", "")]
    for n, group in enumerate(report.get_planar_roi_measurement_groups()):
        roi = group.roi
        if roi is None:
            items.append(_item(object_path, "sr", n, "NO_REGION", ""))
            continue
        ref = ""
        for child in roi.get("ContentSequence", []):
            for sop in child.get("ReferencedSOPSequence", []):
                ref = sop.ReferencedSOPInstanceUID
        site = -1
        for fs in group.finding_sites:
            site = SITE_TYPES.get(fs.value.value, site)
        items.append(_item(object_path, "sr", n, str(roi.GraphicType), ref,
                           np.asarray(roi.GraphicData, np.float64).reshape(-1, 2),
                           site_type=site))
    return items


def read_object(path: str, rel: str) -> list[dict] | None:
    """Items of one annotation object; None for a file that is none."""
    ds = pydicom.dcmread(path, force=True)
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class == GSPS_CLASS:
        return read_gsps(ds, rel)
    if sop_class in SR_CLASSES:
        return read_sr(ds, rel)
    return None


# ----------------------------------------------------------------------------- pairing

def _segment(points):
    return np.asarray(points[0], float), np.asarray(points[1], float)


def pair_check(long_pts, short_pts, cfg) -> tuple[bool, bool, str]:
    """(crosses, perpendicular within tolerance, noisy reason) of two line segments."""
    p, p2 = _segment(long_pts)
    q, q2 = _segment(short_pts)
    r, s = p2 - p, q2 - q
    len_r, len_s = float(np.hypot(*r)), float(np.hypot(*s))
    if len_r == 0 or len_s == 0:
        return False, False, ""
    cos = abs(float(np.dot(r, s))) / (len_r * len_s)
    angle_off = 90.0 - math.degrees(math.acos(min(cos, 1.0)))
    denom = r[0] * s[1] - r[1] * s[0]
    if abs(denom) < 1e-9:
        return False, False, ""
    qp = q - p
    t = (qp[0] * s[1] - qp[1] * s[0]) / denom
    u = (qp[0] * r[1] - qp[1] * r[0]) / denom
    m = float(cfg.crossing_margin)
    crosses = -m <= t <= 1 + m and -m <= u <= 1 + m
    perpendicular = angle_off <= float(cfg.perpendicular_tol_deg)
    noisy = []
    if angle_off > float(cfg.noisy_angle_deg):
        noisy.append(f"angle_off_{angle_off:.0f}deg")
    nm = float(cfg.noisy_crossing_margin)
    if not (nm <= t <= 1 - nm and nm <= u <= 1 - nm):
        noisy.append("crossing_near_end")
    return crosses, perpendicular, ";".join(noisy)


def pair_lines(lines: list[dict], cfg) -> tuple[list[tuple[dict, dict, str]], dict[int, str]]:
    """RECIST pairs ``(long, short, noisy reason)`` among the lines of one image of one
    object, and a reason for every line left over (keyed by position in ``lines``)."""
    order = sorted(range(len(lines)), key=lambda i: -_length(lines[i]["points"]))
    used: set[int] = set()
    pairs, leftover = [], {}
    crossing_non_perp: set[int] = set()
    for i in order:
        if i in used:
            continue
        best, best_off = None, None
        for j in order:
            if j == i or j in used:
                continue
            li, lj = _length(lines[i]["points"]), _length(lines[j]["points"])
            if lj > li * float(cfg.short_over_long_max) + 1e-9:
                continue
            crosses, perp, noisy = pair_check(lines[i]["points"], lines[j]["points"], cfg)
            if crosses and not perp:
                crossing_non_perp |= {i, j}
            if crosses and perp:
                off = _angle_off(lines[i]["points"], lines[j]["points"])
                if best is None or off < best_off:
                    best, best_off, best_noisy = j, off, noisy
        if best is not None:
            used |= {i, best}
            pairs.append((lines[i], lines[best], best_noisy))
    for i in range(len(lines)):
        if i not in used:
            leftover[i] = "non_perpendicular_pair" if i in crossing_non_perp else "single_line"
    return pairs, leftover


def _length(pts) -> float:
    a, b = _segment(pts)
    return float(np.hypot(*(b - a)))


def _angle_off(a_pts, b_pts) -> float:
    a0, a1 = _segment(a_pts)
    b0, b1 = _segment(b_pts)
    r, s = a1 - a0, b1 - b0
    cos = abs(float(np.dot(r, s))) / (np.hypot(*r) * np.hypot(*s))
    return 90.0 - math.degrees(math.acos(min(cos, 1.0)))


# ----------------------------------------------------------------------------- the archive

def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


HEADER_TAGS = ["SOPInstanceUID", "SeriesInstanceUID", "ImagePositionPatient",
               "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "WindowCenter",
               "WindowWidth", "SOPClassUID"]


def _header(path):
    return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS, force=True)


def _first(value):
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return float(value[0]) if len(value) else None
    return float(value)


class Archive:
    """The index's view of the archive, with the image headers of referenced series read
    on demand: SOP Instance UID → (series key, geometric slice index)."""

    def __init__(self, dicom_root: str, index: str):
        self.root = dicom_root
        files = _read_csv(os.path.join(index, "files.csv"))
        series = {r["series_key"]: r for r in _read_csv(os.path.join(index, "series.csv"))}
        self.series_rows = series
        self.objects = [r["path"] for r in files if r["reason"] == "not_image"]
        self.by_series: dict[str, list[str]] = defaultdict(list)
        for r in files:
            if r["series_key"] and r["reason"] != "not_image":
                self.by_series[r["series_key"]].append(r["path"])
        self._uid_of_series: dict[str, str] = {}
        self.slices: dict[str, dict] = {}   # SOP UID → slice record
        self.series_slices: dict[str, list[dict]] = {}

    def series_uid(self, key: str) -> str:
        if key not in self._uid_of_series:
            paths = self.by_series[key]
            self._uid_of_series[key] = str(
                _header(os.path.join(self.root, paths[0])).get("SeriesInstanceUID", ""))
        return self._uid_of_series[key]

    def load_series_for(self, wanted_series_uids: set[str] | None) -> None:
        """Reads the headers of every series with one of ``wanted_series_uids`` (None: all)."""
        for key, paths in self.by_series.items():
            if key in self.series_slices:
                continue
            if wanted_series_uids is not None and self.series_uid(key) not in wanted_series_uids:
                continue
            recs = []
            for rel in paths:
                h = _header(os.path.join(self.root, rel))
                ipp, iop = h.get("ImagePositionPatient"), h.get("ImageOrientationPatient")
                recs.append({"path": rel, "uid": str(h.get("SOPInstanceUID", "")),
                             "series_key": key, "ipp": [float(v) for v in ipp] if ipp else None,
                             "iop": [float(v) for v in iop] if iop else None,
                             "spacing": [float(v) for v in h.get("PixelSpacing", [0, 0])],
                             "rows": int(h.get("Rows", 0)), "cols": int(h.get("Columns", 0)),
                             "window": (_first(h.get("WindowCenter")),
                                        _first(h.get("WindowWidth")))})
            located = [r for r in recs if r["ipp"] and r["iop"]]
            if located:
                z = geometry.positions_along_normal([r["ipp"] for r in located],
                                                    located[0]["iop"])
                located = [r for _, r in sorted(zip(z, located), key=lambda t: t[0])]
            for i, r in enumerate(located):
                r["slice_index"] = i
                r["num_slices"] = len(located)
                self.slices[r["uid"]] = r
            self.series_slices[key] = located


def mine(dicom_root: str, index: str, out: str, cfg, secret: bytes,
         progress: Callable[[Iterable], Iterable] = lambda it: it,
         return_archive: bool = False):
    """Mines every annotation object the index lists; writes OUT/lesions.csv,
    OUT/annotations.csv, OUT/summary.json; returns the summary (and the Archive, whose
    series headers the dataset build reuses, with ``return_archive``)."""
    for path, what in ((dicom_root, "--dicom_root"), (index, "--index")):
        if not os.path.isdir(path):
            raise InputError(f"{what}={path} is not a folder")
    if not os.path.isfile(os.path.join(index, "files.csv")):
        raise InputError(f"{index}/files.csv is missing; run python -m data_prep.index first")
    archive = Archive(dicom_root, index)
    annotation_rows, items_all, unreadable = [], [], []
    wanted: set[str] = set()
    read_all = False
    for rel in progress(archive.objects):
        try:
            ds = pydicom.dcmread(os.path.join(dicom_root, rel), force=True)
            sop_class = str(ds.get("SOPClassUID", ""))
            if sop_class == GSPS_CLASS:
                items = read_gsps(ds, rel)
                wanted |= {str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", [])}
            elif sop_class in SR_CLASSES:
                items = read_sr(ds, rel)
                evidence = [s.SeriesInstanceUID
                            for seq in ("CurrentRequestedProcedureEvidenceSequence",
                                        "PertinentOtherEvidenceSequence")
                            for st in ds.get(seq, [])
                            for s in st.get("ReferencedSeriesSequence", [])]
                wanted |= {str(s) for s in evidence}
                read_all |= not evidence
            elif sop_class == BASIC_TEXT_SR:  # no spatial coordinates possible
                items = [_item(rel, "sr", 0, "BASIC_TEXT_SR", "")]
            else:
                continue
        except Exception as e:  # noqa: BLE001  (a broken object is recorded, the run goes on)
            unreadable.append({"object_path": rel, "source": "", "item": 0, "graphic": "",
                               "status": "error", "reason": f"unreadable:{type(e).__name__}"})
            continue
        items_all.extend(items)
    archive.load_series_for(None if read_all else wanted)

    lesions = []
    by_image: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for it in items_all:
        key = keyed_hash(secret, "annotation", f"{it['object_path']}|{it['item']}|{it['ref_uid']}")
        row = {"annotation_key": key, "object_path": it["object_path"], "source": it["source"],
               "item": it["item"], "graphic": it["graphic"]}
        it["row"] = row
        annotation_rows.append(row)
        if it["graphic"] in ("BASIC_TEXT_SR", "NO_MEASUREMENT_REPORT", "NO_REGION"):
            row.update(status="not_lesion", reason=it["graphic"].lower())
            continue
        sl = archive.slices.get(it["ref_uid"])
        if sl is None:
            row.update(status="error", reason="unresolved_reference")
            continue
        row.update(series_key=sl["series_key"], key_slice_index=sl["slice_index"])
        g = it["graphic"]
        if it["units"] != "PIXEL":
            row.update(status="not_lesion", reason="display_units")
        elif g == "POLYLINE" and len(it["points"]) == 2:
            by_image[(it["object_path"], it["ref_uid"])].append(it)
        else:
            reason = {"POLYLINE": "polyline", "ARROW": "arrow", "TEXT": "text",
                      "ELLIPSE": "ellipse", "CIRCLE": "circle", "POINT": "point",
                      "MULTIPOINT": "point", "INTERPOLATED": "polyline",
                      "POLYGON": "polyline"}.get(g, g.lower() or "no_region")
            row.update(status="not_lesion", reason=reason)
    for (obj, ref_uid), lines in by_image.items():
        sl = archive.slices[ref_uid]
        pairs, leftover = pair_lines(lines, cfg)
        for i, reason in leftover.items():
            lines[i]["row"].update(status="not_lesion", reason=reason)
        for long_it, short_it, noisy in pairs:
            lesion = _lesion_row(archive, sl, long_it, short_it, noisy, cfg, secret)
            lesions.append(lesion)
            for it in (long_it, short_it):
                it["row"].update(status="lesion", reason="", lesion_key=lesion["Lesion_key"])
    annotation_rows.extend(unreadable)
    lesions.sort(key=lambda r: (r["Series_key"], int(r["Key_slice_index"]), r["Lesion_key"]))
    os.makedirs(out, exist_ok=True)
    for name, columns, rows in (("lesions.csv", LESION_COLUMNS, lesions),
                                ("annotations.csv", ANNOTATION_COLUMNS, annotation_rows)):
        with open(os.path.join(out, name), "w", newline="") as f:
            w = csv.DictWriter(f, columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    reasons = defaultdict(int)
    for r in annotation_rows:
        reasons[r["reason"] or r["status"]] += 1
    summary = {"not_image_files": len(archive.objects),
               "annotation_objects": len({r["object_path"] for r in annotation_rows}),
               "annotation_items": len(annotation_rows),
               "lesions": len(lesions),
               "possibly_noisy": sum(int(r["Possibly_noisy"]) for r in lesions),
               "items_by_reason": dict(sorted(reasons.items()))}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return (summary, archive) if return_archive else summary


def _fmt(values, digits=4):
    return ", ".join(f"{v:.{digits}f}" for v in values)


def _lesion_row(archive: Archive, sl: dict, long_it: dict, short_it: dict, noisy: str, cfg,
                secret: bytes) -> dict:
    pts = np.concatenate([long_it["points"], short_it["points"]])
    box = recist_box(pts, float(cfg.box_dilate_px), (sl["rows"], sl["cols"]))
    spacing = sl["spacing"]
    long_px, short_px = _length(long_it["points"]), _length(short_it["points"])
    series = archive.series_rows.get(sl["series_key"], {})
    n = sl["num_slices"]
    centre = pts.mean(axis=0)
    wc, ww = sl["window"]
    slice_mm = ""
    located = archive.series_slices[sl["series_key"]]
    if len(located) > 1:
        z = geometry.positions_along_normal([r["ipp"] for r in located], located[0]["iop"])
        slice_mm = f"{abs(z[-1] - z[0]) / (len(z) - 1):.4g}"
    site = max(long_it["site_type"], short_it["site_type"])
    key = keyed_hash(secret, "lesion",
                     f"{long_it['object_path']}|{long_it['item']}|{short_it['item']}|"
                     f"{long_it['ref_uid']}")
    return {
        "Lesion_key": key, "Patient_key": series.get("patient_key", ""),
        "Study_key": series.get("study_key", ""), "Series_key": sl["series_key"],
        "Key_slice_index": sl["slice_index"],
        "Measurement_coordinates": _fmt(pts.reshape(-1)),
        "Bounding_boxes": _fmt(box),
        "Lesion_diameters_Pixel_": _fmt([long_px, short_px]),
        "Lesion_diameters_mm": _fmt([long_px * spacing[0], short_px * spacing[0]], 3),
        "Normalized_lesion_location": _fmt([centre[0] / max(sl["cols"], 1),
                                            centre[1] / max(sl["rows"], 1),
                                            sl["slice_index"] / max(n - 1, 1)]),
        "Coarse_lesion_type": site,
        "Possibly_noisy": int(bool(noisy)), "Noisy_reason": noisy,
        "Slice_range": f"0, {n - 1}",
        "Spacing_mm_px_": f"{spacing[0]:g}, {spacing[1]:g}, {slice_mm}",
        "Image_size": f"{sl['rows']}, {sl['cols']}",
        "DICOM_windows": (f"{wc - ww / 2:g}, {wc + ww / 2:g}" if wc is not None and ww
                          else ""),
        "Train_Val_Test": SPLIT_NUMBERS.get(series.get("split", ""), ""),
        "Source": long_it["source"],
    }
