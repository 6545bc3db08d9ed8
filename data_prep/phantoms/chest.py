"""Phantom chest CTs with lung nodules and LIDC-format XML of four disagreeing readers.

    python -m data_prep.phantoms.chest --out=DIR [--studies=24] [--seed=0]

Layout (as LIDC-IDRI is downloaded from TCIA: one folder per patient, DICOM files and the
reading XML side by side in the series folder)::

    DIR/LIDC-PHANTOM-0000/study/series/000001.dcm …  069.xml
    DIR/truth/nodules.csv     one row per truth nodule (and sub-3 mm nodule)
    DIR/truth/studies.csv     one row per study: series UID, slices, spacing, nodule count

Each study: a 128 × 128 axial CT (pixel 2.3–2.8 mm, slice spacing 1.25 / 2 / 2.5 mm, 200–260 mm
of chest): body, fat, two lungs (−850 HU), heart, spine, and lung vessels that run along z
(in one slice they look like nodules; in a slab they are tubes). 0–3 nodules of 5–30 mm
in the lungs: **smooth** (an ellipsoid) → benign, **lobulated** (overlapping spheres on a
core of 3/4 of the diameter) or **spiculated** (a core of 4/5 of the diameter with spikes)
→ malignant; 20–60 HU in −850 HU lung. Some studies have a 2.5 mm nodule. Nodules and
vessels are rendered with partial volume (each voxel the share of 3 × 3 × 3 sub-samples
inside), so a nodule smaller than a voxel is a faint blob, not a full pixel or nothing.

Readers (four reading sessions per XML): each outlines every nodule slice by slice (its
own outline: one reader draws one pixel wider, one a pixel tighter where it can), except
that one reader misses about one nodule in four; ratings are spread around the truth
(benign medians ≤ 2.5, malignant ≥ 3.5); two readers mark the 2.5 mm nodule as a single
point; each reader adds non-nodule marks of its own. ``truth/nodules.csv`` holds what the
parser must recover: reader count and the median of the ratings written. Even-numbered
studies use the ``http://www.nih.gov`` namespace, odd-numbered ones plain element names.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Sequence

import contourpy
import numpy as np
from scipy import ndimage

from data_prep.lidc import readxml
from data_prep.phantoms import dicom_files

SIZE = 128
SLICE_SPACINGS_MM = (1.25, 2.0, 2.5)
SHAPES = ("smooth", "lobulated", "spiculated")
MALIGNANT_SHAPES = ("lobulated", "spiculated")
NUM_READERS = 4
SMALL_DIAMETER_MM = 2.5
NODULE_COLUMNS = ("study", "nodule", "kind", "shape", "malignant", "diameter_mm", "x_mm",
                  "y_mm", "z_mm", "z_min_mm", "z_max_mm", "n_readers", "malignancy_median",
                  "ratings")
STUDY_COLUMNS = ("study", "series_uid", "study_uid", "n_slices", "slice_spacing_mm",
                 "pixel_spacing_mm", "n_nodules", "namespace")


class Shape:
    """A nodule as an inside-test on patient mm coordinates."""

    def __init__(self, rng, kind: str, centre, diameter_mm: float):
        self.kind, self.centre, self.d = kind, np.asarray(centre, float), diameter_mm
        r = diameter_mm / 2
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []     # (centre, semi-axes)
        self.spikes: list[tuple[np.ndarray, float, float]] = []  # (unit direction, length, radius)
        # ``diameter_mm`` is the nodule's solid extent, as a reader's outline measures it
        # (LIDC's diameter); lobes and spikes sit on a core of most of it. (A core of half
        # the diameter made a "10 mm" spiculated nodule 4 pixels on 2 slices at 2.6 mm
        # pixels: malignant labels on dots no reader would have outlined at that size.)
        if kind in ("smooth", "small"):
            self.parts.append((self.centre, r * rng.uniform(0.88, 1.12, 3)))
        elif kind == "lobulated":
            self.parts.append((self.centre, np.full(3, 0.75 * r)))
            for _ in range(int(rng.integers(4, 7))):
                u = rng.normal(size=3)
                u /= np.linalg.norm(u)
                self.parts.append((self.centre + u * 0.45 * r, np.full(3, rng.uniform(0.42, 0.55) * r)))
        else:  # spiculated
            self.parts.append((self.centre, np.full(3, 0.8 * r)))
            for _ in range(int(rng.integers(6, 11))):
                u = rng.normal(size=3)
                u[2] *= 0.6
                u /= np.linalg.norm(u)
                self.spikes.append((u, r * (0.3 + rng.uniform(0.9, 1.3)),
                                    max(0.9, 0.12 * diameter_mm)))

    def reach_mm(self) -> float:
        return self.d * 0.85

    def inside(self, x, y, z) -> np.ndarray:
        out = np.zeros(np.broadcast(x, y, z).shape, bool)
        for c, ax in self.parts:
            out |= ((x - c[0]) / ax[0]) ** 2 + ((y - c[1]) / ax[1]) ** 2 + ((z - c[2]) / ax[2]) ** 2 <= 1
        for u, length, rad in self.spikes:
            px, py, pz = x - self.centre[0], y - self.centre[1], z - self.centre[2]
            t = np.clip(px * u[0] + py * u[1] + pz * u[2], 0, length)
            dist2 = (px - t * u[0]) ** 2 + (py - t * u[1]) ** 2 + (pz - t * u[2]) ** 2
            # Spikes taper towards their tip.
            out |= dist2 <= (rad * (1 - 0.6 * t / length)) ** 2
        return out


def _ratings(rng, malignant: bool, n: int) -> list[int]:
    """n ratings spread around the truth, median ≤ 2.5 (benign) or ≥ 3.5 (malignant)."""
    values, p = ((3, 4, 5), (0.2, 0.45, 0.35)) if malignant else ((1, 2, 3), (0.35, 0.45, 0.2))
    while True:
        r = [int(v) for v in rng.choice(values, size=n, p=p)]
        med = float(np.median(r))
        if (med >= 3.5) if malignant else (med <= 2.5):
            return r


def _edge_maps(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines [N, 2] (column, row) of the pixels of each region of a 2D mask, in
    order along the boundary (contourpy traces it; each vertex goes to the inside pixel)."""
    padded = np.pad(mask.astype(np.float64), 1)
    lines = contourpy.contour_generator(z=padded).lines(0.5)
    outlines = []
    for line in lines:
        pts = []
        for x, y in np.asarray(line)[:, :2] - 1.0:
            best = None
            for cx in {math.floor(x), math.ceil(x)}:
                for cy in {math.floor(y), math.ceil(y)}:
                    if 0 <= cy < mask.shape[0] and 0 <= cx < mask.shape[1] and mask[cy, cx]:
                        d = (cx - x) ** 2 + (cy - y) ** 2
                        if best is None or d < best[0]:
                            best = (d, cx, cy)
            if best and (not pts or pts[-1] != (best[1], best[2])):
                pts.append((best[1], best[2]))
        if len(pts) > 1 and pts[0] == pts[-1]:
            pts.pop()
        if pts:
            outlines.append(np.asarray(pts, float))
    return outlines


