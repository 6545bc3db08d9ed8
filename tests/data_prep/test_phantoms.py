"""The phantom PACS: files decode, geometry holds, truth agrees with headers, determinism."""

from __future__ import annotations

import collections
import csv
import filecmp
import math
import os

import numpy as np
import pydicom
import pytest

from data_prep.phantoms import anatomy, pacs, physics, protocols
from radnet import labels

N_PATIENTS = 5   # 3 special cases per patient: 5 patients exercise all 14


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("phantoms"))
    pacs.generate(out, patients=N_PATIENTS, seed=0, lits_cases=2, workers=1)
    return out


def _truth(out):
    with open(os.path.join(out, "truth.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _all_files(out):
    root = os.path.join(out, "dicom")
    for d, _, files in os.walk(root):
        for name in files:
            yield os.path.relpath(os.path.join(d, name), root).replace(os.sep, "/")


ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def _group(groups, seq):
    item = groups.get(seq)
    return item[0] if item else None


def _expand(ds):
    """An Enhanced MR object as one dataset per frame, with the classic geometry tags
    taken from its functional groups (per frame, else shared) and the frame's pixels."""
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return [ds]
    shared = ds.SharedFunctionalGroupsSequence[0]
    pixels = ds.pixel_array
    frames = []
    for k, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        f = pydicom.Dataset()
        for elem in ds:
            if elem.keyword not in ("PixelData", "PerFrameFunctionalGroupsSequence"):
                f.add(elem)

        def get(seq, kw):
            for g in (fg, shared):
                item = _group(g, seq)
                if item is not None and kw in item:
                    return item[kw].value
            raise AssertionError(f"{seq}/{kw} missing in frame {k}")
        f.ImagePositionPatient = get("PlanePositionSequence", "ImagePositionPatient")
        f.ImageOrientationPatient = get("PlaneOrientationSequence", "ImageOrientationPatient")
        f.PixelSpacing = get("PixelMeasuresSequence", "PixelSpacing")
        f.RescaleSlope = get("PixelValueTransformationSequence", "RescaleSlope")
        f.RescaleIntercept = get("PixelValueTransformationSequence", "RescaleIntercept")
        f.frame_pixels = pixels[k]
        frames.append(f)
    return frames


def _pixels(ds):
    return ds.frame_pixels if hasattr(ds, "frame_pixels") else ds.pixel_array


def _read_series(out):
    """{(SeriesInstanceUID, orientation): [datasets]} of every readable file, plus unreadable paths.

    A UID whose files have several orientations (tri-plane localizer) is one series per
    orientation, as the truth has one row per orientation.
    """
    series = collections.defaultdict(list)
    unreadable = []
    for rel in _all_files(out):
        try:
            ds = pydicom.dcmread(os.path.join(out, "dicom", rel))
        except Exception:  # noqa: BLE001 - any failure to parse counts as unreadable
            unreadable.append(rel)
            continue
        if "SOPClassUID" not in ds:
            # pydicom reads a file cut inside its meta group as an empty dataset
            unreadable.append(rel)
            continue
        for f in _expand(ds):
            f.rel_path = rel
            iop = tuple(round(float(v), 3) for v in f.get("ImageOrientationPatient", []) or [])
            series[(f.SeriesInstanceUID, iop)].append(f)
    return series, unreadable


@pytest.fixture(scope="module")
def headers(archive):
    return _read_series(archive)


def _by_first_file(series):
    return {min(d.rel_path for d in dss): dss for dss in series.values()}


def test_truth_columns_and_vocabulary(archive):
    rows = _truth(archive)
    with open(os.path.join(archive, "truth.csv")) as f:
        assert f.readline().strip() == ",".join(pacs.TRUTH_COLUMNS)
    assert len({r["series_id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["sequence"] in labels.SEQUENCE + ("",)
        assert r["view"] in labels.VIEW + ("",)
        assert r["contrast"] in labels.CONTRAST + ("",)
        cov = [c for c in r["coverage"].split(";") if c]
        assert cov == [c for c in labels.COVERAGE if c in cov], r
        reasons = [x for x in r["reasons"].split(";") if x]
        assert reasons == sorted(reasons, key=labels.EXCLUSION_REASONS.index), r
        assert (r["status"] == "included") == (not reasons)
        if r["slice_spacing_mm"]:
            n_eff = float(r["effective_spacing_mm"])
            assert n_eff >= float(r["slice_spacing_mm"]) - 1e-6
            assert ("spacing_too_large" in reasons) == (n_eff > 15.0)
    found = {x for r in rows for x in r["reasons"].split(";") if x}
    assert found >= {"unreadable", "not_image", "too_few_slices", "inconsistent_geometry",
                     "missing_description", "excluded_sequence", "time_series",
                     "non_standard_view", "spacing_too_large"}, found
    included = [r for r in rows if r["status"] == "included"]
    assert {r["sequence"] for r in included} >= {"CT", "T1-SE", "T2-SE"}
    assert any(r["status"] == "included" and r["coverage"] == "" for r in rows), \
        "a truncated single-region scan (included, no region covered) is expected"


def test_every_file_reads_and_decodes(archive, headers):
    rows = _truth(archive)
    series, unreadable = headers
    junk = {r["first_file"] for r in rows if r["reasons"] == "unreadable"}
    assert set(unreadable) == junk
    first_files = _by_first_file(series)
    assert set(first_files) | junk == {r["first_file"] for r in rows}, "every file belongs to a truth row"
    n = 0
    for dss in series.values():
        for ds in dss:
            if "PixelData" in ds or hasattr(ds, "frame_pixels"):
                arr = _pixels(ds)
                assert arr.shape == (ds.Rows, ds.Columns)
                n += 1
    assert n > 200


def _normal(ds):
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    return iop[:3], iop[3:], np.cross(iop[:3], iop[3:])


def test_geometry_of_included_series(archive, headers):
    by_first = _by_first_file(headers[0])
    for r in _truth(archive):
        if r["status"] != "included":
            continue
        dss = by_first[r["first_file"]]
        rc, cc, n = _normal(dss[0])
        assert abs(rc @ cc) < 1e-5 and abs(np.linalg.norm(n) - 1) < 1e-5
        for ds in dss:
            assert np.allclose(_normal(ds)[2], n, atol=1e-5)
            assert ds.Rows == dss[0].Rows and ds.PixelSpacing == dss[0].PixelSpacing
        pos = sorted(float(np.array([float(v) for v in ds.ImagePositionPatient]) @ n) for ds in dss)
        gaps = np.diff(pos)
        spacing = float(r["slice_spacing_mm"])
        assert np.allclose(gaps, spacing, atol=2e-3), (r["series_id"], gaps[:5], spacing)
        assert len(dss) >= 16
        eff = spacing * len(dss) / 48 if len(dss) > 48 else spacing
        assert float(r["effective_spacing_mm"]) == pytest.approx(eff, abs=1e-3)
        view = ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(n)))]
        assert r["view"] == view


def _header_sequence(ds):
    if ds.Modality == "CT":
        return "CT"
    if "EchoPulseSequence" in ds:      # Enhanced MR: the pulse sequence module + shared groups
        shared = ds.SharedFunctionalGroupsSequence[0]
        modifier = shared.MRModifierSequence[0]
        ss = [{"SPIN": "SE", "GRADIENT": "GR"}[ds.EchoPulseSequence]]
        ss += ["IR"] if modifier.InversionRecovery == "YES" else []
        ss += ["EP"] if ds.EchoPlanarPulseSequence == "YES" else []
        tr = float(shared.MRTimingAndRelatedParametersSequence[0].RepetitionTime)
        te = float(shared.MREchoSequence[0].EffectiveEchoTime)
        ti = float(np.atleast_1d(modifier.InversionTimes)[0]) if "IR" in ss else None
    else:
        ss = ds.ScanningSequence
        ss = list(ss) if isinstance(ss, pydicom.multival.MultiValue) else [ss]
        tr, te = float(ds.RepetitionTime), float(ds.EchoTime)
        ti = float(ds.InversionTime) if "IR" in ss else None
    if "EP" in ss or "GR" in ss:
        return ""
    if "IR" in ss:
        if ti < 300:
            return ""       # STIR
        return "T1-FLAIR" if te < 40 else "T2-FLAIR"
    return "T1-SE" if (tr < 1000 and te < 40) else "T2-SE" if (tr > 2000 and te > 60) else "?"


def test_truth_agrees_with_headers(archive, headers):
    by_first = _by_first_file(headers[0])
    anat_regions = anatomy.REGION_Z_MM
    for r in _truth(archive):
        if r["reasons"] in ("unreadable",):
            continue
        dss = by_first[r["first_file"]]
        ds = dss[0]
        if r["reasons"] == "not_image":
            assert "PixelData" not in ds and ds.Modality in ("SR", "RTSTRUCT")
            continue
        assert r["sequence"] == _header_sequence(ds), r["series_id"]
        agent = str(ds.get("ContrastBolusAgent", "") or "").strip()
        desc = str(ds.get("SeriesDescription", "") or "")
        said = (agent != "" or "ContrastBolusAgentSequence" in ds
                or any(k in desc for k in ("C+", "POST", "GAD")))
        assert (r["contrast"] == "contrast") == said, r["series_id"]
        assert ("missing_description" in r["reasons"]) == (desc.strip() == "")
        named = protocols.named_regions(ds.get("StudyDescription"), desc, ds.get("ProtocolName"),
                                ds.get("BodyPartExamined"))
        cov = [c for c in r["coverage"].split(";") if c]
        assert set(cov) <= set(named), (r["series_id"], cov, named)
        # superior–inferior extent of the voxel box (centres ± half a voxel) from the
        # headers' corners covers each region's length
        zs = []
        n = _normal(ds)[2]
        proj = sorted({round(float(np.array([float(v) for v in d.ImagePositionPatient]) @ n), 3)
                       for d in dss})
        half = float(np.median(np.diff(proj))) / 2 if len(proj) > 1 else 0.0
        for d in dss:
            ipp = np.array([float(v) for v in d.ImagePositionPatient])
            rc, cc, _ = _normal(d)
            dr, dc = (float(v) for v in d.PixelSpacing)
            for a in (-0.5, d.Columns - 0.5):
                for b in (-0.5, d.Rows - 0.5):
                    for e in (-half, half):
                        zs.append((ipp + a * dc * rc + b * dr * cc + e * n)[2])
        extent = max(zs) - min(zs)
        for c in cov:
            lo, hi = anat_regions[c]
            assert extent >= anatomy.MIN_REGION_LENGTH_MM[c]
        if r["status"] == "included" and r["coverage"]:
            assert set(cov) == set(named), "included full scans cover all the regions they name"
        # the view is the dominant axis of the normal; beyond 20° it is also non-standard
        rc, cc, n = _normal(ds)
        assert r["view"] == ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(n)))]
        tilt = math.degrees(math.acos(min(1.0, float(np.max(np.abs(n))))))
        assert ("non_standard_view" in r["reasons"]) == (tilt > 20), (r["series_id"], tilt)
        localizer = "LOCALIZER" in list(ds.ImageType)
        if localizer:
            assert "excluded_sequence" in r["reasons"], r["series_id"]
        if "time_series" in r["reasons"]:
            assert int(ds.NumberOfTemporalPositions) > 1
        assert ("too_few_slices" in r["reasons"]) == (
            len({round(float(np.array([float(v) for v in d.ImagePositionPatient]) @ _normal(d)[2]), 2)
                 for d in dss}) < 16 or len(dss) < 16)


