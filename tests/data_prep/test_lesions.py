"""Mining RECIST measurements on the phantom archive's lesion studies: phantom → index →
python -m data_prep.lesions (GSPS and SR read with pydicom/highdicom) → lesions.csv,
annotations.csv and the lesion dataset, checked against lesion_truth.csv."""

import csv
import os
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from configs import index as index_config
from configs import lesions as lesions_config
from data_prep import index
from data_prep.lesions import dataset as lesion_dataset
from data_prep.lesions import mine
from data_prep.phantoms import lesions as phantom_lesions
from radnet.data import deeplesion as dl
from radnet.detection import boxes as box_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECRET = b"lesion-test-salt-0123456789abcdef"
# truth kind → the reason its annotation items get
DISTRACTOR_REASONS = {"arrow": "arrow", "text": "text", "single_line": "single_line",
                      "ellipse": "ellipse", "non_perpendicular": "non_perpendicular_pair",
                      "unresolved_reference": "unresolved_reference"}


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    root = tmp_path_factory.mktemp("lesion_archive")
    dicom = str(root / "dicom")
    # 6 studies: every distractor kind twice or more, GSPS and SR measurements
    phantom_lesions.generate(dicom, str(root / "lesion_truth.csv"), 6, seed=1)
    # two real SR files of other kinds: a Basic Text SR and a Comprehensive SR without a
    # TID 1500 measurement report
    os.makedirs(os.path.join(dicom, "OTHER"))
    for name in ("reportsi.dcm", "test-SR.dcm"):
        shutil.copy(get_testdata_file(name), os.path.join(dicom, "OTHER", name))
    salt = root / "salt"
    salt.write_bytes(SECRET + b"\n")
    index.run_index(dicom, str(root / "index"), index_config.get_config(), workers=0,
                    salt_file=str(salt), progress=False)
    cfg = lesions_config.get_config()
    summary, archive = mine.mine(dicom, str(root / "index"), str(root / "out"), cfg, SECRET,
                                 return_archive=True)
    ds_summary = lesion_dataset.build(str(root / "out" / "lesions.csv"), archive,
                                      str(root / "ds"), cfg.dataset)
    return root, summary, ds_summary


def test_every_recist_measurement_is_recovered(mined):
    root, summary, _ = mined
    truth = _csv(root / "lesion_truth.csv")
    files = {r["path"]: r["series_key"] for r in _csv(root / "index" / "files.csv")}
    lesions = _csv(root / "out" / "lesions.csv")
    recist = [t for t in truth if t["kind"] == "recist"]
    assert {t["source"] for t in recist} == {"gsps", "sr"}
    assert len(lesions) == len(recist) == summary["lesions"]  # no distractor became one
    unmatched = list(lesions)
    for t in recist:
        tbox = [float(t[k]) for k in ("x1", "y1", "x2", "y2")]
        same_slice = [m for m in unmatched if m["Series_key"] == files[t["image_file"]]
                      and int(m["Key_slice_index"]) == int(t["key_slice_index"])]
        ious = [box_lib.iou([tbox], [[float(v) for v in m["Bounding_boxes"].split(",")]])[0, 0]
                for m in same_slice]
        assert ious and max(ious) >= 0.95, (t, ious)
        m = same_slice[int(np.argmax(ious))]
        unmatched.remove(m)
        long_mm = float(m["Lesion_diameters_mm"].split(",")[0])
        assert long_mm == pytest.approx(float(t["long_mm"]), abs=1.0)
        if t["source"] == "sr":  # the SR's finding site gives the coarse type
            assert int(m["Coarse_lesion_type"]) == int(t["lesion_type"])
    assert not unmatched


