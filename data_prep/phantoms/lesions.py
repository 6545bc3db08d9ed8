"""Phantom CT studies with lesions and radiologists' measurements, with truth files.

    python -m data_prep.phantoms --out=DIR --lesion_studies=12      # DIR/dicom/LESIONS/…

Each study is one axial CT series (``rows × rows`` pixels of ``pixel_mm``, 5 mm slices,
written in a shuffled file order with instance numbers running head → feet, so only the
geometry orders it) of a simple abdomen/chest: body, subcutaneous fat, liver, lungs,
kidneys, spine. Lesions of known size and type (LESION_KINDS: liver, lung, kidney, lymph
node, bone, soft tissue) are rendered into the pixels as ellipsoids with partial-volume
edges. Each lesion is measured on its key slice (the slice through its centre) the way a
radiologist bookmarks it: a long axis along the lesion's largest in-plane diameter and a
perpendicular short axis crossing it, drawn either as two POLYLINE graphic objects in a
Grayscale Softcopy Presentation State (GSPS) or as two TID 1410 measurement groups with
SCOORD POLYLINE regions in a Comprehensive 3D SR (TID 1500 measurement report), both
written with highdicom. Distractors go in the same objects: arrows (text with a visible
anchor), free text, single lines, ellipses, non-perpendicular crossing pairs, and
measurements that reference an image not in the archive.

Truth (``lesion_truth.csv``, one row per annotation object, i.e. every graphic or text
object, SR measurement group, or RECIST pair):
    study, kind (recist | arrow | text | single_line | ellipse | non_perpendicular |
    unresolved_reference), source (gsps | sr), object_file (path under dicom_root), image_file
    (the referenced image's path, '' when unresolved), key_slice_index (geometric order,
    ascending z), x1 y1 x2 y2 (the DeepLesion box of the measurement as drawn: the box of
    its four end points dilated by 5 px, clipped), long_mm, short_mm (the lesion's true
    diameters; the drawn end points are off by up to 0.25 px, a radiologist's hand),
    lesion_type, tracking_id
The identities are synthetic (``LESION-0001``); nothing here is a real person.
"""

from __future__ import annotations

import copy
import csv
import math
import os
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
import pydicom
import scipy.ndimage
from pydicom.sr.codedict import codes

from data_prep.phantoms import dicom_files
from radnet.detection.boxes import recist_box

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
BOX_DILATE_PX = 5.0
TRUTH_COLUMNS = ("study", "kind", "source", "object_file", "image_file", "key_slice_index",
                 "x1", "y1", "x2", "y2", "long_mm", "short_mm", "lesion_type", "tracking_id")
# kind → (organ, lesion HU, long-axis range mm, short/long ratio range, DeepLesion coarse type)
LESION_KINDS = {
    "liver": ("liver", 15.0, (12.0, 35.0), (0.6, 0.9), 4),
    "lung": ("lung", 30.0, (10.0, 25.0), (0.6, 0.95), 5),
    "kidney": ("kidney", 5.0, (10.0, 16.0), (0.6, 0.9), 6),
    "lymph_node": ("fat", 45.0, (10.0, 20.0), (0.5, 0.8), 3),
    "bone": ("bone", 60.0, (8.0, 12.0), (0.7, 0.95), 1),
    "soft_tissue": ("fat", 80.0, (14.0, 28.0), (0.6, 0.9), 7),
}
DISTRACTORS = ("arrow", "text", "single_line", "ellipse", "non_perpendicular",
               "unresolved_reference", "sr_ellipse", "sr_single_line")


@dataclass
class Lesion:
    kind: str
    centre_xy: tuple[float, float]    # pixels (column, row) on the key slice
    key_slice: int                    # geometric index
    long_px: float
    short_px: float
    angle_rad: float
    depth_slices: float               # semi-axis along z, in slices

    def endpoints(self) -> tuple[np.ndarray, np.ndarray]:
        """(long axis [2, 2], short axis [2, 2]) end points as (x, y) pixels."""
        c = np.asarray(self.centre_xy)
        u = np.array([math.cos(self.angle_rad), math.sin(self.angle_rad)])
        v = np.array([-u[1], u[0]])
        return (np.stack([c - u * self.long_px / 2, c + u * self.long_px / 2]),
                np.stack([c - v * self.short_px / 2, c + v * self.short_px / 2]))