def test_reference_volume_matches_files(archive, headers):
    by_first = _by_first_file(headers[0])
    rows = [r for r in _truth(archive) if r["status"] == "included"]
    picked = {}
    for r in rows:   # one of each sequence and view
        picked.setdefault((r["sequence"], r["view"]), r)
    # one orientation of a tri-plane localizer is a series (and a truth row) of its own
    parts = [r for r in _truth(archive) if r["series_id"].endswith(("_coronal", "_sagittal"))]
    assert parts and all(len(by_first[r["first_file"]]) == 1 for r in parts)
    for r in list(picked.values()) + parts[:2]:
        dss = by_first[r["first_file"]]
        n = _normal(dss[0])[2]
        dss = sorted(dss, key=lambda d: float(np.array([float(v) for v in d.ImagePositionPatient]) @ n))
        files = np.stack([_pixels(d).astype(np.float32) * float(d.get("RescaleSlope", 1))
                          + float(d.get("RescaleIntercept", 0)) for d in dss])
        ref = pacs.reference_volume(archive, r["series_id"])
        assert ref.dtype == np.float32 and ref.shape == files.shape
        np.testing.assert_allclose(ref, files, atol=1e-3)
    with pytest.raises(KeyError):
        pacs.reference_volume(archive, "p999_st1_se1")