def plan_study(seed: int, k: int) -> dict:
    """Geometry, anatomy and nodules of study k (pure: the same seed gives the same plan)."""
    rng = np.random.default_rng([seed, 70_000 + k])
    fov = float(rng.uniform(300, 360))
    pix = fov / SIZE
    dz = float(SLICE_SPACINGS_MM[k % len(SLICE_SPACINGS_MM)])
    length = float(rng.uniform(200, 260))
    n = int(round(length / dz)) + 1
    z = -length / 2 + np.arange(n) * dz                       # ascending (inferior → superior)
    xy = -fov / 2 + pix / 2 + np.arange(SIZE) * pix
    a, b = float(rng.uniform(120, 140)), float(rng.uniform(88, 105))
    lung_z = (z[0] + 0.06 * length, z[-1] - 0.04 * length)
    lungs = [((sx * 0.5 * a + rng.uniform(-4, 4), -0.05 * b), (0.36 * a, 0.72 * b)) for sx in (-1, 1)]
    vessels = []
    for (cx, cy), (rx, ry) in lungs:
        for _ in range(int(rng.integers(5, 9))):
            vessels.append((cx + rng.uniform(-0.5, 0.5) * rx, cy + rng.uniform(-0.5, 0.5) * ry,
                            rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15),
                            rng.uniform(1.2, 2.6)))
    plan = {"k": k, "fov": fov, "pix": pix, "dz": dz, "z": z, "xy": xy, "a": a, "b": b,
            "lung_z": lung_z, "lungs": lungs, "vessels": vessels, "nodules": [],
            "namespace": k % 2 == 0}

    def lung_point(margin: float):
        for _ in range(200):
            side = int(rng.integers(0, 2))
            (cx, cy), (rx, ry) = lungs[side]
            zz = rng.uniform(lung_z[0] + margin + 10, lung_z[1] - margin - 10)
            px, py = cx + rng.uniform(-1, 1) * rx, cy + rng.uniform(-1, 1) * ry
            if _in_lung(plan, px, py, zz, margin + 3):
                return np.array([px, py, zz])
        return None

    n_nod = int(rng.choice([0, 1, 2, 3], p=[0.15, 0.35, 0.3, 0.2]))
    placed: list[tuple[np.ndarray, float]] = []
    for j in range(n_nod):
        d = float(np.exp(rng.uniform(np.log(5), np.log(30))))
        shape = SHAPES[int(rng.integers(0, 3))] if j else SHAPES[k % 3]
        for _ in range(20):
            c = lung_point(d * 0.75)
            if c is not None and all(np.linalg.norm(c - p) > (d + q) * 0.8 + 12 for p, q in placed):
                break
        else:
            continue
        placed.append((c, d))
        malignant = shape in MALIGNANT_SHAPES
        missed = rng.uniform() < 0.25
        readers = [r for r in range(NUM_READERS)]
        if missed:
            readers.remove(int(rng.integers(0, NUM_READERS)))
        plan["nodules"].append({"shape": Shape(rng, shape, c, d), "kind": "nodule",
                                "malignant": malignant, "readers": readers,
                                "ratings": _ratings(rng, malignant, len(readers)),
                                "hu": float(rng.uniform(20, 60))})
    if rng.uniform() < 0.4:
        c = lung_point(3.0)
        if c is not None and all(np.linalg.norm(c - p) > q + 12 for p, q in placed):
            plan["nodules"].append({"shape": Shape(rng, "small", c, SMALL_DIAMETER_MM),
                                    "kind": "small", "malignant": False, "readers": [0, 1],
                                    "ratings": [], "hu": 40.0})
    plan["non_nodules"] = []
    for r in range(NUM_READERS):
        for _ in range(int(rng.integers(0, 3))):
            c = lung_point(2.0)
            if c is not None:
                plan["non_nodules"].append((r, c))
    plan["noise_hu"] = float(rng.uniform(8, 16))
    plan["seed"] = [seed, 71_000 + k]
    return plan


