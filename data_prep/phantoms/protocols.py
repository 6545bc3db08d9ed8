"""Hospital protocols of the phantom PACS: which studies and series a patient gets.

Planning is cheap and deterministic (a function of the seed and the patient index), so
``reference_volume`` can re-plan a patient and re-render one series without any array
stored on disk.

Truth semantics (shared with data_prep.index, see docs/phantoms.md):
- coverage = regions named by the descriptions (docs/interfaces.md keyword table) whose
  whole z-range (anatomy) lies inside the scan's superior–inferior extent, computed from
  the 8 corners of the voxel box (voxel edges: half a pixel / half a spacing beyond the
  outermost centres);
- a multi-orientation series (tri-plane localizer) gives one truth row per orientation;
- the view is always the dominant axis of the normal; > 20° adds non_standard_view;
- exclusion reasons are computed from the series' facts, all that apply, in the order of
  ``radnet.labels.EXCLUSION_REASONS``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

from data_prep.phantoms import anatomy
from radnet import labels

MAX_EFFECTIVE_SPACING_MM = 15.0
MIN_SLICES = 16
TARGET_SLICES = 48
# Series whose normal lies more than this from every patient axis are non-standard.
# The phantoms only use tilts ≤ 10° (standard) or ≥ 35° (oblique), never in between.
NON_STANDARD_ANGLE_DEG = 20.0

VIEW_COSINES = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}

# Keyword table of docs/interfaces.md (multi-word phrases first).
_PHRASES: list[tuple[str, tuple[str, ...]]] = [
    (r"ABD(OMEN)?[ /]*PELVIS|\bA/P\b|\bCOLON\b|\bBOWEL\b|\bENTERO", ("liver", "kidney", "intestine", "pelvis")),
    (r"HEAD[ /&]*NECK|\bH&N\b|\bHN\b", ("upper_head_neck", "lower_head_neck")),
    (r"LOWER NECK|\bLARYNX\b|\bTHYROID\b", ("lower_head_neck",)),
    (r"\bSINUS|NASOPHARYNX|OROPHARYNX|SKULL BASE", ("upper_head_neck",)),
    (r"\bHEAD\b|\bBRAIN\b|\bCRANIAL\b", ("brain",)),
    (r"\bNECK\b", ("upper_head_neck", "lower_head_neck")),
    (r"\bCHEST\b|\bTHORAX\b|\bLUNG", ("lung",)),
    (r"\bBREAST|\bMAMMO", ("breast",)),
    (r"\bABDOMEN\b|\bABD\b|\bLIVER\b", ("liver", "kidney")),
    (r"\bKIDNEY|\bRENAL\b", ("kidney",)),
    (r"\bPELVIS\b|\bPROSTATE\b|\bBLADDER\b|\bRECTUM\b|\bCERVIX\b|\bUTERUS\b", ("pelvis",)),
]


def named_regions(*texts: str | None) -> tuple[str, ...]:
    """Regions named by description texts (union), in vocabulary order."""
    found: set[str] = set()
    for text in texts:
        t = (text or "").upper()
        for pattern, regions in _PHRASES:
            if re.search(pattern, t):
                found.update(regions)
                t = re.sub(pattern, " ", t)     # a phrase consumes its words
    return tuple(r for r in labels.COVERAGE if r in found)


# --------------------------------------------------------------------------- protocols
# Each series template: (series description, view, sequence, phase, spacing choices mm,
# probability). sequence: CT, T1-SE, T2-SE, T1-FLAIR, T2-FLAIR, or an excluded kind
# (GR, EPI, STIR). phase: "pre" / "post" (contrast) / "any".
CT_PROTOCOLS: dict[str, dict[str, Any]] = {
    "ct_head": dict(
        studies=[("CT HEAD WO CONTRAST", False), ("CT BRAIN W/WO CONTRAST", True),
                 ("CT HEAD W CONTRAST", True)],
        regions=("brain",), body_part="HEAD", fov=(220, 250),
        series=[("AX BRAIN 5MM", "axial", "pre", (2.5, 5.0), 1.0),
                ("AX BRAIN 5MM C+", "axial", "post", (2.5, 5.0), 1.0),
                ("COR BRAIN 3MM", "coronal", "last", (3.0, 4.0), 0.5),
                ("SAG BRAIN 3MM", "sagittal", "last", (3.0, 4.0), 0.5)]),
    "ct_sinus": dict(
        studies=[("CT SINUS WO CONTRAST", False)],
        regions=("upper_head_neck",), body_part="SINUS", fov=(180, 220),
        series=[("AX SINUS BONE 2MM", "axial", "pre", (2.0, 3.0), 1.0),
                ("COR SINUS 2MM", "coronal", "last", (2.0, 3.0), 0.8)]),
    "ct_neck": dict(
        studies=[("CT NECK SOFT TISSUE W CONTRAST", True), ("CT NECK W CONTRAST", True)],
        regions=("upper_head_neck", "lower_head_neck"), body_part="NECK", fov=(220, 260),
        series=[("AX NECK 3MM", "axial", "post", (2.5, 3.0), 1.0),
                ("COR NECK 3MM", "coronal", "last", (3.0,), 0.6)]),
    "ct_chest": dict(
        studies=[("CT CHEST W CONTRAST", True), ("CT CHEST WO CONTRAST", False),
                 ("CT THORAX W CONTRAST", True)],
        regions=("lung",), body_part="CHEST", fov=(340, 420),
        series=[("AX CHEST 5MM STND", "axial", "pre", (3.0, 5.0), 1.0),
                ("AX CHEST 5MM C+", "axial", "post", (3.0, 5.0), 1.0),
                ("COR CHEST 5MM", "coronal", "last", (4.0, 5.0), 0.5),
                ("SAG CHEST 5MM", "sagittal", "last", (5.0,), 0.4)]),
    "ct_abd": dict(
        studies=[("CT ABDOMEN W CONTRAST", True), ("CT LIVER W/WO CONTRAST", True)],
        regions=("liver", "kidney"), body_part="ABDOMEN", fov=(340, 420),
        series=[("AX 5MM NON CON", "axial", "pre", (5.0,), 0.5),
                ("AX 5MM PORTAL VENOUS", "axial", "post", (3.0, 5.0), 1.0),
                ("COR 4MM PV", "coronal", "last", (4.0,), 0.5)]),
    "ct_ap": dict(
        studies=[("CT ABDOMEN PELVIS W CONTRAST", True), ("CT A/P W CONTRAST", True),
                 ("CT ABDOMEN PELVIS WO CONTRAST", False)],
        regions=("liver", "kidney", "intestine", "pelvis"), body_part="ABDOMEN", fov=(360, 440),
        series=[("AX 5MM STND", "axial", "pre", (5.0,), 1.0),
                ("AX 5MM STND C+", "axial", "post", (5.0,), 1.0),
                ("COR 5MM REFORMAT", "coronal", "last", (5.0,), 0.5),
                ("SAG 5MM REFORMAT", "sagittal", "last", (5.0,), 0.3)]),
    "ct_cap": dict(
        studies=[("CT CHEST ABD PELVIS W CONTRAST", True),
                 ("CT CHEST ABDOMEN PELVIS W CONTRAST", True)],
        regions=("lung", "liver", "kidney", "intestine", "pelvis"), body_part="CHEST",
        fov=(360, 440),
        series=[("AX 5MM C+ CAP", "axial", "post", (5.0,), 1.0),
                ("COR 5MM C+ CAP", "coronal", "last", (5.0,), 0.5)]),
    "ct_renal": dict(
        studies=[("CT RENAL MASS W/WO CONTRAST", True), ("CT KIDNEY W/WO CONTRAST", True)],
        regions=("kidney",), body_part="KIDNEY", fov=(340, 400),
        series=[("AX 3MM NON CON KIDNEY", "axial", "pre", (3.0,), 1.0),
                ("AX 3MM NEPHROGRAPHIC", "axial", "post", (3.0,), 1.0)]),
    "ct_pelvis": dict(
        studies=[("CT PELVIS WO CONTRAST", False), ("CT PELVIS W CONTRAST", True)],
        regions=("pelvis",), body_part="PELVIS", fov=(360, 440),
        series=[("AX PELVIS 3MM", "axial", "pre", (3.0, 5.0), 1.0),
                ("AX PELVIS 3MM C+", "axial", "post", (3.0, 5.0), 1.0)]),
    "ct_rt_neck": dict(
        studies=[("CT NECK RT PLANNING W CONTRAST", True)],
        regions=("upper_head_neck", "lower_head_neck"), body_part="NECK", fov=(400, 500),
        series=[("RT PLAN AX 3MM", "axial", "post", (2.5, 3.0), 1.0)]),
}
CT_SEQ = "CT"

MR_PROTOCOLS: dict[str, dict[str, Any]] = {
    "mr_brain": dict(
        studies=[("MRI BRAIN W/WO CONTRAST", True), ("MRI BRAIN WO CONTRAST", False),
                 ("MR HEAD W AND WO CONTRAST", True)],
        regions=("brain",), body_part="BRAIN", fov=(220, 250),
        series=[("SAG T1 FLAIR", "sagittal", "T1-FLAIR", "pre", (5.0, 6.0), 0.5),
                ("SAG T1 SE", "sagittal", "T1-SE", "pre", (5.0, 6.0), 0.4),
                ("AX T2 FSE", "axial", "T2-SE", "pre", (5.0, 6.0), 1.0),
                ("AX T2 FLAIR", "axial", "T2-FLAIR", "pre", (5.0, 6.0), 0.9),
                ("AX T1 FLAIR", "axial", "T1-FLAIR", "pre", (5.0, 6.0), 0.5),
                ("COR T2 FLAIR", "coronal", "T2-FLAIR", "pre", (5.0,), 0.3),
                ("AX DWI B1000", "axial", "EPI", "pre", (5.0,), 0.6),
                ("AX SWI", "axial", "GR", "pre", (3.0,), 0.25),
                ("AX T1 SE", "axial", "T1-SE", "pre", (5.0, 6.0), 0.8),
                ("COR T2 FSE", "coronal", "T2-SE", "pre", (5.0,), 0.4),
                ("AX T1 POST GAD", "axial", "T1-SE", "post", (5.0, 6.0), 1.0),
                ("COR T1 POST GAD", "coronal", "T1-SE", "post", (5.0,), 0.6),
                ("SAG T1 FLAIR C+", "sagittal", "T1-FLAIR", "post", (5.0,), 0.4)]),
    "mr_neck": dict(
        studies=[("MRI NECK W/WO CONTRAST", True)],
        regions=("upper_head_neck", "lower_head_neck"), body_part="NECK", fov=(220, 260),
        series=[("AX T1 SE", "axial", "T1-SE", "pre", (4.0, 5.0), 1.0),
                ("AX T2 FSE", "axial", "T2-SE", "pre", (4.0, 5.0), 1.0),
                ("COR STIR", "coronal", "STIR", "pre", (4.0,), 0.7),
                ("AX T1 POST GAD", "axial", "T1-SE", "post", (4.0, 5.0), 1.0),
                ("COR T1 POST", "coronal", "T1-SE", "post", (4.0,), 0.5)]),
    "mr_breast": dict(
        studies=[("MRI BREAST BILATERAL W/WO CONTRAST", True)],
        regions=("breast",), body_part="BREAST", fov=(320, 380), female_only=True,
        series=[("AX T1 NON FS", "axial", "T1-SE", "pre", (3.0, 4.0), 1.0),
                ("AX T2 FSE", "axial", "T2-SE", "pre", (3.0, 4.0), 1.0),
                ("AX STIR", "axial", "STIR", "pre", (4.0,), 0.6),
                ("DYN 3D T1 GRE", "axial", "DCE", "post", (4.0,), 0.6),
                ("AX T1 SE POST", "axial", "T1-SE", "post", (3.0, 4.0), 1.0)]),
    "mr_abd": dict(
        studies=[("MRI ABDOMEN W/WO CONTRAST", True), ("MRI LIVER W/WO CONTRAST", True)],
        regions=("liver", "kidney"), body_part="ABDOMEN", fov=(360, 420),
        series=[("COR T2 SSFSE", "coronal", "T2-SE", "pre", (6.0,), 1.0),
                ("AX T2 FSE FB", "axial", "T2-SE", "pre", (6.0, 7.0), 1.0),
                ("AX T1 IN-OUT PHASE", "axial", "GR", "pre", (6.0,), 0.7),
                ("AX DWI B800", "axial", "EPI", "pre", (7.0,), 0.5),
                ("AX T1 SE POST GAD", "axial", "T1-SE", "post", (6.0, 7.0), 1.0)]),
    "mr_pelvis": dict(
        studies=[("MRI PELVIS W/WO CONTRAST", True), ("MRI PROSTATE W/WO CONTRAST", True)],
        regions=("pelvis",), body_part="PELVIS", fov=(300, 380),
        series=[("AX T2 FSE", "axial", "T2-SE", "pre", (5.0, 6.0), 1.0),
                ("SAG T2 FSE", "sagittal", "T2-SE", "pre", (5.0,), 0.8),
                ("COR T2 FSE", "coronal", "T2-SE", "pre", (5.0,), 0.6),
                ("AX T1 SE", "axial", "T1-SE", "pre", (5.0, 6.0), 1.0),
                ("AX DWI B1400", "axial", "EPI", "pre", (5.0,), 0.5),
                ("AX T1 POST GAD", "axial", "T1-SE", "post", (5.0, 6.0), 1.0)]),
    "mr_kidney": dict(
        studies=[("MRI KIDNEY W/WO CONTRAST", True), ("MR RENAL MASS PROTOCOL", True)],
        regions=("kidney",), body_part="KIDNEY", fov=(340, 400),
        series=[("COR T2 SSFSE", "coronal", "T2-SE", "pre", (5.0, 6.0), 1.0),
                ("AX T2 FSE", "axial", "T2-SE", "pre", (5.0,), 0.8),
                ("AX T1 SE", "axial", "T1-SE", "pre", (5.0,), 1.0),
                ("AX T1 POST GAD", "axial", "T1-SE", "post", (5.0,), 1.0)]),
}

# Collections (TCIA-like top-level folders): protocols of their first study, then
# staging studies drawn from the second list.
COLLECTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "PHANTOM-BRAIN": (("mr_brain", "mr_brain", "ct_head"), ("mr_brain", "ct_head")),
    "PHANTOM-HN": (("ct_neck", "ct_rt_neck", "mr_neck", "ct_sinus"), ("ct_chest", "mr_brain")),
    "PHANTOM-LUNG": (("ct_chest", "ct_cap"), ("mr_brain", "ct_abd")),
    "PHANTOM-BREAST": (("mr_breast",), ("ct_chest", "ct_cap")),
    "PHANTOM-ABD": (("ct_abd", "ct_ap", "mr_abd", "ct_renal", "mr_kidney"), ("ct_chest", "ct_cap")),
    "PHANTOM-PELVIS": (("mr_pelvis", "ct_pelvis", "ct_ap"), ("ct_chest", "mr_pelvis")),
}
COLLECTION_WEIGHTS = {"PHANTOM-BRAIN": 0.2, "PHANTOM-HN": 0.16, "PHANTOM-LUNG": 0.18,
                      "PHANTOM-BREAST": 0.12, "PHANTOM-ABD": 0.2, "PHANTOM-PELVIS": 0.14}


def collection_regions(name: str) -> tuple[str, ...]:
    found = set()
    for group in COLLECTIONS[name]:
        for proto in group:
            p = CT_PROTOCOLS.get(proto) or MR_PROTOCOLS[proto]
            found.update(p["regions"])
    return tuple(r for r in labels.COVERAGE if r in found)


@dataclasses.dataclass
class SeriesSpec:
    """Everything needed to write (and re-render) one series."""

    series_id: str
    study: int
    number: int
    kind: str                   # image | sr | rtstruct | truncated | nondicom
    modality: str
    study_description: str
    series_description: str | None
    body_part: str
    sequence: str               # truth label ('' when not in the vocabulary)
    pulse: str = ""             # CT | SE | IR | GR | EPI
    tr_ms: float = 0.0
    te_ms: float = 0.0
    ti_ms: float = 0.0
    flip_deg: float = 90.0
    b_value: float = 0.0
    contrast: bool = False
    agent: str = ""             # ContrastBolusAgent ('' when only the description says so)
    view: str = ""              # truth label
    row_cos: tuple = (1.0, 0.0, 0.0)
    col_cos: tuple = (0.0, 1.0, 0.0)
    center_lps: tuple = (0.0, 0.0, 0.0)
    rows: int = 0
    cols: int = 0
    pixel_mm: float = 1.0
    slice_spacing_mm: float = 0.0
    thickness_mm: float = 0.0
    offsets: tuple = ()         # slice positions along the normal, mm from the centre, per file
    phases: int = 1
    per_file_cosines: tuple = ()  # localizers: one (row_cos, col_cos) per file
    localizer: bool = False
    regions_named: tuple = ()
    instance_ascending: bool = True
    style: str = ""             # quantisation / vendor style
    scale: float = 1.0          # MR: stored value of PD = 1 fully relaxed
    noise: float = 0.0          # CT: HU sigma; MR: fraction of scale
    bias: tuple = (0.0, 0.0, 0.0, 0.0)
    enhancement: float = 1.0
    folder: str = ""            # relative folder under dicom/
    noise_seed: int = 0
    defect: str = ""
    enhanced: bool = False      # MR: one Enhanced MR Image object (multi-frame) for the series

    @property
    def normal(self) -> np.ndarray:
        return np.cross(np.asarray(self.row_cos, float), np.asarray(self.col_cos, float))

    def corner0(self) -> np.ndarray:
        """LPS centre of pixel (0, 0) of the plane through the centre (offset 0)."""
        c = np.asarray(self.center_lps, float)
        return (c - np.asarray(self.row_cos) * self.pixel_mm * (self.cols - 1) / 2
                - np.asarray(self.col_cos) * self.pixel_mm * (self.rows - 1) / 2)


# --------------------------------------------------------------------------- truth
def z_extent(spec: SeriesSpec) -> tuple[float, float]:
    """Patient-z range (LPS) of the imaged slab, from the 8 corners of its voxel box.

    DICOM positions are voxel centres; a voxel spans ± half a pixel in plane and, in a
    slice stack, ± half the slice spacing along the normal (a single slice: its centre
    plane, as the index has no spacing to go by). So the slab reaches half a voxel beyond
    the outermost centres: rows × PixelSpacing and (n − 1 + 1) × spacing. For coronal and
    sagittal series the z extent is in-plane; for tilted series all three axes add.
    Localizers with several orientations: the union over their files.
    """
    zs = []
    c = np.asarray(spec.center_lps, float)
    groups: dict[tuple, list[float]] = {}
    cos_list = spec.per_file_cosines or [(spec.row_cos, spec.col_cos)] * len(spec.offsets)
    for off, (rc, cc) in zip(spec.offsets, cos_list):
        groups.setdefault((tuple(rc), tuple(cc)), []).append(float(off))
    for (rc, cc), offs in groups.items():
        rc, cc = np.asarray(rc, float), np.asarray(cc, float)
        n = np.cross(rc, cc)
        pos = np.unique(np.round(np.asarray(offs), 3))
        half_step = float(np.median(np.diff(pos))) / 2 if len(pos) > 1 else 0.0
        for off in (pos[0] - half_step, pos[-1] + half_step):
            base = c + n * off
            for a in (-1, 1):
                for b in (-1, 1):
                    p = (base + a * rc * spec.pixel_mm * spec.cols / 2
                         + b * cc * spec.pixel_mm * spec.rows / 2)
                    zs.append(p[2])
    return float(min(zs)), float(max(zs))


def oblique_deg(row_cos, col_cos) -> float:
    """Angle between the slice normal and the patient axis it is closest to."""
    n = np.cross(np.asarray(row_cos, float), np.asarray(col_cos, float))
    n = n / np.linalg.norm(n)
    return float(math.degrees(math.acos(min(1.0, float(np.max(np.abs(n)))))))


def dominant_view(row_cos, col_cos) -> str:
    """The view label: the patient axis closest to the slice normal (always filled)."""
    n = np.cross(np.asarray(row_cos, float), np.asarray(col_cos, float))
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(n)))]


def view_of(row_cos, col_cos) -> str:
    """The standard view, or '' when the normal is more than NON_STANDARD_ANGLE_DEG off."""
    if oblique_deg(row_cos, col_cos) > NON_STANDARD_ANGLE_DEG:
        return ""
    return dominant_view(row_cos, col_cos)


def split_parts(spec: SeriesSpec) -> list[tuple[str, SeriesSpec, list[int]]]:
    """The series as the standard lets a reader build volumes from it.

    One SeriesInstanceUID whose files have different orientations (a tri-plane
    localizer) holds one stack per orientation: each part is a series of its own
    (``series_id`` + ``_<view>``) with its own view, geometry and reasons. Returns
    (suffix, spec of the part, file indices of the part); an ordinary series is one
    part with suffix ''.
    """
    if not spec.per_file_cosines:
        return [("", spec, list(range(len(spec.offsets))))]
    by_cos: dict[tuple, list[int]] = {}
    for i, cos in enumerate(spec.per_file_cosines):
        by_cos.setdefault((tuple(cos[0]), tuple(cos[1])), []).append(i)
    parts = []
    for (rc, cc), idx in by_cos.items():
        suffix = "_" + dominant_view(rc, cc)
        sub = dataclasses.replace(spec, series_id=spec.series_id + suffix, row_cos=rc, col_cos=cc,
                                  per_file_cosines=(), offsets=tuple(spec.offsets[i] for i in idx))
        parts.append((suffix, sub, idx))
    return parts


def distinct_positions(spec: SeriesSpec) -> np.ndarray:
    return np.unique(np.round(np.asarray(spec.offsets, float), 3))


def geometry_facts(spec: SeriesSpec) -> dict[str, Any]:
    """Slice count, spacing and consistency from the positions actually written."""
    if spec.per_file_cosines:
        dirs = {tuple(np.round(np.cross(r, c), 3)) for r, c in spec.per_file_cosines}
        return dict(n_slices=len(spec.offsets), spacing=float("nan"), consistent=len(dirs) == 1)
    pos = distinct_positions(spec)
    n_files = len(spec.offsets)
    if spec.phases > 1:
        counts = np.unique(np.round(np.asarray(spec.offsets, float), 3), return_counts=True)[1]
        consistent_dups = bool(np.all(counts == spec.phases))
        n = len(pos)
    else:
        consistent_dups = len(pos) == n_files
        n = n_files
    if len(pos) < 2:     # one position: no spacing to measure (a scout, a localizer part)
        return dict(n_slices=n, spacing=float("nan"), consistent=consistent_dups)
    gaps = np.diff(pos)
    median = float(np.median(gaps))
    even = bool(np.all(np.abs(gaps - median) <= 0.05 * median + 1e-3))
    # The project's slice spacing (docs/index.md): the mean step, extent / (n − 1), which
    # the volume builder resamples with; a gap makes it differ from the median.
    spacing = float((pos[-1] - pos[0]) / (len(pos) - 1))
    return dict(n_slices=n, spacing=spacing, consistent=even and consistent_dups)


def effective_spacing(spacing: float, n_slices: int) -> float:
    if not math.isfinite(spacing):
        return float("nan")
    return spacing * n_slices / TARGET_SLICES if n_slices > TARGET_SLICES else spacing


def truth_row(spec: SeriesSpec, body: anatomy.Anatomy) -> dict[str, Any]:
    """The truth.csv row of a series (see docs/phantoms.md for the semantics)."""
    row = dict(series_id=spec.series_id, sequence=spec.sequence if spec.kind == "image" else "",
               view="", contrast="", coverage="", slice_spacing_mm="",
               effective_spacing_mm="", status="excluded", reasons="")
    if spec.kind in ("truncated", "nondicom"):
        row["reasons"] = "unreadable"
        return row
    if spec.kind in ("sr", "rtstruct"):
        row["reasons"] = "not_image"
        return row
    reasons = []
    facts = geometry_facts(spec)
    if spec.per_file_cosines:
        raise ValueError(f"{spec.series_id}: split a multi-orientation series with split_parts first")
    view = dominant_view(spec.row_cos, spec.col_cos)
    row["view"] = view
    row["contrast"] = "contrast" if spec.contrast else "no_contrast"
    z0 = body.origin_lps[2]
    zlo, zhi = z_extent(spec)
    covered = [r for r in spec.regions_named
               if zlo <= body.region_z[r][0] + z0 and zhi >= body.region_z[r][1] + z0]
    row["coverage"] = ";".join(covered)
    spacing = facts["spacing"]
    eff = effective_spacing(spacing, facts["n_slices"])
    if math.isfinite(spacing):
        row["slice_spacing_mm"] = f"{spacing:.3f}"
        row["effective_spacing_mm"] = f"{eff:.3f}"
    if spec.modality not in ("CT", "MR"):
        reasons.append("unsupported_modality")
    if facts["n_slices"] < MIN_SLICES:
        reasons.append("too_few_slices")
    if not facts["consistent"]:
        reasons.append("inconsistent_geometry")
    if not (spec.series_description or "").strip():
        reasons.append("missing_description")
    if spec.pulse in ("GR", "EPI") or spec.sequence == "" and spec.modality == "MR" or spec.localizer:
        reasons.append("excluded_sequence")   # localizers/scouts too (ImageType LOCALIZER)
    if spec.phases > 1:
        reasons.append("time_series")
    if oblique_deg(spec.row_cos, spec.col_cos) > NON_STANDARD_ANGLE_DEG:
        reasons.append("non_standard_view")
    if math.isfinite(eff) and eff > MAX_EFFECTIVE_SPACING_MM:
        reasons.append("spacing_too_large")
    order = {r: i for i, r in enumerate(labels.EXCLUSION_REASONS)}
    reasons = sorted(set(reasons), key=order.__getitem__)
    row["reasons"] = ";".join(reasons)
    row["status"] = "excluded" if reasons else "included"
    return row
