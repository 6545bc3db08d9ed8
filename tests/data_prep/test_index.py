"""The index end to end on real DICOM files: pydicom's bundled files and series written here."""

import csv
import json
import os
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from configs import index as index_config
from data_prep import index
from data_prep.index import outputs, reading
from data_prep.index.salt import load_salt

FAKE = {"PatientName": "Zzfake^Persona", "PatientID": "FAKEID-998877",
        "PatientBirthDate": "19230405", "InstitutionName": "Nowhere Fake Hospital"}
TEST_FILES = os.path.dirname(pydicom.data.get_testdata_file("CT_small.dcm"))


@pytest.fixture
def salt(tmp_path):
    path = tmp_path / "salt"
    path.write_text("0123456789abcdef0123456789abcdef\n")
    return str(path)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(root, out, salt, workers=0, **kw):
    cfg = kw.pop("cfg", None) or index_config.get_config()
    summary = index.run_index(str(root), str(out), cfg, workers=workers, salt_file=salt,
                              progress=False, **kw)
    files = {r["path"]: r for r in read_csv(out / "files.csv")}
    series = {r["series_key"]: r for r in read_csv(out / "series.csv")}
    return summary, files, series


def series_of(files, series, path):
    return series[files[path]["series_key"]]


def write_series(folder, n, *, modality="CT", iop=(1, 0, 0, 0, 1, 0), spacing=2.5,
                 rows=4, cols=4, pixel_spacing=(1.0, 1.0), desc="CT CHEST", study_desc="",
                 uid=None, study_uid=None, patient_id=None, tr=None, te=None, ti=None, ss=None,
                 agent=None, acq=None, positions=None, temporal=None, origin=(0.0, 0.0, 0.0),
                 prefix="f"):
    """Writes one classic single-frame series (tiny images), returns its file paths."""
    os.makedirs(folder, exist_ok=True)
    uid = uid or generate_uid()
    study_uid = study_uid or generate_uid()
    row, col = np.array(iop[:3], float), np.array(iop[3:], float)
    normal = np.cross(row, col)
    paths = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ("1.2.840.10008.5.1.4.1.1.2" if modality == "CT"
                                        else "1.2.840.10008.5.1.4.1.1.4")
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = os.path.join(folder, f"{prefix}{i:03d}")
        ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID = uid, study_uid
        for k, v in FAKE.items():
            setattr(ds, k, v)
        if patient_id:
            ds.PatientID = patient_id
        ds.Modality = modality
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        if desc is not None:
            ds.SeriesDescription = desc
        ds.StudyDescription = study_desc
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        p = positions[i] if positions is not None else i * spacing
        ds.ImagePositionPatient = [f"{v:.4f}" for v in np.array(origin) + p * normal]
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = spacing
        ds.InstanceNumber = i + 1
        ds.AcquisitionNumber = acq[i] if acq else 1
        if temporal:
            ds.TemporalPositionIdentifier = temporal[i]
        if modality == "MR":
            ds.ScanningSequence = ss or "SE"
            ds.RepetitionTime, ds.EchoTime = tr, te
            if ti is not None:
                ds.InversionTime = ti
        if agent is not None:
            ds.ContrastBolusAgent = agent
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.full((rows, cols), i, np.uint16).tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def rel(root, paths):
    return [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]


# --- pydicom's bundled real files ------------------------------------------------------

@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundled")
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_truncated.dcm", "test-SR.dcm",
                 "rtplan.dcm", "rtstruct.dcm", "rtdose.dcm", "rtplan_truncated.dcm",
                 "README.txt"):
        shutil.copy(os.path.join(TEST_FILES, name), root / name)
    shutil.copytree(os.path.join(TEST_FILES, "dicomdirtests"), root / "dicomdirtests")
    # A file cut inside its header, and a zero-length file.
    data = open(os.path.join(TEST_FILES, "CT_small.dcm"), "rb").read()
    (root / "cut_header").write_bytes(data[:700])
    (root / "cut_meta").write_bytes(data[:172])     # cut inside the File Meta Information
    (root / "empty").write_bytes(b"")
    salt = tmp_path_factory.mktemp("salt") / "salt"
    salt.write_text("fedcba9876543210fedcba9876543210\n")
    out = tmp_path_factory.mktemp("out")
    return root, out, run(root, out, str(salt), workers=2)


def test_bundled_ct_and_mr(bundled):
    _, _, (_, files, series) = bundled
    ct = series_of(files, series, "CT_small.dcm")
    assert (ct["modality"], ct["sequence"], ct["view"], ct["contrast"]) == \
        ("CT", "CT", "axial", "contrast")
    assert "ContrastBolusAgent" in ct["provenance"]
    mr = series_of(files, series, "MR_small.dcm")
    assert (mr["sequence"], mr["view"]) == ("T2-SE", "axial")
    assert "TR=4000 TE=240" in mr["provenance"]