def _in_lung(plan, x, y, z, margin: float = 0.0):
    lo, hi = plan["lung_z"]
    zc, hz = (lo + hi) / 2, (hi - lo) / 2
    tz = np.clip(1 - ((z - zc) / hz) ** 2, 0, None)
    # Narrow apex: the cross-section shrinks faster towards the top.
    scale = np.sqrt(tz) * np.where(z > zc, 1 - 0.35 * (z - zc) / hz, 1.0)
    inside = np.zeros(np.broadcast(x, y, z).shape, bool)
    for (cx, cy), (rx, ry) in plan["lungs"]:
        ex, ey = np.maximum(rx * scale - margin, 1e-3), np.maximum(ry * scale - margin, 1e-3)
        inside |= (((x - cx) / ex) ** 2 + ((y - cy) / ey) ** 2 <= 1) & (scale * min(rx, ry) > margin)
    return inside


PARTIAL_VOLUME_SUBSAMPLES = 3     # per pixel side and per slice thickness


def _blend(plan, s, centre, half_mm: float, hu: float, where, inside, thickness: float):
    """Partial volume: within a box of ±half_mm around ``centre`` (x, y mm; z the slice's
    centre), each pixel of slice ``s`` becomes (1 − f)·itself + f·hu, f = the share of its
    sub-samples (3 × 3 in plane, 3 across ``thickness``) that ``inside`` holds — as a CT
    averages over a voxel. Without it a 5 mm nodule at 2.6 mm pixels came out as 1–3 full
    pixels or none, by where the pixel centres fell; ``where`` (a mask) limits the blend."""
    n, pix, xy = PARTIAL_VOLUME_SUBSAMPLES, plan["pix"], plan["xy"]
    lo = [int(np.clip(np.floor((c - half_mm - xy[0]) / pix), 0, SIZE)) for c in centre[:2]]
    hi = [int(np.clip(np.ceil((c + half_mm - xy[0]) / pix) + 1, 0, SIZE)) for c in centre[:2]]
    if lo[0] >= hi[0] or lo[1] >= hi[1]:
        return
    offsets = (np.arange(n) + 0.5) / n - 0.5
    sx = (xy[lo[0]:hi[0], None] + offsets[None] * pix).reshape(-1)
    sy = (xy[lo[1]:hi[1], None] + offsets[None] * pix).reshape(-1)
    zs = centre[2] + offsets * thickness if thickness > 0 else np.array([centre[2]])
    Xs, Ys = np.meshgrid(sx, sy, indexing="xy")                  # [row sub, col sub]
    f = np.mean([inside(Xs, Ys, z) for z in zs], axis=0)
    f = f.reshape(hi[1] - lo[1], n, hi[0] - lo[0], n).mean(axis=(1, 3)).astype(np.float32)
    if where is not None:
        f = f * where[lo[1]:hi[1], lo[0]:hi[0]]
    box = s[lo[1]:hi[1], lo[0]:hi[0]]
    box += f * (hu - box)