@dataclass
class StudyPlan:
    index: int
    rows: int
    num_slices: int
    pixel_mm: float
    slice_mm: float
    lesions: list[Lesion] = field(default_factory=list)


def _ellipse(shape, cx, cy, ax, ay):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0


def anatomy(rows: int, num_slices: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(HU volume [D, rows, rows] without noise, organ masks [D, rows, rows]) — slices
    ascending z (feet → head)."""
    s = rows / 128.0
    hu = np.full((num_slices, rows, rows), -1000.0, np.float32)
    masks = {k: np.zeros(hu.shape, bool) for k in ("fat", "liver", "lung", "kidney", "bone")}
    shape = (rows, rows)
    body = _ellipse(shape, 64 * s, 66 * s, 58 * s, 46 * s)
    inner = _ellipse(shape, 64 * s, 66 * s, 45 * s, 34 * s)
    spine = _ellipse(shape, 64 * s, 92 * s, 8 * s, 8 * s)
    spine_core = _ellipse(shape, 64 * s, 92 * s, 6.5 * s, 6.5 * s)
    for z in range(num_slices):
        t = z / max(num_slices - 1, 1)
        sl = hu[z]
        sl[body] = -100.0
        masks["fat"][z] = body & ~inner
        sl[inner] = 40.0
        if t >= 0.55:
            for cx in (42, 86):
                lung = _ellipse(shape, cx * s, 60 * s, 17 * s, 21 * s)
                sl[lung] = -850.0
                masks["lung"][z] |= lung
        if t <= 0.7:
            liver = _ellipse(shape, 44 * s, 62 * s, 22 * s, 19 * s)
            if t >= 0.55:
                liver &= ~masks["lung"][z]
            sl[liver] = 60.0
            masks["liver"][z] = liver
        if t <= 0.45:
            for cx in (38, 90):
                kidney = _ellipse(shape, cx * s, 82 * s, 8 * s, 10 * s)
                sl[kidney] = 150.0
                masks["kidney"][z] |= kidney
        sl[spine] = 700.0
        sl[spine_core] = 350.0
        masks["bone"][z] = spine_core
    return hu, masks


def plan_study(rng: np.random.Generator, index: int, rows: int, num_slices: int,
               pixel_mm: float, slice_mm: float, masks, num_lesions: int) -> StudyPlan:
    plan = StudyPlan(index, rows, num_slices, pixel_mm, slice_mm)
    kinds = list(LESION_KINDS)
    taken = np.zeros((num_slices, rows, rows), bool)
    attempts = 0
    while len(plan.lesions) < num_lesions and attempts < 400:
        attempts += 1
        kind = kinds[(index + len(plan.lesions) + attempts) % len(kinds)]
        organ, _, (lo, hi), (rlo, rhi), _ = LESION_KINDS[kind]
        long_mm = rng.uniform(lo, hi)
        short_mm = long_mm * rng.uniform(rlo, rhi)
        long_px, short_px = long_mm / pixel_mm, short_mm / pixel_mm
        depth = max(short_mm / 2 / slice_mm, 0.8)
        z = int(rng.integers(2, num_slices - 2))
        room = scipy.ndimage.distance_transform_edt(masks[organ][z] & ~taken[z])
        # the lesion's border stays inside its organ (a node or soft-tissue mass in fat)
        ys, xs = np.nonzero(room >= long_px / 2 + 1.5)
        if len(xs) == 0:
            continue
        k = int(rng.integers(len(xs)))
        lesion = Lesion(kind, (float(xs[k]) + rng.uniform(-0.4, 0.4),
                               float(ys[k]) + rng.uniform(-0.4, 0.4)), z, long_px, short_px,
                        float(rng.uniform(0, math.pi)), depth)
        zlo, zhi = max(0, int(z - depth - 1)), min(num_slices, int(z + depth + 2))
        taken[zlo:zhi] |= _ellipse((rows, rows), lesion.centre_xy[0], lesion.centre_xy[1],
                                   long_px / 2 + 6, long_px / 2 + 6)[None]
        plan.lesions.append(lesion)
    return plan


def render(hu: np.ndarray, plan: StudyPlan, rng: np.random.Generator,
           noise_hu: float = 10.0) -> np.ndarray:
    """The lesions painted into ``hu`` (partial volume over ~1 px), plus Gaussian noise."""
    out = hu.copy()
    d, h, w = out.shape
    zz, yy, xx = np.mgrid[:d, :h, :w].astype(np.float32)
    for les in plan.lesions:
        value = LESION_KINDS[les.kind][1]
        cx, cy = les.centre_xy
        cu, su = math.cos(les.angle_rad), math.sin(les.angle_rad)
        u = (xx - cx) * cu + (yy - cy) * su
        v = -(xx - cx) * su + (yy - cy) * cu
        r = np.sqrt((u / (les.long_px / 2)) ** 2 + (v / (les.short_px / 2)) ** 2
                    + ((zz - les.key_slice) / les.depth_slices) ** 2)
        # r = 1 is the border; blend over about one pixel of the short semi-axis
        weight = np.clip((1.0 - r) * (les.short_px / 2) + 0.5, 0.0, 1.0)
        out = out * (1 - weight) + value * weight
    out += rng.normal(0.0, noise_hu, out.shape).astype(np.float32)
    return out


def _write_series(folder: str, plan: StudyPlan, hu: np.ndarray, seed: int,
                  rng: np.random.Generator) -> list[pydicom.Dataset]:
    """Slices as CT files, shuffled names; returns the datasets in geometric order."""
    os.makedirs(folder, exist_ok=True)
    pid = f"LESION-{plan.index:04d}"
    base = dicom_files.template("CT_small.dcm")
    base.SpecificCharacterSet = "ISO_IR 100"
    base.PatientName, base.PatientID = f"PHANTOM^{pid}", pid
    base.PatientBirthDate, base.PatientSex = "19600101", "O"
    base.StudyInstanceUID = dicom_files.uid(seed, pid, "study")
    base.SeriesInstanceUID = dicom_files.uid(seed, pid, "series")
    base.FrameOfReferenceUID = dicom_files.uid(seed, pid, "for")
    base.StudyID, base.SeriesNumber = "1", 2
    base.AccessionNumber = f"L{seed % 1000:03d}{plan.index:05d}"
    base.StudyDate = base.SeriesDate = base.ContentDate = base.AcquisitionDate = "20240301"
    base.StudyTime = base.SeriesTime = base.ContentTime = "093000"
    base.StudyDescription = "CT CHEST ABDOMEN WITH CONTRAST"
    base.SeriesDescription = "AXIAL 5MM SOFT TISSUE"
    base.ProtocolName = "CT CHEST ABDOMEN / AXIAL 5MM"
    base.BodyPartExamined = "ABDOMEN"
    base.ContrastBolusAgent, base.ContrastBolusRoute = "IOHEXOL", "IV"
    base.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    base.PatientPosition = "FFS"
    base.Manufacturer, base.ManufacturerModelName = "RADNET", "PHANTOM"
    base.Rows = base.Columns = plan.rows
    base.PixelSpacing = [dicom_files.ds_number(plan.pixel_mm)] * 2
    base.SliceThickness = dicom_files.ds_number(plan.slice_mm)
    base.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    base.SamplesPerPixel, base.PhotometricInterpretation = 1, "MONOCHROME2"
    base.BitsAllocated, base.BitsStored, base.HighBit, base.PixelRepresentation = 16, 16, 15, 0
    base.RescaleIntercept, base.RescaleSlope, base.RescaleType = "-1024", "1", "HU"
    base.WindowCenter, base.WindowWidth = "40", "400"
    for kw in ("SpacingBetweenSlices", "PixelPaddingValue"):
        if kw in base:
            delattr(base, kw)
    stored = np.clip(np.rint(hu + 1024), 0, 65535).astype(np.uint16)
    datasets = []
    n = plan.num_slices
    half = plan.rows * plan.pixel_mm / 2
    for k in range(n):
        ds = copy.deepcopy(base)  # Dataset.update would share the element objects
        sop = dicom_files.uid(seed, pid, "slice", k)
        dicom_files.set_file_meta(ds, CT_IMAGE_STORAGE, sop)
        ds.InstanceNumber = n - k          # head → feet numbering; geometry says otherwise
        ds.ImagePositionPatient = [dicom_files.ds_number(-half), dicom_files.ds_number(-half),
                                   dicom_files.ds_number(-400 + k * plan.slice_mm)]
        ds.SliceLocation = dicom_files.ds_number(-400 + k * plan.slice_mm)
        ds.PixelData = dicom_files.pixel_bytes(stored[k])
        datasets.append(ds)
    names = [f"{int(x):08X}" for x in rng.permutation(10 ** 6)[:n]]
    for ds, name in zip(datasets, names):
        ds.save_as(os.path.join(folder, name), enforce_file_format=True)
        ds.filename = name
    return datasets


def _fake_image(ref: pydicom.Dataset, seed, pid) -> pydicom.Dataset:
    """A copy of ``ref`` with a SOP Instance UID that no file in the archive has."""
    ds = copy.deepcopy(ref)
    ds.SOPInstanceUID = dicom_files.uid(seed, pid, "missing-slice")
    dicom_files.set_file_meta(ds, CT_IMAGE_STORAGE, ds.SOPInstanceUID)
    return ds


def _truth(plan, kind, source, object_file, image_file, key, pts=None, lesion=None,
           tracking=""):
    row = {"study": plan.index, "kind": kind, "source": source, "object_file": object_file,
           "image_file": image_file, "key_slice_index": key, "tracking_id": tracking}
    if pts is not None:
        box = recist_box(pts, BOX_DILATE_PX, (plan.rows, plan.rows))
        row.update({k: f"{v:.4f}" for k, v in zip(("x1", "y1", "x2", "y2"), box)})
    if lesion is not None:
        row.update(long_mm=f"{lesion.long_px * plan.pixel_mm:.3f}",
                   short_mm=f"{lesion.short_px * plan.pixel_mm:.3f}",
                   lesion_type=LESION_KINDS[lesion.kind][4])
    return row


def _line(rng, centre, length, angle):
    u = np.array([math.cos(angle), math.sin(angle)])
    c = np.asarray(centre, float)
    return np.stack([c - u * length / 2, c + u * length / 2])


def _jitter(rng, pts, px=0.25):
    """A radiologist's hand: end points off by up to ``px`` pixels."""
    return pts + rng.uniform(-px, px, pts.shape)


def write_study(root: str, rel_folder: str, plan: StudyPlan, hu: np.ndarray, seed: int,
                rng: np.random.Generator, distractors: list[str]) -> list[dict]:
    """Writes the series, its GSPS and its SR under ``root/rel_folder``; returns truth rows."""
    pid = f"LESION-{plan.index:04d}"
    images = _write_series(os.path.join(root, rel_folder, "CT"), plan, hu, seed, rng)
    rel_image = lambda k: f"{rel_folder}/CT/{images[k].filename}"
    gsps_rel, sr_rel = f"{rel_folder}/PR/GSPS", f"{rel_folder}/SR/REPORT"
    units = hd.pr.AnnotationUnitsValues.PIXEL
    layer = hd.pr.GraphicLayer(layer_name="MEASUREMENTS", order=1)
    gsps_annotations, sr_groups, truth = [], [], []
    gsps_refs = {}

    def gsps(k, graphic=(), text=(), ref=None):
        ref = ref if ref is not None else images[k]
        gsps_refs[ref.SOPInstanceUID] = ref
        gsps_annotations.append(hd.pr.GraphicAnnotation(
            referenced_images=[ref], graphic_layer=layer, graphic_objects=list(graphic) or None,
            text_objects=list(text) or None))

    def polyline(pts):
        return hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE,
                                   np.asarray(pts, np.float32), units)

    def sr_group(k, pts, graphic_type, name, value_mm, tracking, site=None):
        region = hd.sr.ImageRegion(
            graphic_type=graphic_type, graphic_data=np.asarray(pts, np.float32),
            source_image=hd.sr.SourceImageForRegion.from_source_image(images[k]))
        sr_groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=dicom_files.uid(seed, pid, "tracking", tracking), identifier=tracking),
            referenced_region=region,
            finding_sites=[hd.sr.FindingSite(site)] if site is not None else None,
            measurements=[hd.sr.Measurement(name=name, value=float(value_mm),
                                            unit=codes.UCUM.Millimeter)]))

    for i, les in enumerate(plan.lesions):
        long_pts, short_pts = les.endpoints()
        drawn_long, drawn_short = _jitter(rng, long_pts), _jitter(rng, short_pts)
        all_pts = np.concatenate([drawn_long, drawn_short])  # the measurement as written
        tracking = f"LESION {i + 1}"
        if (plan.index + i) % 2 == 0:
            gsps(les.key_slice, [polyline(drawn_long), polyline(drawn_short)])
            truth.append(_truth(plan, "recist", "gsps", gsps_rel, rel_image(les.key_slice),
                                les.key_slice, all_pts, les, tracking))
        else:
            site = SITE_CODES.get(les.kind)
            sr_group(les.key_slice, drawn_long, hd.sr.GraphicTypeValues.POLYLINE,
                     codes.SCT.LongAxis, les.long_px * plan.pixel_mm, tracking + " LONG", site)
            sr_group(les.key_slice, drawn_short, hd.sr.GraphicTypeValues.POLYLINE,
                     codes.SCT.ShortAxis, les.short_px * plan.pixel_mm, tracking + " SHORT",
                     site)
            truth.append(_truth(plan, "recist", "sr", sr_rel, rel_image(les.key_slice),
                                les.key_slice, all_pts, les, tracking))

    c = plan.rows / 2
    for j, kind in enumerate(distractors):
        k = int(rng.integers(0, plan.num_slices))
        centre = (c + rng.uniform(-20, 20) * plan.rows / 128, c + rng.uniform(-15, 15))
        length = rng.uniform(8, 20)
        angle = rng.uniform(0, math.pi)
        tid = f"DISTRACTOR {j + 1}"
        if kind == "arrow":
            gsps(k, text=[hd.pr.TextObject("CYST?", units, anchor_point=centre,
                                           bounding_box=(centre[0] + 4, centre[1] - 12,
                                                         centre[0] + 30, centre[1] - 4),
                                           anchor_point_visible=True)])
            truth.append(_truth(plan, "arrow", "gsps", gsps_rel, rel_image(k), k))
        elif kind == "text":
            gsps(k, text=[hd.pr.TextObject("SEE PRIOR", units,
                                           bounding_box=(4.0, 4.0, 40.0, 12.0),
                                           anchor_point_visible=False)])
            truth.append(_truth(plan, "text", "gsps", gsps_rel, rel_image(k), k))
        elif kind == "single_line":
            gsps(k, [polyline(_line(rng, centre, length, angle))])
            truth.append(_truth(plan, "single_line", "gsps", gsps_rel, rel_image(k), k))
        elif kind == "ellipse":
            a, b = length / 2, length / 3
            u, v = np.array([math.cos(angle), math.sin(angle)]), np.array(
                [-math.sin(angle), math.cos(angle)])
            cc = np.asarray(centre)
            pts = np.stack([cc - u * a, cc + u * a, cc - v * b, cc + v * b])
            gsps(k, [hd.pr.GraphicObject(hd.pr.GraphicTypeValues.ELLIPSE,
                                         pts.astype(np.float32), units)])
            truth.append(_truth(plan, "ellipse", "gsps", gsps_rel, rel_image(k), k))
        elif kind == "non_perpendicular":
            tilt = math.radians(rng.uniform(35, 55))
            gsps(k, [polyline(_line(rng, centre, length, angle)),
                     polyline(_line(rng, centre, length * 0.6, angle + tilt))])
            truth.append(_truth(plan, "non_perpendicular", "gsps", gsps_rel, rel_image(k), k))
        elif kind == "unresolved_reference":
            ref = _fake_image(images[k], seed, pid)
            gsps(k, [polyline(_line(rng, centre, length, angle)),
                     polyline(_line(rng, centre, length * 0.6, angle + math.pi / 2))], ref=ref)
            truth.append(_truth(plan, "unresolved_reference", "gsps", gsps_rel, "", -1))
        elif kind == "sr_ellipse":
            a, b = length / 2, length / 3
            u, v = np.array([math.cos(angle), math.sin(angle)]), np.array(
                [-math.sin(angle), math.cos(angle)])
            cc = np.asarray(centre)
            pts = np.stack([cc - u * a, cc + u * a, cc - v * b, cc + v * b])
            sr_group(k, pts, hd.sr.GraphicTypeValues.ELLIPSE, codes.SCT.Diameter,
                     length * plan.pixel_mm, tid)
            truth.append(_truth(plan, "ellipse", "sr", sr_rel, rel_image(k), k,
                                tracking=tid))
        elif kind == "sr_single_line":
            sr_group(k, _line(rng, centre, length, angle), hd.sr.GraphicTypeValues.POLYLINE,
                     codes.SCT.Length, length * plan.pixel_mm, tid)
            truth.append(_truth(plan, "single_line", "sr", sr_rel, rel_image(k), k,
                                tracking=tid))
        else:
            raise ValueError(f"unknown distractor {kind!r}")

    common = dict(manufacturer="RADNET", manufacturer_model_name="PHANTOM",
                  software_versions="1", device_serial_number="0")
    if gsps_annotations:
        pr = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=list(gsps_refs.values()),
            series_instance_uid=dicom_files.uid(seed, pid, "gsps-series"), series_number=90,
            sop_instance_uid=dicom_files.uid(seed, pid, "gsps"), instance_number=1,
            content_label="BOOKMARKS", graphic_annotations=gsps_annotations,
            graphic_layers=[layer], **common)
        os.makedirs(os.path.dirname(os.path.join(root, gsps_rel)), exist_ok=True)
        pr.save_as(os.path.join(root, gsps_rel))
    if sr_groups:
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(
                observer_person_context=hd.sr.ObserverContext(
                    observer_type=codes.DCM.Person,
                    observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                        name="READER^PHANTOM"))),
            procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
            imaging_measurements=sr_groups)
        sr = hd.sr.Comprehensive3DSR(
            evidence=images, content=report[0],
            series_instance_uid=dicom_files.uid(seed, pid, "sr-series"), series_number=91,
            sop_instance_uid=dicom_files.uid(seed, pid, "sr"), instance_number=1, **common)
        os.makedirs(os.path.dirname(os.path.join(root, sr_rel)), exist_ok=True)
        sr.save_as(os.path.join(root, sr_rel))
    return truth