def test_same_seed_same_bytes_other_seed_differs(archive, tmp_path):
    a, b, c = (str(tmp_path / x) for x in "abc")
    pacs.generate(a, patients=2, seed=0, lits_cases=0, workers=2)
    pacs.generate(b, patients=2, seed=0, lits_cases=0, workers=1)
    pacs.generate(c, patients=2, seed=1, lits_cases=0, workers=1)
    with open(os.path.join(a, "truth.csv"), "rb") as fa, open(os.path.join(b, "truth.csv"), "rb") as fb:
        truth_a = fa.read()
        assert truth_a == fb.read()
    files_a = sorted(_all_files(a))
    assert files_a == sorted(_all_files(b))
    _, mismatch, errors = filecmp.cmpfiles(os.path.join(a, "dicom"), os.path.join(b, "dicom"),
                                           files_a, shallow=False)
    assert not mismatch and not errors
    # Patients do not depend on how many were generated: p000/p001 equal the fixture's.
    big = [r for r in _truth(archive) if r["series_id"][:4] in ("p000", "p001")]
    assert big == _truth(a)
    with open(os.path.join(c, "truth.csv"), "rb") as fc:
        assert fc.read() != truth_a


def test_fake_identities_only(headers):
    series, _ = headers
    fake = set(pacs.FAKE_IDENTITIES)
    for dss in series.values():
        for ds in dss:
            for kw in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName"):
                assert str(ds.get(kw, "")) in fake, (kw, ds.get(kw))
            for elem in ds.iterall():
                if elem.VR == "PN" and elem.keyword != "PatientName":
                    assert not str(elem.value or "").strip(), elem
    # patients are told apart by their IDs
    ids = {ds.PatientID for dss in series.values() for ds in dss}
    assert len(ids) == N_PATIENTS


