"""Phantom PACS: a synthetic hospital DICOM archive with ground truth, plus LiTS-format cases.

    python -m data_prep.phantoms --out=DIR [--patients=N] [--seed=S] [--lits_cases=K] \\
        [--workers=N] [--[no]progress]

Writes (see docs/phantoms.md and docs/interfaces.md):

    DIR/dicom/<COLLECTION>/<patient>/<study>/<series>/<file>   random hex names, no extension
    DIR/truth.csv            one row per series (and per unreadable file)
    DIR/collections.csv      collection,body_locations (TCIA-like)
    DIR/phantoms.json        seed and patient count (what reference_volume re-plans from)
    DIR/lits/volume-<k>.nii, segmentation-<k>.nii

Deterministic for a seed: each patient draws from its own generator
``default_rng([seed, patient])``, independent of the number of worker processes.
Python API: ``generate(out_dir, patients, seed, lits_cases)`` and
``reference_volume(out_dir, series_id)``.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
from typing import Any

import numpy as np
import pydicom

from data_prep.phantoms import anatomy, dicom_files, physics, protocols, render
from radnet import labels

GENERATOR_VERSION = 2
TRUTH_COLUMNS = ("series_id", "first_file", "sequence", "view", "contrast", "coverage",
                 "slice_spacing_mm", "effective_spacing_mm", "status", "reasons")

# ----------------------------------------------------------------------- fake identities
_ID_RNG = np.random.default_rng(424242)
FAKE_PATIENT_NAMES: tuple[str, ...] = tuple(
    f"{last}^{first}" for last, first in [
        ("PHANTOMSON", "AVERY"), ("QUIMBLEY", "BRONWEN"), ("ZEDMORE", "CASPIAN"),
        ("WOLLSTRAND", "DELPHINE"), ("VARGENTI", "EMRYS"), ("TOLLIVAN", "FIORELLA"),
        ("STRATHMOOR", "GIDEONA"), ("RAVENSCAR", "HOLLIS"), ("PEMBERLEIGH", "ISOLDE"),
        ("OKONKWOPHANT", "JARETH"), ("NIGHTINGALLOW", "KESTREL"), ("MARCHBANKE", "LUCASTA"),
        ("LINDQVISTER", "MORWENNA"), ("KETTLEWICK", "NOVALEE"), ("JANSSENOVA", "ORSINO"),
        ("HOLLOWMERE", "PERPETUA"), ("GRIMSTEADE", "QUILLAN"), ("FAIRWEATHERLY", "ROSALIND"),
        ("EVERSLEIGH", "SEBASTIANO"), ("DUNMARROW", "TAMSIN"), ("CROWTHERBY", "ULRIKA"),
        ("BRIGHTWATERS", "VESPERINE"), ("ASHCOMBE", "WINSLOWE"), ("YARBOROUGHE", "XANTHEA"),
    ])
FAKE_PATIENT_IDS: tuple[str, ...] = tuple(
    f"PHX{int(v):07d}" for v in _ID_RNG.choice(10_000_000, size=4000, replace=False))
FAKE_BIRTH_DATES: tuple[str, ...] = tuple(
    f"19{int(y):02d}{int(m):02d}{int(d):02d}"
    for y, m, d in zip(_ID_RNG.integers(30, 90, 60), _ID_RNG.integers(1, 13, 60),
                       _ID_RNG.integers(1, 29, 60)))
FAKE_INSTITUTIONS: tuple[str, ...] = (
    "SAINT PHANTOMA GENERAL HOSPITAL", "NORTHWOLD PHANTOM IMAGING CENTRE",
    "VOXELBURY UNIVERSITY MEDICAL CENTER", "HOUNSFIELD MEMORIAL INFIRMARY",
    "LARMOR VALLEY RADIOLOGY",
)
# Every value a generated header may hold in PatientName, PatientID, PatientBirthDate or
# InstitutionName: tests of later stages assert none of them reaches an output.
FAKE_IDENTITIES: tuple[str, ...] = (FAKE_PATIENT_NAMES + FAKE_PATIENT_IDS + FAKE_BIRTH_DATES
                                    + FAKE_INSTITUTIONS)
MAX_PATIENTS = len(FAKE_PATIENT_IDS)

CT_VENDORS = (("GE MEDICAL SYSTEMS", "LightSpeed VCT", "ge"), ("SIEMENS", "SOMATOM Definition AS", "siemens"),
              ("TOSHIBA", "Aquilion ONE", "toshiba"))
MR_VENDORS = (("GE MEDICAL SYSTEMS", "SIGNA HDxt", "plain"), ("SIEMENS", "Avanto", "plain"),
              ("Philips Medical Systems", "Ingenia", "philips"), ("TOSHIBA_MEC", "MRT50H1", "plain"))
AGENTS_CT = ("OMNIPAQUE 350", "ISOVUE-300", "IOPAMIDOL 370", "VISIPAQUE 320")
AGENTS_MR = ("GADAVIST", "MAGNEVIST 15ML", "DOTAREM", "Gd-DTPA")
_SPECIALS = ("missing_slice", "duplicate_position", "mixed_spacing", "missing_description",
             "too_few_slices", "time_series", "oblique", "spacing_too_large", "sr",
             "rtstruct", "truncated_file", "non_dicom", "truncated_coverage", "tilted")


# ----------------------------------------------------------------------- planning
@dataclasses.dataclass
class Study:
    index: int
    modality: str
    protocol: str
    description: str
    contrast_study: bool
    vendor: tuple
    institution: str
    date: str
    folder: str
    series: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PatientPlan:
    index: int
    pid: str
    collection: str
    anatomy: anatomy.Anatomy
    identity: dict
    studies: list
    junk: list        # (kind, series_id, folder, source series_id)


def _hex(rng: np.random.Generator, n: int) -> str:
    return "".join("0123456789abcdef"[int(i)] for i in rng.integers(0, 16, n))


def _choice(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _geometry(rng, spec: protocols.SeriesSpec, body: anatomy.Anatomy, regions, fov_range, spacing,
              view: str, matrix: int, truncated: bool = False, tilt_deg: float = 0.0,
              oblique: bool = False, max_slices: int = 90) -> None:
    """Fills the geometry of ``spec`` so that it covers ``regions`` (with margins)."""
    ox, oy, oz = body.origin_lps
    rz = body.region_z
    lo = min(rz[r][0] for r in regions)
    hi = max(rz[r][1] for r in regions)
    if truncated:
        # Clearly short: 30–50 % of the region's minimum length, inside the region.
        length = float(rng.uniform(0.3, 0.5)) * anatomy.MIN_REGION_LENGTH_MM[regions[0]]
        start = float(rng.uniform(lo + 5, hi - 5 - length))
        lo, hi = start, start + length
    else:
        lo -= float(rng.uniform(8, 35))
        hi += float(rng.uniform(8, 35))
    zc = (lo + hi) / 2 + oz
    span = hi - lo
    half_w = body.body_half_width(zc - oz)
    half_d = body.body_half_depth(zc - oz)
    fov = float(rng.uniform(*fov_range))
    yc = oy + (5.0 if "brain" in regions else 0.0) + float(rng.uniform(-8, 8))
    xc = ox + float(rng.uniform(-8, 8))
    row_cos, col_cos = protocols.VIEW_COSINES[view]
    if view == "axial":
        n = int(math.ceil(span / spacing)) + 1
        fov = max(fov, 2 * max(half_w, half_d) + 20.0)   # the whole body fits the field of view
        pixel = fov / matrix
    else:
        fov = max(fov, span + 10.0)
        pixel = fov / matrix
        across = 2 * (half_d if view == "coronal" else half_w) * 0.85
        n = min(int(math.ceil(across / spacing)) + 1, max_slices)
    rot = np.eye(3)
    if tilt_deg or oblique:
        def rx(a):
            c, s = math.cos(a), math.sin(a)
            return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])

        def rz_(a):
            c, s = math.cos(a), math.sin(a)
            return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        if oblique:
            rot = rz_(math.radians(float(rng.uniform(35, 45)))) @ rx(math.radians(float(rng.uniform(38, 48))))
        else:
            rot = rx(math.radians(tilt_deg))
    spec.row_cos = tuple(float(v) for v in rot @ np.asarray(row_cos))
    spec.col_cos = tuple(float(v) for v in rot @ np.asarray(col_cos))
    if oblique:
        # A tilted slab reaches along z by its in-plane size and its depth together;
        # enough slices that its voxel box spans the regions and their margins, centred
        # on them, so the named regions are covered whichever way one measures (their
        # positions, or the slab's superior–inferior length as the index does).
        rc_, cc_ = np.asarray(spec.row_cos), np.asarray(spec.col_cos)
        nz = abs(float(np.cross(rc_, cc_)[2]))
        in_plane_half = (abs(rc_[2]) + abs(cc_[2])) * pixel * matrix / 2
        n = max(int(math.ceil(max(span / 2 - in_plane_half, 0.0) * 2 / (nz * spacing))), 20)
    spec.center_lps = (xc, yc, zc)
    spec.rows = spec.cols = matrix
    spec.pixel_mm = round(pixel, 4)
    spec.slice_spacing_mm = spacing
    spec.offsets = tuple(round((k - (n - 1) / 2) * spacing, 4) for k in range(n))


def _mr_params(rng, seq: str) -> dict:
    u = lambda a, b: round(float(rng.uniform(a, b)), 1)  # noqa: E731
    if seq == "T1-SE":
        return dict(pulse="SE", tr_ms=u(400, 700), te_ms=u(8, 20), flip_deg=90.0)
    if seq == "T2-SE":
        return dict(pulse="SE", tr_ms=u(2500, 6000), te_ms=u(85, 120), flip_deg=90.0)
    if seq == "T1-FLAIR":
        return dict(pulse="IR", tr_ms=u(1800, 2500), te_ms=u(8, 20), ti_ms=u(750, 950), flip_deg=90.0)
    if seq == "T2-FLAIR":
        return dict(pulse="IR", tr_ms=u(8000, 11000), te_ms=u(100, 140), ti_ms=u(2200, 2700), flip_deg=90.0)
    if seq == "STIR":
        return dict(pulse="IR", tr_ms=u(3000, 6000), te_ms=u(30, 60), ti_ms=u(140, 170), flip_deg=90.0)
    if seq in ("GR", "DCE"):
        return dict(pulse="GR", tr_ms=u(5, 200), te_ms=u(2, 20), flip_deg=u(12, 70))
    if seq == "EPI":
        return dict(pulse="EPI", tr_ms=u(3500, 6000), te_ms=u(60, 95), b_value=float(_choice(rng, (800, 1000, 1400))))
    raise ValueError(seq)


def _new_spec(plan_rng, pid, study: Study, number: int, **kw) -> protocols.SeriesSpec:
    spec = protocols.SeriesSpec(series_id=f"{pid}_st{study.index}_se{number}", study=study.index,
                        number=number, study_description=study.description, **kw)
    spec.folder = f"{study.folder}/{_hex(plan_rng, 8)}"
    spec.noise_seed = int(plan_rng.integers(1 << 31))
    return spec


def _image_series(rng, pid, study: Study, number: int, body: anatomy.Anatomy, proto: dict,
                  desc: str, view: str, seq: str, post: bool, spacing_choices,
                  truncated=False, tilt_deg=0.0, oblique=False, matrix=None) -> protocols.SeriesSpec:
    modality = study.modality
    regions = proto["regions"]
    body_part = proto["body_part"]
    spec = _new_spec(rng, pid, study, number, kind="image", modality=modality,
                     series_description=desc, body_part=body_part, sequence="")
    if modality == "CT":
        spec.sequence = "CT"
        spec.pulse = "CT"
        spec.style = study.vendor[2]
        spec.noise = float(rng.uniform(6, 16))
        matrix = matrix or int(_choice(rng, (128, 128, 160, 192, 192, 256)))
    else:
        spec.__dict__.update(_mr_params(rng, seq))
        spec.sequence = seq if seq in labels.SEQUENCE else ""
        spec.style = study.vendor[2]
        spec.scale = float(rng.uniform(800, 3500))
        spec.noise = float(rng.uniform(0.008, 0.025))
        spec.bias = tuple(float(v) for v in rng.uniform(-0.25, 0.25, 4))
        matrix = matrix or int(_choice(rng, (128, 160, 192, 256)))
    spec.contrast = bool(post)
    if post:
        agents = AGENTS_CT if modality == "CT" else AGENTS_MR
        # Sometimes only the description tells (e.g. "C+", "POST GAD").
        spec.agent = _choice(rng, agents) if rng.uniform() < 0.75 else ""
        if not spec.agent and not any(k in desc for k in ("C+", "POST", "GAD")):
            spec.series_description = desc + " C+"
    spec.enhancement = float(rng.uniform(0.85, 1.15))
    spec.view = view
    spec.regions_named = protocols.named_regions(study.description, spec.series_description, body_part)
    spacing = float(_choice(rng, spacing_choices))
    _geometry(rng, spec, body, regions, proto["fov"], spacing, view, matrix,
              truncated=truncated, tilt_deg=tilt_deg, oblique=oblique)
    spec.thickness_mm = spacing if modality == "CT" else round(spacing - float(_choice(rng, (0.0, 0.5, 1.0))), 2)
    spec.instance_ascending = bool(rng.uniform() < (0.3 if (modality == "CT" and view == "axial") else 0.6))
    # About one MR series in sixteen is exported as one Enhanced MR object (multi-frame).
    spec.enhanced = modality == "MR" and spec.noise_seed % 16 == 3
    return spec


def plan_patient(seed: int, index: int) -> PatientPlan:
    """Plans one patient (no pixels): studies, series, geometry, identity."""
    rng = np.random.default_rng([seed, index])
    names = list(protocols.COLLECTIONS)
    w = np.array([protocols.COLLECTION_WEIGHTS[n] for n in names])
    collection = names[int(rng.choice(len(names), p=w / w.sum()))]
    first_group, staging = protocols.COLLECTIONS[collection]
    female = bool(rng.uniform() < 0.5) or collection == "PHANTOM-BREAST"
    protos = [_choice(rng, first_group)]
    if rng.uniform() < 0.45:
        protos.append(_choice(rng, staging))
    body = anatomy.make_anatomy(rng, female)
    pid = f"p{index:03d}"
    id_perm = np.random.default_rng([seed, 7]).permutation(len(FAKE_PATIENT_IDS))
    identity = dict(
        PatientName=_choice(rng, FAKE_PATIENT_NAMES),
        PatientID=FAKE_PATIENT_IDS[int(id_perm[index % len(FAKE_PATIENT_IDS)])],
        PatientBirthDate=_choice(rng, FAKE_BIRTH_DATES),
        PatientSex="F" if female else "M",
    )
    patient_folder = f"{collection}/{_hex(rng, 8)}"
    specials = [_SPECIALS[(3 * index + j) % len(_SPECIALS)] for j in range(3)]
    studies = []
    base_date = datetime.date(2014, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 3000)))
    for si, proto_name in enumerate(protos):
        if proto_name == "mr_breast" and not female:
            proto_name = "ct_chest"
        is_ct = proto_name in protocols.CT_PROTOCOLS
        proto = (protocols.CT_PROTOCOLS if is_ct else protocols.MR_PROTOCOLS)[proto_name]
        desc, contrast_study = _choice(rng, proto["studies"])
        vendor = _choice(rng, CT_VENDORS if is_ct else MR_VENDORS)
        study = Study(index=si + 1, modality="CT" if is_ct else "MR", protocol=proto_name,
                      description=desc, contrast_study=contrast_study, vendor=vendor,
                      institution=_choice(rng, FAKE_INSTITUTIONS),
                      date=(base_date + datetime.timedelta(days=40 * si)).strftime("%Y%m%d"),
                      folder=f"{patient_folder}/{_hex(rng, 8)}")
        number = 1
        if rng.uniform() < 0.8:      # localizer first, as scanners do
            number = _add_localizer(rng, pid, study, body, proto)
        last_phase_post = False
        for tpl in proto["series"]:
            if is_ct:
                sdesc, view, phase, spacings, prob = tpl
                seq = "CT"
            else:
                sdesc, view, seq, phase, spacings, prob = tpl
            if phase == "post" and not contrast_study:
                continue
            if phase == "pre" and is_ct and contrast_study and "W/WO" not in desc and rng.uniform() < 0.65:
                continue    # most contrast CT studies have no plain phase
            if rng.uniform() > prob:
                continue
            post = (phase == "post") or (phase == "last" and last_phase_post)
            if seq == "DCE":
                spec = _image_series(rng, pid, study, number, body, proto, sdesc, view, "DCE",
                                     True, spacings)
                _make_time_series(rng, spec, phases=int(rng.integers(3, 6)))
            else:
                spec = _image_series(rng, pid, study, number, body, proto, sdesc, view, seq,
                                     post, spacings)
            if phase in ("pre", "post"):
                last_phase_post = post
            study.series.append(spec)
            number += 1
        if is_ct and rng.uniform() < 0.3:
            sr = _new_spec(rng, pid, study, number, kind="sr", modality="SR",
                           series_description="DOSE REPORT", body_part="", sequence="")
            sr.folder = study.series[0].folder if study.series else sr.folder
            study.series.append(sr)
            number += 1
        studies.append(study)
    junk = []
    for special in specials:
        _apply_special(rng, special, pid, studies, body, junk)
    # Every third patient's scanner exports its first MR series as an Enhanced MR object
    # (besides the random few above), so that small archives hold one too.
    if index % 3 == 2:
        mr = [s for st in studies for s in st.series if s.modality == "MR" and s.kind == "image"
              and not s.localizer and s.phases == 1]
        if mr:
            mr[0].enhanced = True
    # A few folders mix two series (as some PACS exports do).
    for study in studies:
        imgs = [s for s in study.series if s.kind == "image"]
        if len(imgs) >= 3 and rng.uniform() < 0.2:
            imgs[2].folder = imgs[1].folder
    return PatientPlan(index=index, pid=pid, collection=collection, anatomy=body,
                       identity=identity, studies=studies, junk=junk)


def _add_localizer(rng, pid, study: Study, body: anatomy.Anatomy, proto) -> int:
    if study.modality == "CT":
        spec = _new_spec(rng, pid, study, 1, kind="image", modality="CT",
                         series_description="SCOUT", body_part=proto["body_part"], sequence="CT")
        spec.pulse = "CT"
        spec.style = study.vendor[2]
        spec.localizer = True
        spec.noise = 5.0
        _geometry(rng, spec, body, proto["regions"], (300, 420), 1.0, "coronal", 256)
        spec.offsets = (0.0,)
        spec.view = "coronal"
        spec.slice_spacing_mm = 0.0
        spec.thickness_mm = 1.0
    else:
        spec = _new_spec(rng, pid, study, 1, kind="image", modality="MR",
                         series_description="3-PLANE LOC", body_part=proto["body_part"], sequence="")
        spec.__dict__.update(_mr_params(rng, "GR"))
        spec.style = study.vendor[2]
        spec.scale = float(rng.uniform(800, 3000))
        spec.noise = 0.02
        spec.localizer = True
        _geometry(rng, spec, body, proto["regions"], (280, 400), 10.0, "axial", 128)
        spec.pixel_mm = round(max(spec.pixel_mm, 2.5), 4)
        spec.offsets = (0.0, 0.0, 0.0)
        spec.per_file_cosines = tuple(protocols.VIEW_COSINES[v] for v in ("axial", "coronal", "sagittal"))
        spec.thickness_mm = 8.0
    spec.regions_named = protocols.named_regions(study.description, spec.series_description, spec.body_part)
    study.series.append(spec)
    return 2


def _make_time_series(rng, spec: protocols.SeriesSpec, phases: int) -> None:
    """Several acquisitions at the same positions (dynamic / perfusion).

    A perfusion/dynamic slab of 16–20 slices centred on the protocol's regions, at most
    60 % as long as the shortest region it names: it covers none of them, and clearly so
    (its length is far from any region's minimum, whichever way coverage is measured).
    """
    n = int(rng.integers(16, 21))
    mins = [anatomy.MIN_REGION_LENGTH_MM[r] for r in spec.regions_named]
    spacing = spec.slice_spacing_mm
    if mins:
        spacing = min(spacing, math.floor(10 * 0.6 * min(mins) / n) / 10)
    spec.slice_spacing_mm = spacing
    spec.thickness_mm = min(spec.thickness_mm, spacing)
    base = tuple(round((k - (n - 1) / 2) * spacing, 4) for k in range(n))
    spec.offsets = tuple(o for _ in range(phases) for o in base)
    spec.phases = phases
    spec.enhanced = False       # dynamic series stay classic single-frame files
    spec.rows = spec.cols = 128
    spec.pixel_mm = round(spec.pixel_mm * 1.0, 4)


def _apply_special(rng, special: str, pid: str, studies: list, body: anatomy.Anatomy, junk: list) -> None:
    study = studies[0]
    if special == "truncated_coverage":
        # only single-region protocols are ever truncated
        single = [s for s in studies if len((protocols.CT_PROTOCOLS.get(s.protocol)
                                             or protocols.MR_PROTOCOLS[s.protocol])["regions"]) == 1]
        if not single:
            return
        study = single[0]
    proto = (protocols.CT_PROTOCOLS.get(study.protocol) or protocols.MR_PROTOCOLS[study.protocol])
    candidates = [s for s in study.series if s.kind == "image" and not s.localizer
                  and s.phases == 1 and not s.defect and len(s.offsets) >= 20
                  and protocols.view_of(s.row_cos, s.col_cos)]
    number = max(s.number for s in study.series) + 1 if study.series else 1
    if special in ("missing_slice", "duplicate_position", "mixed_spacing", "missing_description"):
        if not candidates:
            return
        s = candidates[int(rng.integers(len(candidates)))]
        s.defect = special
        offs = list(s.offsets)
        if special == "missing_slice":
            del offs[len(offs) // 2]
        elif special == "duplicate_position":
            offs.insert(len(offs) // 2, offs[len(offs) // 2])
        elif special == "mixed_spacing":
            half = len(offs) // 2
            offs = offs[:half] + [offs[half - 1] + (k + 1) * s.slice_spacing_mm * 2
                                  for k in range(len(offs) - half)]
        else:
            s.series_description = None
            if s.contrast and not s.agent:
                # Only the description said so; without it the agent tag must tell.
                s.agent = (AGENTS_CT if s.modality == "CT" else AGENTS_MR)[0]
        s.offsets = tuple(offs)
        return
    if special in ("too_few_slices", "truncated_coverage", "oblique", "tilted", "time_series",
                   "spacing_too_large"):
        if study.modality == "CT":
            seq, view, post = "CT", "axial", study.contrast_study
        else:
            seq, view, post = "T2-SE", "axial", False
        kw = {}
        desc = {"too_few_slices": "AX LIMITED", "truncated_coverage": "AX THIN LIMITED FOV",
                "oblique": "OBL REFORMAT" if study.modality == "CT" else "OBL T2 FSE",
                "tilted": "AX ANGLED", "time_series": "PERFUSION" if study.modality == "CT" else "DYN T1",
                "spacing_too_large": "AX 5MM HEAD TO THIGH"}[special]
        p = dict(proto)
        if special == "truncated_coverage":
            if len(proto["regions"]) != 1:
                return      # only single-region protocols are ever truncated
            kw["truncated"] = True
            spacings = (3.0,)
        elif special == "too_few_slices":
            kw["truncated"] = len(proto["regions"]) == 1
            spacings = (3.0,)
        elif special == "spacing_too_large":
            p = dict(proto, regions=("upper_head_neck", "lower_head_neck", "lung", "liver",
                                     "kidney", "intestine", "pelvis"), fov=(440, 480))
            desc = ("AX 5MM NECK CHEST ABDOMEN PELVIS" if study.modality == "CT"
                    else "AX T2 HASTE NECK CHEST ABDOMEN PELVIS")
            spacings = (5.0,)
        else:
            spacings = (5.0,)
        if special == "oblique":
            kw["oblique"] = True
            kw["matrix"] = 128
        if special == "tilted":
            kw["tilt_deg"] = float(rng.uniform(4, 10))
        if special == "time_series" and study.modality == "MR":
            seq = "DCE"
            post = True
        spec = _image_series(rng, pid, study, number, body, p, desc, view, seq, post, spacings, **kw)
        if special == "too_few_slices":
            keep = int(rng.integers(6, 13))
            spec.offsets = spec.offsets[:keep]
        if special == "spacing_too_large":
            spec.rows = spec.cols = 128
            spec.pixel_mm = round(460.0 / 128, 4)
            n = max(len(spec.offsets), 175)     # effective spacing ≥ 18 mm: clearly too large
            spec.offsets = tuple(round((k - (n - 1) / 2) * 5.0, 4) for k in range(n))
        if special == "time_series":
            _make_time_series(rng, spec, phases=int(rng.integers(3, 6)))
        study.series.append(spec)
        return
    if special == "sr":
        sr = _new_spec(rng, pid, study, number, kind="sr", modality="SR",
                       series_description="RADIOLOGY REPORT", body_part="", sequence="")
        study.series.append(sr)
    elif special == "rtstruct":
        rt = _new_spec(rng, pid, study, number, kind="rtstruct", modality="RTSTRUCT",
                       series_description="RTSTRUCT CONTOURS", body_part="", sequence="")
        study.series.append(rt)
    elif special in ("truncated_file", "non_dicom"):
        src = [s for s in study.series if s.kind == "image"]
        folder = src[0].folder if src else study.folder
        junk.append((special, f"{pid}_st{study.index}_junk{len(junk) + 1}", folder,
                     src[0].series_id if src else ""))


# ----------------------------------------------------------------------- rendering
def _grid_for(plan: PatientPlan) -> anatomy.LabelGrid:
    zs = []
    for st in plan.studies:
        for s in st.series:
            if s.kind == "image":
                zs.extend(protocols.z_extent(s))
    oz = plan.anatomy.origin_lps[2]
    if not zs:
        zs = [oz - 200, oz]
    return anatomy.build_labels(plan.anatomy, min(zs) - oz - 10, max(zs) - oz + 10)


def _table(spec: protocols.SeriesSpec, phase: int = 0) -> tuple[np.ndarray, float]:
    """Value per tissue and the value outside the body for one series (and phase)."""
    if spec.modality == "CT":
        enh = spec.enhancement
        if spec.phases > 1:      # perfusion: the bolus arrives over the phases
            enh *= phase / (spec.phases - 1)
        return physics.ct_table(spec.contrast and (spec.phases == 1 or phase > 0), enh), -1000.0
    # dynamic series: the first phase is acquired before the injection
    contrast = spec.contrast and (spec.phases == 1 or phase > 0)
    t = physics.mr_table(spec.pulse, spec.tr_ms, spec.te_ms, spec.ti_ms, spec.flip_deg, contrast,
                    spec.b_value)
    return t, 0.0


def _bias(spec: protocols.SeriesSpec, corner0, row_cos, col_cos, normal, offsets, rows, cols):
    """Separable receive field: exp(linear + quadratic) over the volume [n, rows, cols]."""
    coeff = np.asarray(spec.bias, float)
    e0 = (np.asarray(corner0, float) - np.asarray(spec.center_lps, float)) / 250.0
    k = np.asarray(offsets, float) / 250.0
    r = np.arange(rows) * spec.pixel_mm / 250.0
    c = np.arange(cols) * spec.pixel_mm / 250.0
    n, v, u = (np.asarray(x, float) for x in (normal, col_cos, row_cos))
    lin = (e0 @ coeff[:3] + k[:, None, None] * (n @ coeff[:3])
           + r[None, :, None] * (v @ coeff[:3]) + c[None, None, :] * (u @ coeff[:3]))
    quad = coeff[3] * (e0 @ e0 + 2 * k[:, None, None] * (e0 @ n) + 2 * r[None, :, None] * (e0 @ v)
                       + 2 * c[None, None, :] * (e0 @ u) + k[:, None, None] ** 2
                       + r[None, :, None] ** 2 + c[None, None, :] ** 2)
    return np.exp(np.clip(lin + quad, -0.4, 0.4)).astype(np.float32)


def _quant_params(spec: protocols.SeriesSpec) -> dict:
    """Stored dtype and rescale of a series (vendor style)."""
    if spec.modality == "CT":
        if spec.style == "siemens":
            return dict(dtype=np.uint16, slope=1.0, intercept=-1024.0, bits=12, signed=False)
        if spec.style == "ge":
            return dict(dtype=np.int16, slope=1.0, intercept=-1024.0, bits=16, signed=True, padding=-2000)
        return dict(dtype=np.int16, slope=1.0, intercept=0.0, bits=16, signed=True)
    if spec.style == "philips":
        slope = round(spec.scale / 1500.0 + 0.37, 5)
        return dict(dtype=np.uint16, slope=slope, intercept=0.0, bits=12, signed=False)
    return dict(dtype=np.uint16, slope=1.0, intercept=0.0, bits=16, signed=False)


def render_stored(spec: protocols.SeriesSpec, grid: anatomy.LabelGrid, body: anatomy.Anatomy) -> np.ndarray:
    """Stored pixel values of every file in instance order: [n_files, rows, cols]."""
    q = _quant_params(spec)
    rng = np.random.default_rng(spec.noise_seed)
    n_files = len(spec.offsets)
    out = np.empty((n_files, spec.rows, spec.cols), q["dtype"])
    cos_list = spec.per_file_cosines or [(spec.row_cos, spec.col_cos)] * n_files
    n_pos = n_files // max(spec.phases, 1)
    # Group files that share a geometry and phase so each group is sampled once.
    groups: dict[tuple, list[int]] = {}
    for i in range(n_files):
        phase = i // n_pos if spec.phases > 1 else 0
        key = (tuple(cos_list[i][0]), tuple(cos_list[i][1]), phase)
        groups.setdefault(key, []).append(i)
    c = np.asarray(spec.center_lps, float)
    for (rc, cc, phase), idx in groups.items():
        rc_a, cc_a = np.asarray(rc, float), np.asarray(cc, float)
        normal = np.cross(rc_a, cc_a)
        corner0 = (c - rc_a * spec.pixel_mm * (spec.cols - 1) / 2
                   - cc_a * spec.pixel_mm * (spec.rows - 1) / 2)
        offs = [spec.offsets[i] for i in idx]
        table, outside = _table(spec, phase)
        if spec.localizer and spec.modality == "CT":
            vol = _scout(spec, grid, body, corner0, rc_a, cc_a, normal)
        else:
            vol = render.sample(grid, table, body.origin_lps, corner0, rc_a, cc_a, normal, offs,
                           spec.rows, spec.cols, spec.pixel_mm, spec.pixel_mm, outside)
        if spec.modality == "CT":
            vol = vol + rng.normal(0.0, spec.noise, vol.shape).astype(np.float32)
            stored = np.round((vol - q["intercept"]) / q["slope"])
        else:
            vol = vol * _bias(spec, corner0, rc_a, cc_a, normal, offs, spec.rows, spec.cols)
            sigma = spec.noise
            re_ = vol + rng.normal(0.0, sigma, vol.shape).astype(np.float32)
            im_ = rng.normal(0.0, sigma, vol.shape).astype(np.float32)
            mag = np.sqrt(re_ * re_ + im_ * im_) * spec.scale       # Rician magnitude
            stored = np.round((mag - q["intercept"]) / q["slope"])
        lo, hi = ((-(1 << (q["bits"] - 1)), (1 << (q["bits"] - 1)) - 1) if q["signed"]
                  else (0, (1 << q["bits"]) - 1))
        stored = np.clip(stored, lo, hi)
        if spec.modality == "CT" and "padding" in q and not spec.localizer and protocols.view_of(rc, cc) == "axial":
            # Outside the reconstruction circle GE writes the padding value.
            yy, xx = np.mgrid[0:spec.rows, 0:spec.cols]
            rad = (min(spec.rows, spec.cols) - 1) / 2
            outside_circle = (yy - (spec.rows - 1) / 2) ** 2 + (xx - (spec.cols - 1) / 2) ** 2 > rad * rad
            stored[:, outside_circle] = q["padding"]
        out[idx] = stored.astype(q["dtype"])
    return out


def _scout(spec, grid, body, corner0, rc, cc, normal) -> np.ndarray:
    """CT scout: mean attenuation through the body along the normal, shown in HU-like units."""
    mu = (physics.ct_table(False) + 1000.0) / 1000.0
    depth = np.linspace(-150, 150, 24)
    vol = render.sample(grid, mu, body.origin_lps, corner0, rc, cc, normal, depth,
                   spec.rows, spec.cols, spec.pixel_mm, spec.pixel_mm, 0.0)
    return (vol.mean(axis=0, keepdims=True) * 3000.0 - 1000.0).astype(np.float32)


# ----------------------------------------------------------------------- writing
def _image_dataset(plan: PatientPlan, study: Study, spec: protocols.SeriesSpec, seed: int) -> pydicom.Dataset:
    ds = dicom_files.template("CT_small.dcm" if spec.modality == "CT" else "MR_small.dcm")
    ds.SpecificCharacterSet = "ISO_IR 100"
    for k, v in plan.identity.items():
        setattr(ds, k, v)
    ds.InstitutionName = study.institution
    ds.Manufacturer, ds.ManufacturerModelName = study.vendor[0], study.vendor[1]
    ds.StudyInstanceUID = dicom_files.uid(seed, plan.pid, study.index, "study")
    ds.SeriesInstanceUID = dicom_files.uid(seed, spec.series_id, "series")
    ds.FrameOfReferenceUID = dicom_files.uid(seed, plan.pid, study.index, "for")
    ds.StudyID = str(1000 + study.index)
    ds.AccessionNumber = f"A{int(ds.StudyInstanceUID.split('.')[-1]) % 10**8:08d}"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.date
    ds.StudyTime = "083000"
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = f"08{30 + spec.number:02d}00"
    ds.InstanceCreationDate = study.date
    ds.StudyDescription = study.description
    if spec.series_description is None:
        for kw in ("SeriesDescription", "ProtocolName"):
            if kw in ds:
                delattr(ds, kw)
    else:
        ds.SeriesDescription = spec.series_description
        ds.ProtocolName = f"{study.description.split(' W')[0]} / {spec.series_description}"[:64]
    if spec.body_part:
        ds.BodyPartExamined = spec.body_part
    ds.SeriesNumber = spec.number
    ds.PatientPosition = "HFS" if spec.modality == "MR" or "brain" in spec.regions_named else "FFS"
    ds.PatientAge = f"0{int(study.date[:4]) - int(plan.identity['PatientBirthDate'][:4]):02d}Y"
    ds.PatientWeight = "70"
    if spec.contrast:
        ds.ContrastBolusAgent = spec.agent
        if spec.agent:
            ds.ContrastBolusRoute = "IV"
    else:
        for kw in ("ContrastBolusAgent", "ContrastBolusRoute"):
            if kw in ds:
                delattr(ds, kw)
    ds.ImageType = (["ORIGINAL", "PRIMARY", "LOCALIZER"] if spec.localizer else
                    ["DERIVED", "SECONDARY", "REFORMATTED"] if spec.modality == "CT" and spec.view in ("coronal", "sagittal") and not spec.localizer
                    else ["ORIGINAL", "PRIMARY", "AXIAL"] if spec.modality == "CT" else ["ORIGINAL", "PRIMARY", "M", "ND"])
    ds.PixelSpacing = [dicom_files.ds_number(spec.pixel_mm)] * 2
    ds.SliceThickness = dicom_files.ds_number(spec.thickness_mm)
    ds.Rows, ds.Columns = spec.rows, spec.cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    q = _quant_params(spec)
    ds.BitsAllocated = 16
    ds.BitsStored = q["bits"]
    ds.HighBit = q["bits"] - 1
    ds.PixelRepresentation = 1 if q["signed"] else 0
    if spec.modality == "CT" or spec.style == "philips":
        ds.RescaleIntercept = dicom_files.ds_number(q["intercept"])
        ds.RescaleSlope = dicom_files.ds_number(q["slope"])
        if spec.modality == "CT":
            ds.RescaleType = "HU"
    if "padding" in q:
        ds.PixelPaddingValue = q["padding"]
    elif "PixelPaddingValue" in ds:
        del ds.PixelPaddingValue
    if spec.modality == "CT":
        ds.KVP = "120"
        ds.ConvolutionKernel = "STANDARD" if "BONE" not in (spec.series_description or "") else "BONE"
        ds.WindowCenter, ds.WindowWidth = ("40", "400")
        for kw in ("SpacingBetweenSlices",):
            if kw in ds:
                delattr(ds, kw)
    else:
        seqs = {"SE": ["SE"], "IR": ["IR"], "GR": ["GR"], "EPI": ["SE", "EP"]}[spec.pulse]
        ds.ScanningSequence = seqs if len(seqs) > 1 else seqs[0]
        ds.SequenceVariant = "SK" if spec.pulse != "GR" else ["SK", "SP"]
        ds.ScanOptions = "" if spec.pulse != "EPI" else "FS"
        ds.MRAcquisitionType = "2D" if spec.phases == 1 else "3D"
        ds.RepetitionTime = dicom_files.ds_number(spec.tr_ms)
        ds.EchoTime = dicom_files.ds_number(spec.te_ms)
        if spec.pulse == "IR":
            ds.InversionTime = dicom_files.ds_number(spec.ti_ms)
        ds.FlipAngle = dicom_files.ds_number(spec.flip_deg)
        ds.MagneticFieldStrength = "1.5"
        ds.EchoTrainLength = "1" if spec.pulse in ("SE", "GR") and spec.te_ms < 30 else "16"
        if spec.pulse == "EPI":
            ds.DiffusionBValue = spec.b_value
        if spec.slice_spacing_mm:
            ds.SpacingBetweenSlices = dicom_files.ds_number(spec.slice_spacing_mm)
        ds.WindowCenter, ds.WindowWidth = (str(int(spec.scale * 0.3)), str(int(spec.scale * 0.6)))
    if spec.phases > 1:
        ds.NumberOfTemporalPositions = spec.phases
    ds.ImageOrientationPatient = [dicom_files.ds_number(v) for v in spec.row_cos + spec.col_cos]
    return ds


def _write_image_series(root: str, plan: PatientPlan, study: Study, spec: protocols.SeriesSpec,
                        grid: anatomy.LabelGrid, seed: int, rng) -> list[str]:
    """Writes one file per slice; returns their paths indexed like ``spec.offsets``."""
    stored = render_stored(spec, grid, plan.anatomy)
    ds = _image_dataset(plan, study, spec, seed)
    sop_class = ds.SOPClassUID
    folder = os.path.join(root, spec.folder)
    os.makedirs(folder, exist_ok=True)
    n_files = len(spec.offsets)
    n_pos = n_files // max(spec.phases, 1)
    order = list(range(n_files))
    if not spec.instance_ascending and spec.phases == 1:
        # Instance numbers run against the slice normal (e.g. CT acquired head to feet).
        order = sorted(order, key=lambda i: -spec.offsets[i])
    elif spec.phases == 1:
        order = sorted(order, key=lambda i: spec.offsets[i])
    cos_list = spec.per_file_cosines or [(spec.row_cos, spec.col_cos)] * n_files
    paths = [""] * n_files
    c = np.asarray(spec.center_lps, float)
    if spec.enhanced:
        return _write_enhanced(folder, spec, ds, stored, order, cos_list, seed, rng)
    for inst, i in enumerate(order, start=1):
        rc, cc = (np.asarray(v, float) for v in cos_list[i])
        normal = np.cross(rc, cc)
        pos = (c - rc * spec.pixel_mm * (spec.cols - 1) / 2 - cc * spec.pixel_mm * (spec.rows - 1) / 2
               + normal * spec.offsets[i])
        sop = dicom_files.uid(seed, spec.series_id, i, "sop")
        dicom_files.set_file_meta(ds, sop_class, sop)
        ds.InstanceNumber = inst
        ds.ImagePositionPatient = [dicom_files.ds_number(v) for v in pos]
        if spec.per_file_cosines:
            ds.ImageOrientationPatient = [dicom_files.ds_number(v) for v in tuple(rc) + tuple(cc)]
        ds.SliceLocation = dicom_files.ds_number(float(pos @ normal))
        phase = i // n_pos if spec.phases > 1 else 0
        ds.AcquisitionNumber = phase + 1
        if spec.phases > 1:
            ds.TemporalPositionIdentifier = phase + 1
            ds.AcquisitionTime = f"08{30 + spec.number:02d}{(phase * 15) % 60:02d}"
        ds.PixelData = dicom_files.pixel_bytes(stored[i])
        name = _hex(rng, int(rng.integers(12, 21))).upper()
        path = os.path.join(folder, name)
        ds.save_as(path, enforce_file_format=True)
        paths[i] = path
    return paths


def _file_position(spec: protocols.SeriesSpec, rc, cc, offset: float) -> np.ndarray:
    """ImagePositionPatient (centre of the first pixel) of a slice at ``offset`` on the normal."""
    rc, cc = np.asarray(rc, float), np.asarray(cc, float)
    c = np.asarray(spec.center_lps, float)
    return (c - rc * spec.pixel_mm * (spec.cols - 1) / 2 - cc * spec.pixel_mm * (spec.rows - 1) / 2
            + np.cross(rc, cc) * offset)


def _write_enhanced(folder: str, spec: protocols.SeriesSpec, ds, stored, order, cos_list, seed, rng) -> list[str]:
    """The whole series as one Enhanced MR Image object; every file index maps to its path."""
    from data_prep.phantoms import enhanced  # noqa: PLC0415
    positions = [_file_position(spec, *cos_list[i], spec.offsets[i]) for i in order]
    orientations = [tuple(cos_list[i][0]) + tuple(cos_list[i][1]) for i in order]
    q = _quant_params(spec)
    ds = enhanced.enhanced_mr(ds, spec, order, positions, orientations, stored[order], q["slope"],
                       q["intercept"], spec.agent, dicom_files.uid(seed, spec.series_id, "enhanced", "sop"),
                       dicom_files.uid(seed, spec.series_id, "dimension"))
    path = os.path.join(folder, _hex(rng, int(rng.integers(12, 21))).upper())
    ds.save_as(path, enforce_file_format=True)
    return [path] * len(spec.offsets)


def _write_object(root: str, plan: PatientPlan, study: Study, spec: protocols.SeriesSpec, seed, rng) -> list[str]:
    name = "reportsi.dcm" if spec.kind == "sr" else "rtstruct.dcm"
    ds = dicom_files.template(name)
    for k, v in plan.identity.items():
        setattr(ds, k, v)
    ds.InstitutionName = study.institution
    ds.Modality = spec.modality
    ds.StudyInstanceUID = dicom_files.uid(seed, plan.pid, study.index, "study")
    ds.SeriesInstanceUID = dicom_files.uid(seed, spec.series_id, "series")
    ds.StudyDescription = study.description
    ds.SeriesDescription = spec.series_description
    ds.SeriesNumber = spec.number
    ds.InstanceNumber = 1
    ds.StudyDate = ds.ContentDate = study.date
    if "ReferencedFrameOfReferenceSequence" in ds:
        for item in ds.ReferencedFrameOfReferenceSequence:
            item.FrameOfReferenceUID = dicom_files.uid(seed, plan.pid, study.index, "for")
    dicom_files.set_file_meta(ds, ds.SOPClassUID, dicom_files.uid(seed, spec.series_id, 0, "sop"))
    folder = os.path.join(root, spec.folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, _hex(rng, 16).upper())
    ds.save_as(path, enforce_file_format=True)
    return [path]


def generate_patient(out_dir: str, seed: int, index: int) -> list[dict]:
    """Writes one patient's files; returns its truth rows."""
    plan = plan_patient(seed, index)
    root = os.path.join(out_dir, "dicom")
    rng = np.random.default_rng([seed, index, 1])     # file names
    grid = _grid_for(plan)
    rows = []
    written: dict[str, list[str]] = {}
    for study in plan.studies:
        for spec in study.series:
            if spec.kind == "image":
                paths = _write_image_series(root, plan, study, spec, grid, seed, rng)
            else:
                paths = _write_object(root, plan, study, spec, seed, rng)
            written[spec.series_id] = paths
            for _, part, idx in (protocols.split_parts(spec) if spec.kind == "image"
                                 else [("", spec, range(len(paths)))]):
                row = protocols.truth_row(part, plan.anatomy)
                first = min(paths[i] for i in idx)
                row["first_file"] = os.path.relpath(first, root).replace(os.sep, "/")
                rows.append(row)
    for kind, sid, folder, src in plan.junk:
        path = os.path.join(root, folder, _hex(rng, 16).upper())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if kind == "truncated_file" and src in written:
            with open(written[src][0], "rb") as f:
                data = f.read()
            data = data[:128 + 4 + 40]        # cut inside the file meta group: header unreadable
        else:
            data = (b"PACS export log\nexported by phantom gateway\nstatus: complete\n" * 3)
        with open(path, "wb") as f:
            f.write(data)
        row = dict(series_id=sid, first_file=os.path.relpath(path, root).replace(os.sep, "/"),
                   sequence="", view="", contrast="", coverage="", slice_spacing_mm="",
                   effective_spacing_mm="", status="excluded", reasons="unreadable")
        rows.append(row)
    return rows


def _collection_rows() -> list[dict]:
    return [dict(collection=c, body_locations=";".join(protocols.collection_regions(c)))
            for c in sorted(protocols.COLLECTIONS)]


def generate(out_dir: str, patients: int = 50, seed: int = 0, lits_cases: int = 4,
             workers: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Writes the phantom archive under ``out_dir``; returns a small summary dict."""
    if not 1 <= patients <= MAX_PATIENTS:
        raise ValueError(f"patients must be in [1, {MAX_PATIENTS}], got {patients}")
    os.makedirs(os.path.join(out_dir, "dicom"), exist_ok=True)
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8, patients)
    rows: list[dict] = []
    if workers <= 1:
        it = (generate_patient(out_dir, seed, i) for i in range(patients))
        results = list(_progress(it, patients, progress, "patients"))
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            futs = [ex.submit(generate_patient, out_dir, seed, i) for i in range(patients)]
            results = [f.result() for f in _progress(futs, patients, progress, "patients")]
    for r in results:
        rows.extend(r)
    rows.sort(key=lambda r: r["series_id"])
    with open(os.path.join(out_dir, "truth.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TRUTH_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in TRUTH_COLUMNS})
    with open(os.path.join(out_dir, "collections.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=("collection", "body_locations"), lineterminator="\n")
        w.writeheader()
        w.writerows(_collection_rows())
    with open(os.path.join(out_dir, "phantoms.json"), "w") as f:
        json.dump(dict(seed=seed, patients=patients, lits_cases=lits_cases,
                       generator_version=GENERATOR_VERSION), f, indent=1, sort_keys=True)
    if lits_cases:
        from data_prep.phantoms import lits  # noqa: PLC0415
        lits.write_cases(os.path.join(out_dir, "lits"), lits_cases, seed)
    n_inc = sum(r["status"] == "included" for r in rows)
    return dict(series=len(rows), included=n_inc, excluded=len(rows) - n_inc)


def _progress(it, total, enabled, desc):
    if not enabled:
        return it
    from tqdm import tqdm  # noqa: PLC0415
    return tqdm(it, total=total, desc=desc)


# ----------------------------------------------------------------------- reference
def _find_spec(plan: PatientPlan, series_id: str):
    for study in plan.studies:
        for spec in study.series:
            if spec.series_id == series_id:
                return study, spec
    raise KeyError(f"series {series_id!r} not in the phantom archive")


def reference_volume(out_dir: str, series_id: str) -> np.ndarray:
    """Physical values encoded by a series' files: float32 [n_slices, rows, cols].

    HU for CT, MR signal for MR (stored × RescaleSlope + RescaleIntercept), slices
    ascending along the normal (row cosines × column cosines), ties (time series,
    duplicated positions) in instance order. Re-rendered from the seed in
    ``out_dir/phantoms.json``; nothing large is stored on disk. Localizers with several
    orientations come in instance order.
    """
    with open(os.path.join(out_dir, "phantoms.json")) as f:
        meta = json.load(f)
    try:
        index = int(series_id.split("_")[0][1:])
    except ValueError:
        raise KeyError(f"{series_id!r} is not a phantom series id (pNNN_stS_seK)") from None
    if not 0 <= index < meta["patients"]:
        raise KeyError(f"series {series_id!r}: patient {index} not in the archive")
    plan = plan_patient(meta["seed"], index)
    part_files = None
    base_id, _, suffix = series_id.rpartition("_")
    if suffix in labels.VIEW:
        # One orientation of a multi-orientation series (a truth row of its own).
        study, spec = _find_spec(plan, base_id)
        parts = {sfx: idx for sfx, _, idx in protocols.split_parts(spec)} if spec.kind == "image" else {}
        if "_" + suffix not in parts:
            raise KeyError(f"series {series_id!r} not in the phantom archive")
        part_files = parts["_" + suffix]
    else:
        study, spec = _find_spec(plan, series_id)
    if spec.kind != "image":
        raise ValueError(f"series {series_id!r} is a {spec.kind} object, not an image series")
    grid = _grid_for(plan)
    stored = render_stored(spec, grid, plan.anatomy)
    q = _quant_params(spec)
    phys = stored.astype(np.float32) * np.float32(q["slope"]) + np.float32(q["intercept"])
    n_files = len(spec.offsets)
    if part_files is not None:
        # one orientation: its files ascending along its normal, ties in instance order
        order = sorted(part_files, key=lambda i: spec.offsets[i])
    elif spec.per_file_cosines:
        order = list(range(n_files))
    else:
        # instance order, then a stable sort along the normal
        if spec.phases == 1:
            inst = sorted(range(n_files), key=lambda i: (-spec.offsets[i] if not spec.instance_ascending
                                                         else spec.offsets[i]))
        else:
            inst = list(range(n_files))
        order = sorted(inst, key=lambda i: spec.offsets[i])
    return np.ascontiguousarray(phys[order])