def render(plan) -> np.ndarray:
    """HU volume [n_slices, rows, cols] (slices ascending in z) of a planned study."""
    rng = np.random.default_rng(plan["seed"])
    z, xy = plan["z"], plan["xy"]
    X, Y = np.meshgrid(xy, xy, indexing="xy")                      # [row, col]
    a, b = plan["a"], plan["b"]
    body = (X / a) ** 2 + (Y / b) ** 2 <= 1
    inner = (X / (a - 12)) ** 2 + (Y / (b - 12)) ** 2 <= 1
    spine = X ** 2 + (Y - 0.72 * b) ** 2 <= 16 ** 2
    vol = np.empty((len(z), SIZE, SIZE), np.float32)
    zc = (plan["lung_z"][0] + plan["lung_z"][1]) / 2
    for i, zz in enumerate(z):
        s = np.full((SIZE, SIZE), -1000.0, np.float32)
        s[body] = -100.0
        s[inner] = 40.0
        s[_in_lung(plan, X, Y, zz)] = -850.0
        heart = ((X - 0.12 * a) / (0.3 * a)) ** 2 + ((Y + 0.1 * b) / (0.45 * b)) ** 2 + \
            ((zz - (zc - 0.25 * (plan["lung_z"][1] - zc))) / 55.0) ** 2 <= 1
        s[heart] = 45.0
        s[spine] = 600.0
        lung_now = _in_lung(plan, X, Y, zz)
        for vx, vy, gx, gy, rad in plan["vessels"]:
            cx, cy = vx + gx * (zz - zc), vy + gy * (zz - zc)
            _blend(plan, s, (cx, cy, zz), rad + plan["pix"], 30.0, lung_now,
                   lambda x, y, z, cx=cx, cy=cy, rad=rad: (x - cx) ** 2 + (y - cy) ** 2 <= rad ** 2,
                   thickness=0.0)
        for nod in plan["nodules"]:
            sh = nod["shape"]
            if abs(zz - sh.centre[2]) <= sh.reach_mm() + plan["dz"] / 2:
                _blend(plan, s, (sh.centre[0], sh.centre[1], zz), sh.reach_mm() + plan["pix"],
                       nod["hu"], None, sh.inside, thickness=plan["dz"])
        vol[i] = s
    vol += rng.normal(0, plan["noise_hu"], vol.shape).astype(np.float32)
    return vol