SITE_CODES = {
    "liver": codes.SCT.Liver, "lung": codes.SCT.Lung, "kidney": codes.SCT.Kidney,
    "lymph_node": codes.SCT.LymphNode, "bone": codes.SCT.Bone,
    "soft_tissue": codes.SCT.SoftTissue,
}


def generate(dicom_root: str, truth_csv: str, studies: int, seed: int = 0, rows: int = 128,
             num_slices: int = 20, pixel_mm: float = 2.5, slice_mm: float = 5.0,
             lesions_per_study: tuple[int, int] = (2, 4), subfolder: str = "LESIONS") -> dict:
    """``studies`` phantom CT studies with lesions and their measurements under
    ``dicom_root/subfolder``; the truth to ``truth_csv``. Same seed, same files."""
    rng = np.random.default_rng(seed)
    base_hu, masks = anatomy(rows, num_slices)
    truth = []
    for s in range(studies):
        srng = np.random.default_rng([seed, s])
        n = int(srng.integers(lesions_per_study[0], lesions_per_study[1] + 1))
        plan = plan_study(srng, s, rows, num_slices, pixel_mm, slice_mm, masks, n)
        hu = render(base_hu, plan, srng)
        # every distractor kind in turn, three per study
        kinds = [DISTRACTORS[(3 * s + j) % len(DISTRACTORS)] for j in range(3)]
        truth.extend(write_study(dicom_root, f"{subfolder}/S{s:04d}", plan, hu, seed, srng,
                                 kinds))
    del rng
    os.makedirs(os.path.dirname(os.path.abspath(truth_csv)), exist_ok=True)
    with open(truth_csv, "w", newline="") as f:
        w = csv.DictWriter(f, TRUTH_COLUMNS)
        w.writeheader()
        w.writerows(truth)
    return {"lesion_studies": studies,
            "lesions": sum(t["kind"] == "recist" for t in truth),
            "distractors": sum(t["kind"] != "recist" for t in truth)}
