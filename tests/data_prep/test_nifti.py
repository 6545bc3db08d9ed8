"""data_prep.nifti on small real NIfTI folders of each layout (MSD, nnU-Net v2 raw, LiTS),
written here with nibabel; the dataset read back with radnet.data.nifti (TensorStore)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep.nifti import build, layouts
from radnet.data import nifti

ROOT = Path(__file__).resolve().parents[2]
SPACING = (2.0, 2.0, 2.5)           # x, y, z mm


def _case(k, classes=2):
    """[x, y, z] CT-like image and a label map with nested boxes 1 (and 2, 3, …)."""
    img = np.full((10, 10, 8), -1000, np.int16) + k
    lab = np.zeros((10, 10, 8), np.uint8)
    for c in range(1, classes):
        lo = 1 + c
        lab[lo:10 - lo + 1, lo:10 - lo + 1, c:8 - c + 1] = c
        img[lab == c] = 40 * c
    return img, lab


def _save(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([*SPACING, 1.0])), path)


def write_msd(root, n=4):
    for k in range(n):
        img, lab = _case(k)
        _save(f"{root}/imagesTr/liver_{k}.nii.gz", img)
        _save(f"{root}/labelsTr/liver_{k}.nii.gz", lab)
    _save(f"{root}/imagesTs/liver_99.nii.gz", _case(0)[0])
    Path(f"{root}/imagesTr/._liver_0.nii.gz").write_bytes(b"\0")    # as the MSD tar ships
    json.dump({"name": "Liver", "modality": {"0": "CT"},
               "labels": {"0": "background", "1": "liver", "2": "cancer"},
               "training": [{"image": f"./imagesTr/liver_{k}.nii.gz",
                             "label": f"./labelsTr/liver_{k}.nii.gz"} for k in range(n)]},
              open(f"{root}/dataset.json", "w"))


def write_nnunet(root, n=4):
    """Three classes: background, kidney, tumour."""
    for k in range(n):
        img, lab = _case(k, classes=3)
        _save(f"{root}/imagesTr/kits_{k:03d}_0000.nii.gz", img)
        _save(f"{root}/labelsTr/kits_{k:03d}.nii.gz", lab)
    json.dump({"channel_names": {"0": "CT"}, "labels": {"background": 0, "kidney": 1,
                                                        "tumor": 2},
               "numTraining": n, "file_ending": ".nii.gz"}, open(f"{root}/dataset.json", "w"))


def write_lits(root, n=4):
    for k in range(n):
        img, lab = _case(k)
        lab[5, 5, 4] = 2                 # a tumour voxel inside the liver
        _save(f"{root}/batch1/volume-{k}.nii", img)
        _save(f"{root}/batch1/segmentation-{k}.nii", lab)


def _rows(out):
    with open(os.path.join(out, "manifest.csv")) as f:
        return list(csv.DictReader(f))


def test_msd_layout_imports_with_its_labels(tmp_path):
    src, out = tmp_path / "Task03_Liver", str(tmp_path / "ds")
    write_msd(str(src))
    build.build(str(src), out, in_plane=6, slice_spacing_mm=5.0, progress=False)
    attrs = nifti.read_attributes(out)
    assert attrs["layout"] == "msd" and attrs["labels"] == ["background", "liver", "cancer"]
    assert attrs["num_classes"] == 3
    rows = {r["volume_file"]: r for r in _rows(out)}
    assert rows["imagesTs/liver_99.nii.gz"]["reason"] == "test_image_without_label"
    assert rows["imagesTr/._liver_0.nii.gz"]["reason"] == "macos_resource_fork"
    assert sorted(nifti.cases(out)) == [f"liver_{k}" for k in range(4)]
    # 8 slices × 2.5 mm = 17.5 mm extent → slices at 0, 5, 10, 15 mm; 10 → 6 pixels.
    image, mask = nifti.open_case(out, "liver_1")
    assert image.shape == mask.shape == (4, 6, 6)
    # The source grid, reoriented to [slice, row, col], with the classes of the source.
    native = nifti.read_native(out, "liver_1")
    want = np.asarray(nib.load(str(src / "labelsTr/liver_1.nii.gz")).dataobj)
    assert native.shape == (8, 10, 10)
    np.testing.assert_array_equal(np.sort(native.reshape(-1)), np.sort(want.reshape(-1)))
    assert set(np.unique(mask.read().result())) == {0, 1}
    train_grid, source_grid = nifti.spacing_of(next(r for r in _rows(out) if r["case_id"] == "liver_1"))
    assert train_grid == pytest.approx((5.0, 10 / 3, 10 / 3), abs=1e-4) and source_grid == (2.5, 2.0, 2.0)


def test_fold_foreground_makes_the_papers_liver(tmp_path):
    src, out = tmp_path / "Task03_Liver", str(tmp_path / "ds")
    write_msd(str(src))
    (src / "labelsTr/liver_2.nii.gz").unlink()
    _save(str(src / "labelsTr/liver_2.nii.gz"), np.where(_case(2)[1] > 0, 2, 0).astype(np.uint8))
    build.build(str(src), out, in_plane=6, progress=False, fold_foreground="liver")
    assert nifti.read_attributes(out)["labels"] == ["background", "liver"]
    assert nifti.read_native(out, "liver_2").max() == 1         # cancer (2) → liver (1)


def test_nnunet_layout_three_classes(tmp_path):
    src, out = tmp_path / "Dataset064_KiTS", str(tmp_path / "ds")
    write_nnunet(str(src))
    build.build(str(src), out, in_plane=10, slice_spacing_mm=2.5, progress=False)
    attrs = nifti.read_attributes(out)
    assert attrs["layout"] == "nnunet" and attrs["labels"] == ["background", "kidney", "tumor"]
    _, mask = nifti.open_case(out, "kits_002")
    # Same grid (2.5 mm slices, 10 pixels): the classes come through unchanged.
    want = np.asarray(nib.load(str(src / "labelsTr/kits_002.nii.gz")).dataobj)
    np.testing.assert_array_equal(np.sort(mask.read().result().reshape(-1)),
                                  np.sort(want.reshape(-1)))
    row = next(r for r in _rows(out) if r["case_id"] == "kits_002")
    assert [int(v) for v in row["class_voxels"].split(";")] == np.bincount(want.reshape(-1)).tolist()


def test_lits_layout_and_the_lits_command_line(tmp_path):
    src, out = tmp_path / "lits", tmp_path / "ds"
    write_lits(str(src))
    res = subprocess.run([sys.executable, "-m", "data_prep.lits", f"--lits_dir={src}",
                          f"--out={out}", "--in_plane=6", "--workers=1", "--noprogress"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["included"] == 4
    attrs = nifti.read_attributes(str(out))
    assert attrs["layout"] == "lits" and attrs["labels"] == ["background", "liver"]
    assert sorted(nifti.cases(str(out))) == [f"lits-00{k}" for k in range(4)]


def test_unknown_layout_is_one_line_and_leaves_nothing(tmp_path):
    src = tmp_path / "Task03_Liver"
    for k in range(3):            # a wrong shape: images and labels side by side
        _save(str(src / f"case{k}_img.nii.gz"), _case(k)[0])
        _save(str(src / f"case{k}_seg.nii.gz"), _case(k)[1])
    out = tmp_path / "ds"
    res = subprocess.run([sys.executable, "-m", "data_prep.nifti", f"--dataset_dir={src}",
                          f"--out={out}", "--workers=1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for word in ("matches no known layout", "MSD", "nnU-Net", "LiTS", "6 files", "case0_img"):
        assert word in lines[0], (word, lines[0])
    assert sorted(os.listdir(tmp_path)) == ["Task03_Liver"]     # no dataset, no partial


def test_several_channels_refused_by_name_and_too_few_cases_leave_nothing(tmp_path):
    src = tmp_path / "Task01_BrainTumour"
    write_msd(str(src), n=2)
    meta = json.load(open(src / "dataset.json"))
    json.dump(meta | {"modality": {"0": "FLAIR", "1": "T1w"}}, open(src / "dataset.json", "w"))
    with pytest.raises(layouts.LayoutError, match=r"2 input channels \(0=FLAIR, 1=T1w\)"):
        build.build(str(src), str(tmp_path / "ds"), in_plane=6, progress=False)
    json.dump(meta, open(src / "dataset.json", "w"))
    with pytest.raises(ValueError, match="2 usable case"):          # 3 needed for the splits
        build.build(str(src), str(tmp_path / "ds"), in_plane=6, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["Task01_BrainTumour"]


def test_phantom_writes_the_msd_layout(tmp_path):
    from data_prep.phantoms import lits as phantom_lits

    phantom_lits.write_msd(str(tmp_path / "Task03_Liver"), 1, 0)
    found = layouts.detect(str(tmp_path / "Task03_Liver"))
    assert found.layout == "msd" and [c.case_id for c in found.cases] == ["liver_0"]
    assert found.label_names == {0: "background", 1: "liver", 2: "cancer"}
    hu, seg, _ = phantom_lits.make_case(0, 0)
    np.testing.assert_array_equal(
        np.asarray(nib.load(str(tmp_path / "Task03_Liver/labelsTr/liver_0.nii.gz")).dataobj), seg)