def _nodule_masks(plan, nod) -> dict[int, np.ndarray]:
    """Slice index → in-plane mask of a nodule (at the DICOM pixel centres)."""
    X, Y = np.meshgrid(plan["xy"], plan["xy"], indexing="xy")
    sh, out = nod["shape"], {}
    for i, zz in enumerate(plan["z"]):
        if abs(zz - sh.centre[2]) <= sh.reach_mm():
            m = sh.inside(X, Y, zz)
            if m.any():
                out[i] = ndimage.binary_fill_holes(m)
    if not out:  # smaller than a voxel: the pixel at its centre, on its nearest slice
        i = int(np.argmin(np.abs(plan["z"] - sh.centre[2])))
        m = np.zeros((SIZE, SIZE), bool)
        m[_pixel(plan, sh.centre[1]), _pixel(plan, sh.centre[0])] = True
        out[i] = m
    return out


def _pixel(plan, mm: float) -> int:
    return int(np.clip(round((mm - plan["xy"][0]) / plan["pix"]), 0, SIZE - 1))


def write_study(out: str, seed: int, k: int) -> tuple[dict, list[dict]]:
    """Writes study k's DICOM series and XML; returns its studies.csv and nodules.csv rows."""
    plan = plan_study(seed, k)
    hu = render(plan)
    name = f"LIDC-PHANTOM-{k:04d}"
    folder = os.path.join(out, name, "01-01-2000-phantom-chest", "3000000-phantom-ct")
    os.makedirs(folder, exist_ok=True)
    study_uid = dicom_files.uid(seed, k, "lidc-study")
    series_uid = dicom_files.uid(seed, k, "lidc-series")
    sops = [dicom_files.uid(seed, k, i, "lidc-sop") for i in range(len(plan["z"]))]

    ds = dicom_files.template("CT_small.dcm")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID = name, name
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = dicom_files.uid(seed, k, "lidc-for")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20000101"
    ds.StudyDescription, ds.SeriesDescription = "CHEST", "LUNG 2.5"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesNumber = 3000
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PixelSpacing = [dicom_files.ds_number(plan["pix"])] * 2
    ds.SliceThickness = dicom_files.ds_number(plan["dz"])
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "-600", "1500"
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    if "PixelPaddingValue" in ds:
        del ds.PixelPaddingValue
    stored = np.clip(np.round(hu) + 1024, 0, 4095).astype(np.uint16)
    x0 = plan["xy"][0]
    # Instance numbers run head to feet, as many chest CTs are acquired.
    for inst, i in enumerate(range(len(plan["z"]) - 1, -1, -1), start=1):
        dicom_files.set_file_meta(ds, ds.SOPClassUID, sops[i])
        ds.InstanceNumber = inst
        ds.ImagePositionPatient = [dicom_files.ds_number(x0), dicom_files.ds_number(x0),
                                   dicom_files.ds_number(plan["z"][i])]
        ds.SliceLocation = dicom_files.ds_number(plan["z"][i])
        ds.PixelData = dicom_files.pixel_bytes(stored[i])
        ds.save_as(os.path.join(folder, f"{inst:06d}.dcm"), enforce_file_format=True)

    sessions: list[list[dict]] = [[] for _ in range(NUM_READERS)]
    truth_rows = []
    for j, nod in enumerate(plan["nodules"]):
        masks = _nodule_masks(plan, nod)
        sh = nod["shape"]
        zs = [plan["z"][i] for i in masks]
        ratings = iter(nod["ratings"])
        for r in nod["readers"]:
            if nod["kind"] == "small":
                sessions[r].append({"kind": readxml.SMALL, "id": f"small-{j}-{r}", "roi": (
                    plan["z"][next(iter(masks))], sops[next(iter(masks))],
                    (_pixel(plan, sh.centre[0]), _pixel(plan, sh.centre[1])))})
                continue
            rois = []
            for i, m in sorted(masks.items()):
                if r == 1:
                    m = ndimage.binary_dilation(m)
                elif r == 3 and ndimage.binary_erosion(m).sum() >= 4:
                    m = ndimage.binary_erosion(m)
                for outline in _edge_maps(m):
                    rois.append((plan["z"][i], sops[i], True, outline))
            sessions[r].append({"kind": readxml.NODULE, "id": f"Nodule {j + 1:03d}",
                                "malignancy": next(ratings), "rois": rois})
        truth_rows.append({
            "study": name, "nodule": j, "kind": nod["kind"], "shape": sh.kind,
            "malignant": int(nod["malignant"]), "diameter_mm": f"{sh.d:.2f}",
            "x_mm": f"{sh.centre[0]:.2f}", "y_mm": f"{sh.centre[1]:.2f}",
            "z_mm": f"{sh.centre[2]:.2f}", "z_min_mm": f"{min(zs):.2f}",
            "z_max_mm": f"{max(zs):.2f}", "n_readers": len(nod["readers"]),
            "malignancy_median": (f"{np.median(nod['ratings']):g}" if nod["ratings"] else ""),
            "ratings": ";".join(str(v) for v in sorted(nod["ratings"]))})
    for q, (r, c) in enumerate(plan["non_nodules"]):
        i = int(np.argmin(np.abs(plan["z"] - c[2])))
        sessions[r].append({"kind": readxml.NON_NODULE, "id": f"Non-nodule {q + 1:03d}",
                            "z_mm": plan["z"][i], "sop_uid": sops[i],
                            "xy": (_pixel(plan, c[0]), _pixel(plan, c[1]))})
    readxml.write(os.path.join(folder, f"{69 + k % 30:03d}.xml"), series_uid, study_uid,
                  sessions, namespace=plan["namespace"])
    study_row = {"study": name, "series_uid": series_uid, "study_uid": study_uid,
                 "n_slices": len(plan["z"]), "slice_spacing_mm": f"{plan['dz']:g}",
                 "pixel_spacing_mm": f"{plan['pix']:.4f}",
                 "n_nodules": sum(1 for n in plan["nodules"] if n["kind"] == "nodule"),
                 "namespace": int(plan["namespace"])}
    return study_row, truth_rows