def test_bundled_scouts_and_localizers(bundled):
    _, _, (_, files, series) = bundled
    sag = series_of(files, series, "dicomdirtests/98892001/CT2N/6293")
    cor = series_of(files, series, "dicomdirtests/98892001/CT2N/6924")
    assert sag["series_key"] != cor["series_key"]            # one UID, two orientations
    assert (sag["view"], cor["view"]) == ("sagittal", "coronal")
    for s in (sag, cor):
        assert s["reasons"] == "too_few_slices;excluded_sequence"
        assert "LOCALIZER" in s["provenance"]
    views = {series_of(files, series, f"dicomdirtests/98892003/MR2/{n}")["view"]
             for n in ("4950", "4981", "5011")}                 # tri-plane pilot
    assert views == {"coronal", "axial", "sagittal"}
    loc = series_of(files, series, "dicomdirtests/98892003/MR1/4919")
    assert "excluded_sequence" in loc["reasons"] and loc["view"] == "sagittal"
    assert "gradient echo" in loc["provenance"]
    mip = series_of(files, series, "dicomdirtests/98892003/MR700/4467")
    assert "excluded_sequence" in mip["reasons"] and "PROJECTION" in mip["provenance"]


def test_bundled_not_image_and_unreadable(bundled):
    _, _, (summary, files, series) = bundled
    for name in ("test-SR.dcm", "rtplan.dcm", "rtstruct.dcm", "rtdose.dcm"):
        assert files[name]["reason"] == "not_image", name
        assert series_of(files, series, name)["reasons"] == "not_image"
    # A DICOMDIR belongs to no series.
    assert files["dicomdirtests/DICOMDIR"]["reason"] == "not_image"
    assert files["dicomdirtests/DICOMDIR"]["series_key"] == ""
    for name in ("MR_truncated.dcm", "cut_header", "cut_meta", "empty", "README.txt"):
        assert files[name]["status"] == "excluded"
        assert files[name]["reason"] == "unreadable", name
    assert files["README.txt"]["series_key"] == ""
    assert summary["files"]["by_reason"]["unreadable"] >= 4


def test_every_file_exactly_once(bundled):
    root, out, _ = bundled
    listed = [r["path"] for r in read_csv(out / "files.csv")]
    on_disk = sorted(reading.walk(str(root)))
    assert listed == on_disk and len(set(listed)) == len(listed)


def test_no_identity_in_outputs(bundled):
    root, out, _ = bundled
    ct = pydicom.dcmread(os.path.join(TEST_FILES, "CT_small.dcm"))
    secrets_in_input = [str(ct.PatientName), str(ct.PatientID), str(ct.SeriesInstanceUID),
                        str(ct.StudyInstanceUID), str(ct.SOPInstanceUID)]
    for dirpath, _, names in os.walk(out):
        for name in names:
            text = open(os.path.join(dirpath, name), encoding="utf-8").read()
            for s in secrets_in_input:
                assert s not in text, (name, s)


# --- series written here ----------------------------------------------------------------

def test_labels_geometry_split_and_privacy(tmp_path, salt):
    root, out = tmp_path / "dicom", tmp_path / "out"
    chest = write_series(root / "a", 60, desc="CT CHEST C+", spacing=5.0, rows=8, cols=8,
                         pixel_spacing=(0.5, 0.5))
    t1 = write_series(root / "b", 20, modality="MR", desc="AX T1 SE BRAIN", tr=550.0, te=14.0,
                      spacing=7.0, rows=8, cols=8, pixel_spacing=(30.0, 30.0))
    few = write_series(root / "b", 10, desc="CT HEAD", prefix="few")      # folder shared
    nodesc = write_series(root / "c", 20, desc=None)
    wide = write_series(root / "c", 200, desc="CT CHEST", spacing=5.0, prefix="w")  # 5*200/48
    summary, files, series = run(root, out, salt)
    s = series_of(files, series, rel(root, chest)[0])
    assert (s["sequence"], s["view"], s["contrast"], s["status"]) == \
        ("CT", "axial", "contrast", "included")
    assert s["n_files"] == "60" and s["n_slices"] == "60"
    assert float(s["slice_spacing_mm"]) == pytest.approx(5.0)
    assert float(s["effective_spacing_mm"]) == pytest.approx(5.0 * 60 / 48)
    assert float(s["extent_mm"]) == pytest.approx(295.0)
    assert s["coverage"] == "lung"                           # 300 mm >= 220
    assert (s["rows"], s["columns"], s["pixel_spacing_mm"]) == ("8", "8", "0.5;0.5")
    assert s["orientation"] == "1;0;0;0;1;0"
    assert s["split"] in ("train", "val", "test")
    m = series_of(files, series, rel(root, t1)[0])
    assert (m["sequence"], m["view"], m["coverage"], m["status"]) == \
        ("T1-SE", "axial", "brain", "included")           # 8 × 30 mm in-plane, 140 mm in z
    assert series_of(files, series, rel(root, few)[0])["reasons"] == "too_few_slices"
    assert series_of(files, series, rel(root, nodesc)[0])["reasons"] == "missing_description"
    w = series_of(files, series, rel(root, wide)[0])
    assert w["reasons"] == "spacing_too_large"
    assert float(w["effective_spacing_mm"]) == pytest.approx(5.0 * 200 / 48, rel=1e-5)
    assert summary["funnel"][0] == {"reason": "unreadable", "series": 0}
    # One patient (same fake ID everywhere): one split.
    assert len({r["split"] for r in series.values()}) == 1
    for dirpath, _, names in os.walk(out):
        for name in names:
            text = open(os.path.join(dirpath, name), encoding="utf-8").read()
            for v in FAKE.values():
                assert v not in text, (name, v)