def test_collections_csv(archive):
    with open(os.path.join(archive, "collections.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    names = {r["collection"] for r in rows}
    tops = {p.split("/")[0] for p in _all_files(archive)}
    assert tops <= names
    for r in rows:
        assert r["collection"].startswith("PHANTOM-")
        assert set(r["body_locations"].split(";")) <= set(labels.COVERAGE)


def test_tissue_contrast_follows_physics():
    t1 = physics.mr_table("SE", 500, 12, None, 90, False)
    t2 = physics.mr_table("SE", 4000, 100, None, 90, False)
    flair = physics.mr_table("IR", 9000, 120, 2500, 90, False)
    t1_gad = physics.mr_table("SE", 500, 12, None, 90, True)
    assert t1[anatomy.FAT] > t1[anatomy.WM] > t1[anatomy.GM] > t1[anatomy.CSF]           # T1: fat bright, fluid dark
    assert t2[anatomy.CSF] > t2[anatomy.GM] > t2[anatomy.WM]                        # T2: fluid bright
    assert flair[anatomy.CSF] < 0.3 * flair[anatomy.WM]                       # FLAIR: fluid suppressed
    assert t1_gad[anatomy.BLOOD] > 3 * t1[anatomy.BLOOD] and t1_gad[anatomy.KIDNEY] > 1.2 * t1[anatomy.KIDNEY]
    assert t1_gad[anatomy.WM] == t1[anatomy.WM]                               # blood–brain barrier
    ct, ct_c = physics.ct_table(False), physics.ct_table(True)
    assert 100 <= ct_c[anatomy.BLOOD] - ct[anatomy.BLOOD] <= 200 and ct_c[anatomy.KIDNEY] - ct[anatomy.KIDNEY] >= 100
    assert ct[anatomy.AIR] == -1000 and ct[anatomy.FAT] < 0 < ct[anatomy.MUSCLE] < ct[anatomy.BONE]


def test_lits_cases(archive):
    import nibabel as nib
    for k in range(2):
        vol = nib.load(os.path.join(archive, "lits", f"volume-{k}.nii"))
        seg = nib.load(os.path.join(archive, "lits", f"segmentation-{k}.nii"))
        assert isinstance(vol, nib.Nifti1Image) and vol.shape == seg.shape
        assert np.allclose(vol.affine, seg.affine)
        assert vol.shape[:2] == (128, 128) and 60 <= vol.shape[2] <= 300
        assert nib.aff2axcodes(vol.affine)[:2] == ("L", "P")
        dz = abs(vol.affine[2, 2])
        assert 0.7 <= dz <= 5.0
        s = np.asarray(seg.dataobj)
        v = np.asarray(vol.dataobj)
        assert set(np.unique(s)) == {0, 1, 2}
        assert 80 < v[s == 1].mean() < 200                 # enhanced liver, HU
        assert v[s == 2].mean() < v[s == 1].mean() - 30    # hypodense tumour
        # the whole liver lies inside the scan: no liver on the first or last slice
        assert not s[:, :, 0].any() and not s[:, :, -1].any()
    d0 = abs(nib.load(os.path.join(archive, "lits", "volume-0.nii")).affine[2, 2])
    d1 = abs(nib.load(os.path.join(archive, "lits", "volume-1.nii")).affine[2, 2])
    assert d0 != d1


def test_named_regions_table():
    assert protocols.named_regions("CT CHEST ABD PELVIS W CONTRAST") == (
        "lung", "liver", "kidney", "intestine", "pelvis")
    assert protocols.named_regions("MRI BRAIN W/WO") == ("brain",)
    assert protocols.named_regions("CT NECK SOFT TISSUE") == ("upper_head_neck", "lower_head_neck")
    assert protocols.named_regions("CT SINUS WO CONTRAST") == ("upper_head_neck",)
    assert protocols.named_regions("CT ABDOMEN W CONTRAST") == ("liver", "kidney")
    assert protocols.named_regions("AX T2 FSE") == ()


def test_generate_rejects_bad_patient_count(tmp_path):
    with pytest.raises(ValueError, match="patients"):
        pacs.generate(str(tmp_path), patients=0)
    # 100 slices at 5 mm resized to 48: 5 × 100 / 48 mm; 30 slices are padded, not stretched.
    assert protocols.effective_spacing(5.0, 100) == pytest.approx(5.0 * 100 / 48)
    assert protocols.effective_spacing(5.0, 30) == pytest.approx(5.0)


def test_enhanced_mr_objects(archive, headers):
    """Some MR series are one Enhanced MR object: per-frame plane position/orientation
    and pixel value transformation, shared pixel measures, no classic per-slice tags."""
    by_first = _by_first_file(headers[0])
    found = 0
    for r in _truth(archive):
        if r["reasons"] in ("unreadable", "not_image"):
            continue
        ds = pydicom.dcmread(os.path.join(archive, "dicom", r["first_file"]))
        if ds.SOPClassUID != ENHANCED_MR:
            continue
        found += 1
        assert ds.file_meta.MediaStorageSOPClassUID == ENHANCED_MR
        for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                   "ScanningSequence", "RepetitionTime", "EchoTime", "RescaleSlope"):
            assert kw not in ds, kw
        n = int(ds.NumberOfFrames)
        assert ds.pixel_array.shape == (n, ds.Rows, ds.Columns)
        assert len(ds.PerFrameFunctionalGroupsSequence) == n
        shared = ds.SharedFunctionalGroupsSequence[0]
        assert "PixelMeasuresSequence" in shared
        for fg in ds.PerFrameFunctionalGroupsSequence:
            for seq in ("PlanePositionSequence", "PlaneOrientationSequence",
                        "PixelValueTransformationSequence", "FrameContentSequence"):
                assert seq in fg, seq
        ranks = sorted(fg.FrameContentSequence[0].InStackPositionNumber
                       for fg in ds.PerFrameFunctionalGroupsSequence)
        assert ranks == list(range(1, n + 1))
        frames = by_first[r["first_file"]]
        assert len(frames) == n and not (r["slice_spacing_mm"] == "")
        normal = _normal(frames[0])[2]
        frames = sorted(frames, key=lambda d: float(np.array([float(v) for v in d.ImagePositionPatient]) @ normal))
        phys = np.stack([_pixels(d).astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept)
                         for d in frames])
        np.testing.assert_allclose(pacs.reference_volume(archive, r["series_id"]), phys, atol=1e-3)
    assert found >= 1


def test_index_reproduces_truth(archive, tmp_path):
    """The archive index (data_prep.index) labels every truth row as the truth does
    (the 50-patient run of docs/phantoms.md: the same, 1.0 on every column)."""
    from configs import index as index_config
    from data_prep import index
    from data_prep.phantoms import check as phantom_check
    salt = tmp_path / "salt"
    salt.write_text("phantom-truth-check-salt-0123456789\n")
    out = tmp_path / "index"
    index.run_index(os.path.join(archive, "dicom"), str(out), index_config.get_config(), workers=1,
                    salt_file=str(salt), progress=False)
    summary, lines = phantom_check.compare(os.path.join(archive, "truth.csv"), str(out))
    assert summary["merged_series"] == summary["unmatched_index_series"] == 0, lines
    assert summary["missing_first_files"] == 0, lines
    for col in phantom_check.LABEL_COLUMNS:
        assert summary[col] == 1.0, (col, [x for x in lines if f" {col}:" in x])
    assert summary["slice_spacing"] == 1.0, lines