def _write_csv(path: str, columns: Sequence[str], rows: Sequence[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


def generate(out: str, studies: int = 24, seed: int = 0) -> dict:
    """Writes ``studies`` phantom chest CTs with their XML and the truth files."""
    os.makedirs(os.path.join(out, "truth"), exist_ok=True)
    study_rows, nodule_rows = [], []
    for k in range(studies):
        s, n = write_study(out, seed, k)
        study_rows.append(s)
        nodule_rows += n
    _write_csv(os.path.join(out, "truth", "studies.csv"), STUDY_COLUMNS, study_rows)
    _write_csv(os.path.join(out, "truth", "nodules.csv"), NODULE_COLUMNS, nodule_rows)
    return {"studies": studies,
            "nodules": sum(1 for r in nodule_rows if r["kind"] == "nodule"),
            "small_nodules": sum(1 for r in nodule_rows if r["kind"] == "small"),
            "malignant": sum(int(r["malignant"]) for r in nodule_rows)}


if __name__ == "__main__":
    import json

    from absl import app, flags

    flags.DEFINE_string("out", None, "Output folder.", required=True)
    flags.DEFINE_integer("studies", 24, "Number of phantom chest CTs.")
    flags.DEFINE_integer("seed", 0, "Seed; the same seed gives identical files.")

    def _main(argv):
        del argv
        print(json.dumps(generate(flags.FLAGS.out, flags.FLAGS.studies, flags.FLAGS.seed)))

    app.run(_main)