def test_every_annotation_item_has_a_row_with_a_reason(mined):
    root, _, _ = mined
    truth = _csv(root / "lesion_truth.csv")
    rows = _csv(root / "out" / "annotations.csv")
    assert all(r["status"] in ("lesion", "not_lesion", "error") for r in rows)
    assert all(r["reason"] for r in rows if r["status"] != "lesion")
    assert all(r["lesion_key"] for r in rows if r["status"] == "lesion")
    # counted independently: every graphic/text object of every GSPS, every SR group
    expected = Counter()
    for obj in sorted({t["object_file"] for t in truth}):
        ds = pydicom.dcmread(os.path.join(root, "dicom", obj))
        if ds.Modality == "PR":
            expected[obj] = sum(len(a.get("GraphicObjectSequence", []))
                                + len(a.get("TextObjectSequence", []))
                                for a in ds.GraphicAnnotationSequence)
        else:  # SR: a RECIST measurement is two groups (long, short), a distractor one
            expected[obj] = sum(2 if t["kind"] == "recist" else 1
                                for t in truth if t["object_file"] == obj)
    got = Counter(r["object_path"] for r in rows)
    other = {k: v for k, v in got.items() if k.startswith("OTHER/")}
    assert {k: v for k, v in got.items() if k not in other} == expected
    assert set(other) == {"OTHER/reportsi.dcm", "OTHER/test-SR.dcm"}
    for r in rows:
        if r["object_path"].startswith("OTHER/"):
            assert r["status"] in ("not_lesion", "error") and r["reason"], r
    assert [r["reason"] for r in rows if r["object_path"] == "OTHER/reportsi.dcm"] == [
        "basic_text_sr"]
    # every distractor accounted for by its reason, on its object
    reasons = Counter((r["object_path"], r["reason"]) for r in rows)
    seen = set()
    for t in truth:
        if t["kind"] == "recist":
            continue
        seen.add(t["kind"])
        assert reasons[(t["object_file"], DISTRACTOR_REASONS[t["kind"]])] > 0, t
    assert seen == set(DISTRACTOR_REASONS)


def test_no_identifier_in_the_outputs(mined):
    root, _, _ = mined
    secrets = set()
    for dirpath, _, names in os.walk(root / "dicom"):
        for name in names:
            ds = pydicom.dcmread(os.path.join(dirpath, name), stop_before_pixels=True)
            for kw in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID",
                       "SeriesInstanceUID", "SOPInstanceUID", "AccessionNumber",
                       "FrameOfReferenceUID"):
                if kw in ds and str(ds.get(kw)):
                    secrets.add(str(ds.get(kw)))
    for name in ("lesions.csv", "annotations.csv", "summary.json"):
        text = open(root / "out" / name).read()
        leaked = [s for s in secrets if s in text]
        assert not leaked, (name, leaked[:3])
    for name in ("images.csv", "lesions.csv"):
        text = open(root / "ds" / name).read()
        assert not [s for s in secrets if s in text]


def test_dataset_from_mined_lesions(mined):
    root, _, ds_summary = mined
    lesions = _csv(root / "out" / "lesions.csv")
    ds = dl.open_dataset(str(root / "ds"))
    keys = {(m["Series_key"], int(m["Key_slice_index"])) for m in lesions}
    assert ds_summary["images"] == len(keys) == len(ds.images)
    assert ds.image.shape[1:] == (3, 128, 128)
    # 2.5 mm pixels at 2.5 mm per pixel: boxes unchanged; the centre slice is the key image
    by_box = {m["Bounding_boxes"]: m for m in lesions}
    for r in ds.lesions:
        src = [float(r[k]) for k in ("x1", "y1", "x2", "y2")]
        np.testing.assert_allclose([float(r[k]) for k in ("bx1", "by1", "bx2", "by2")], src,
                                   atol=1e-3)
    assert len(by_box) == len(lesions)
    files = _csv(root / "index" / "files.csv")
    image = ds.images[0]
    series_key, key = image["image_key"].rsplit("_", 1)
    paths = [f["path"] for f in files if f["series_key"] == series_key]
    slices = sorted((pydicom.dcmread(os.path.join(root, "dicom", p)) for p in paths),
                    key=lambda d: float(d.ImagePositionPatient[2]))
    want = dl.window_to_uint8(apply_modality_lut(slices[int(key)].pixel_array,
                                                 slices[int(key)]), tuple(lesions_config.get_config().dataset.window_hu))
    np.testing.assert_array_equal(ds.image[int(image["index"])].read().result()[1], want)


def test_cli_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_prep.lesions", f"--dicom_root={tmp_path}",
                        f"--index={tmp_path}/none", f"--out={tmp_path}/o",
                        f"--salt_file={tmp_path}/salt"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("radnet: error: --index=")