def test_uid_mixing_orientation_and_size_is_split_time_series_is_not(tmp_path, salt):
    root, out = tmp_path / "dicom", tmp_path / "out"
    uid, study = generate_uid(), generate_uid()
    ax = write_series(root, 20, uid=uid, study_uid=study, prefix="ax")
    cor = write_series(root, 20, uid=uid, study_uid=study, iop=(1, 0, 0, 0, 0, -1), prefix="cor")
    big = write_series(root, 20, uid=uid, study_uid=study, rows=6, prefix="big")
    ts_uid = generate_uid()
    ts = write_series(root, 40, uid=ts_uid, study_uid=study, positions=[i % 20 * 2.5 for i in range(40)],
                      acq=[1 + i // 20 for i in range(40)], prefix="ts")
    dup = write_series(root, 20, positions=[0, 2.5, 2.5] + [2.5 * i for i in range(3, 20)],
                       prefix="dup")
    gap = write_series(root, 20, positions=[2.5 * i for i in range(20) if i != 7] + [60],
                       prefix="gap")
    _, files, series = run(root, out, salt)
    keys = {files[p]["series_key"] for p in rel(root, ax + cor + big)}
    assert len(keys) == 3
    assert series_of(files, series, rel(root, cor)[0])["view"] == "coronal"
    for group in (ax, cor, big):
        assert series_of(files, series, rel(root, group)[0])["status"] == "included"
    t = series_of(files, series, rel(root, ts)[0])
    assert len({files[p]["series_key"] for p in rel(root, ts)}) == 1
    assert t["reasons"] == "time_series" and t["n_slices"] == "20" and t["n_files"] == "40"
    assert series_of(files, series, rel(root, dup)[0])["reasons"] == "inconsistent_geometry"
    assert series_of(files, series, rel(root, gap)[0])["reasons"] == "inconsistent_geometry"


def test_disjoint_acquisitions_of_one_scan_stay_together(tmp_path, salt):
    root, out = tmp_path / "dicom", tmp_path / "out"
    step = write_series(root, 32, acq=[1 + i // 8 for i in range(32)])   # 4 rotations of 8
    uid, study = generate_uid(), generate_uid()
    two = write_series(root, 20, uid=uid, study_uid=study, spacing=2.0, prefix="s1", acq=[1] * 20)
    two += write_series(root, 20, uid=uid, study_uid=study, spacing=5.0, origin=(0, 0, 200),
                        prefix="s2", acq=[2] * 20)
    _, files, series = run(root, out, salt)
    s = series_of(files, series, rel(root, step)[0])
    assert s["status"] == "included" and s["n_slices"] == "32"
    assert len({files[p]["series_key"] for p in rel(root, two)}) == 2     # two separate scans


def test_enhanced_multiframe_mr(tmp_path, salt):
    root, out = tmp_path / "dicom", tmp_path / "out"
    os.makedirs(root)
    n, rows, cols = 20, 4, 4
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"      # Enhanced MR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = str(root / "enhanced")
    ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "P1", "MR"
    ds.SeriesDescription, ds.ImageType = "sag T2 brain", ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.EchoPulseSequence, ds.NumberOfFrames = "SPIN", n
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = Dataset()
    orient, measures, timing, echo = Dataset(), Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]          # sagittal
    measures.PixelSpacing, measures.SliceThickness = [40.0, 1.0], 3.0
    timing.RepetitionTime = 4500.0
    echo.EffectiveEchoTime = 100.0
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    shared.MREchoSequence = Sequence([echo])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for i in range(n):
        f, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [-30.0 + 3.0 * i, 0.0, 0.0]
        f.PlanePositionSequence = Sequence([pos])
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.zeros((n, rows, cols), np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    _, files, series = run(root, out, salt)
    s = series_of(files, series, "enhanced")
    assert (s["sequence"], s["view"], s["n_files"], s["n_slices"]) == ("T2-SE", "sagittal", "1", "20")
    assert float(s["slice_spacing_mm"]) == pytest.approx(3.0)
    assert s["status"] == "included" and s["coverage"] == "brain"   # 4 rows × 40 mm = 160 mm z


def test_resume_after_kill_and_no_reparse(tmp_path, salt):
    root, out = tmp_path / "dicom", tmp_path / "out"
    write_series(root, 30)
    summary, files1, _ = run(root, out, salt, workers=2)
    assert summary["headers_parsed"] == 30
    cache = out / "cache" / "headers.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    # A kill mid-write: 10 records lost, the last one cut in half.
    cache.write_text("".join(lines[:-10]) + lines[-10][: len(lines[-10]) // 2])
    summary, files2, _ = run(root, out, salt, workers=2)
    assert summary["headers_parsed"] == 10
    assert files1 == files2
    summary, _, _ = run(root, out, salt)
    assert summary["headers_parsed"] == 0
    # A changed file is read again.
    victim = root / sorted(os.listdir(root))[0]
    os.utime(victim, ns=(1, 1))
    assert run(root, out, salt)[0]["headers_parsed"] == 1


def test_keys_depend_on_the_salt(tmp_path, salt):
    root = tmp_path / "dicom"
    write_series(root, 20)
    _, f1, _ = run(root, tmp_path / "o1", salt)
    other = tmp_path / "salt2"
    other.write_text("another-secret-of-enough-length\n")
    _, f2, _ = run(root, tmp_path / "o2", str(other))
    k1 = {r["series_key"] for r in f1.values()}
    k2 = {r["series_key"] for r in f2.values()}
    assert len(k1) == 1 and k1.isdisjoint(k2)
    new = tmp_path / "sub" / "new_salt"
    load_salt(str(new))                        # created when missing, private
    assert new.exists() and (new.stat().st_mode & 0o777) == 0o600


def test_overrides_review_and_heldout_collection(tmp_path, salt):
    root, out = tmp_path / "dicom", tmp_path / "out"
    s1 = write_series(root / "COLL_A" / "p1", 20, modality="MR", desc="AX", tr=None, te=None,
                      patient_id="A1")
    write_series(root / "COLL_B" / "p2", 20, desc="Series 2", patient_id="B2")
    coll = tmp_path / "collections.csv"
    coll.write_text("collection,regions\nCOLL_B,liver;kidney\n")
    cfg = index_config.get_config("heldout_collections=COLL_A")
    _, files, series = run(root, out, salt, cfg=cfg, collections_csv=str(coll))
    key = files[rel(root, s1)[0]]["series_key"]
    assert series[key]["reasons"] == "excluded_sequence" and series[key]["split"] == "test"
    review = read_csv(out / "review.csv")
    assert any(r["series_key"] == key and r["column"] == "sequence" for r in review)
    b = series_of(files, series, "COLL_B/p2/f000")
    assert "collection" in b["provenance"]
    over = tmp_path / "overrides.csv"
    over.write_text(f"series_key,column,value\n{key},sequence,T1-SE\n{key},status,included\n")
    _, files, series = run(root, out, salt, cfg=cfg, collections_csv=str(coll),
                           overrides_csv=str(over))
    assert (series[key]["sequence"], series[key]["status"], series[key]["reasons"]) == \
        ("T1-SE", "included", "")
    assert "override sequence=T1-SE" in series[key]["provenance"]
    assert files[rel(root, s1)[0]]["status"] == "included"
    over.write_text(f"series_key,column,value\n{key},sequence,T3\n")
    with pytest.raises(ValueError, match="T3"):
        run(root, out, salt, overrides_csv=str(over))


def test_summary_funnel_counts_each_series_once(tmp_path, salt):
    root, out = tmp_path / "dicom", tmp_path / "out"
    write_series(root, 5, desc=None)                 # too_few_slices + missing_description
    write_series(root, 20, prefix="ok")
    summary, _, series = run(root, out, salt)
    funnel = {x["reason"]: x["series"] for x in summary["funnel"]}
    assert funnel["too_few_slices"] == 1 and funnel["missing_description"] == 0
    assert summary["series_with_reason"]["missing_description"] == 1
    assert sum(funnel.values()) + summary["series"]["included"] == len(series)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["series"] == summary["series"]
    assert "exclusion funnel" in outputs.format_summary(summary)


def test_a_missing_dicom_root_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "data_prep.index",
                          f"--dicom_root={tmp_path}/nowhere", f"--out={tmp_path}/out"],
                         capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__)))))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"radnet: error: --dicom_root '{tmp_path}/nowhere' is not a directory" in out.stderr
