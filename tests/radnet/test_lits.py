"""radnet.data.lits and data_prep.lits on small real NIfTI files written with nibabel."""

import csv
import os

import nibabel as nib
import numpy as np
import pytest

from data_prep.lits import build as lits_build
from radnet.data import lits
from radnet import labels, preprocess


def _save(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), path)


def _ras_case(n_x=8, n_y=8, n_z=9, spacing=(1.5, 1.5, 2.5)):
    """A volume in RAS voxel order with a bright cube at the right-anterior-superior corner."""
    vol = np.zeros((n_x, n_y, n_z), np.int16) - 1000
    vol[-2:, -2:, -2:] = 500           # high x = right, high y = anterior, high z = superior
    seg = np.zeros((n_x, n_y, n_z), np.uint8)
    seg[-2:, -2:, -2:] = 1
    seg[-1, -1, -1] = 2                # tumour counts as liver
    return vol, seg, np.diag([*spacing, 1.0])


def _write_pair(folder, k, vol, seg, affine, gz=False):
    ext = ".nii.gz" if gz else ".nii"
    _save(os.path.join(folder, f"volume-{k}{ext}"), vol, affine)
    _save(os.path.join(folder, f"segmentation-{k}{ext}"), seg, affine)
    return os.path.join(folder, f"volume-{k}{ext}"), os.path.join(folder, f"segmentation-{k}{ext}")


def test_orientation_is_the_same_whatever_the_voxel_order(tmp_path):
    vol, seg, affine = _ras_case()
    outputs = []
    # RAS as is; LPS (x and y flipped, affine says so); and axes permuted to z, y, x.
    # Flipped voxel i holds original voxel n-1-i: the affine maps i through that index.
    flip = np.array([[-1, 0, 0, vol.shape[0] - 1], [0, -1, 0, vol.shape[1] - 1],
                     [0, 0, 1, 0], [0, 0, 0, 1]], float)
    variants = {
        "ras": (vol, seg, affine),
        "lps": (vol[::-1, ::-1].copy(), seg[::-1, ::-1].copy(), affine @ flip),
        "zyx": (vol.transpose(2, 1, 0).copy(), seg.transpose(2, 1, 0).copy(),
                affine[:, [2, 1, 0, 3]]),
    }
    for i, (name, (v, s, a)) in enumerate(variants.items()):
        paths = _write_pair(str(tmp_path), i, v, s, a)
        case = lits.prepare_case(*paths, in_plane=8, slice_spacing_mm=2.5)
        outputs.append(case)
        # [slice, row, col]: superior = last slices, anterior = first rows,
        # patient right = first columns (radiological display).
        assert case.mask[-1, 0, 0] == 1, name
        assert case.mask[0, -1, -1] == 0, name
        assert case.image[-1, 0, 0] == 255 and case.image[0, -1, -1] == 0, name
    for other in outputs[1:]:
        np.testing.assert_array_equal(other.image, outputs[0].image)
        np.testing.assert_array_equal(other.mask, outputs[0].mask)
    assert outputs[0].row["source_axcodes"] == "RAS"
    assert outputs[1].row["source_axcodes"] == "LPS"


def test_slices_resampled_linearly_to_target_spacing(tmp_path):
    # 7 slices at 2 mm: extent 12 mm → output slices at 0, 5, 10 mm = input 0, 2.5, 5.
    z = np.arange(7, dtype=np.float32) * 10.0          # value grows 10 per input slice
    vol = np.broadcast_to(z, (4, 4, 7)).astype(np.float32)
    seg = np.zeros((4, 4, 7), np.uint8)
    seg[..., 3] = 1                                     # only input slice 3 is liver
    paths = _write_pair(str(tmp_path), 0, vol, seg, np.diag([1.0, 1.0, 2.0, 1.0]))
    case = lits.prepare_case(*paths, in_plane=4, slice_spacing_mm=5.0)
    assert case.image.shape == (3, 4, 4)
    # Linear: 0, 25, 50 → min-max → 0, 127.5, 255 (rounded half to even: 128).
    np.testing.assert_array_equal(case.image[:, 0, 0], [0, 128, 255])
    # Nearest: output 1 sits at input 2.5 → rounds to input slice 3 (liver); others empty.
    np.testing.assert_array_equal(case.mask.sum(axis=(1, 2)), [0, 16, 0])
    assert case.row["slice_spacing_mm"] == "5"
    assert case.row["source_spacing_mm"].startswith("2.0000")


def test_in_plane_resize_maps_pixel_centres(tmp_path):
    # 8 columns → 4: output centre j maps to input 2j + 0.5, the mean of two neighbours.
    ramp = np.arange(8, dtype=np.float32)
    # x runs right→left after reorientation? Build in LPS so columns keep x order.
    vol = np.broadcast_to(ramp[:, None, None], (8, 8, 1)).astype(np.float32)
    vol = np.concatenate([vol, vol], axis=2)
    seg = np.zeros_like(vol, dtype=np.uint8)
    affine = np.diag([-1.0, -1.0, 5.0, 1.0])          # voxel x = patient left (LPS)
    paths = _write_pair(str(tmp_path), 0, vol, seg, affine)
    case = lits.prepare_case(*paths, in_plane=4, slice_spacing_mm=5.0)
    expected = np.array([0.5, 2.5, 4.5, 6.5])
    expected = np.rint((expected - 0.5) / 6.0 * 255)
    np.testing.assert_array_equal(case.image[0, 0], expected)
    assert case.row["pixel_spacing_mm"] == "2.0000;2.0000"


def test_in_plane_resize_matches_numpy_interp():
    """The liver images use the pretraining volumes' resize: pixel centres onto centres."""
    x = np.random.default_rng(0).normal(size=(11, 7)).astype(np.float32)
    got = preprocess.PlaneResizer(5, 3, antialias=False)(x)
    rows = np.clip((np.arange(5) + 0.5) * 11 / 5 - 0.5, 0, 10)
    cols = np.clip((np.arange(3) + 0.5) * 7 / 3 - 0.5, 0, 6)
    along_rows = np.stack([np.interp(rows, np.arange(11), x[:, j]) for j in range(7)], axis=1)
    expected = np.stack([np.interp(cols, np.arange(7), r) for r in along_rows])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_build_dataset_manifest_splits_and_windows(tmp_path):
    src = tmp_path / "lits" / "Training Batch 1"
    src.mkdir(parents=True)
    vol, seg, affine = _ras_case(n_z=9)
    for k in range(7):
        _write_pair(str(src), k, vol + k, seg, affine, gz=(k % 2 == 0))
    bad = seg.copy()
    bad[0, 0, 0] = 5                                     # a label LiTS does not have
    _write_pair(str(src), 7, vol, bad, affine)
    _save(str(src / "volume-8.nii"), vol, affine)        # no segmentation
    (src / "notes.txt").write_text("x")
    out = str(tmp_path / "ds")
    manifest = lits_build.build(str(tmp_path / "lits"), out, in_plane=6, slice_spacing_mm=5.0,
                          seed=3, progress=False)

    with open(os.path.join(out, "manifest.csv")) as f:
        rows = {r["case_id"] or r["volume_file"]: r for r in csv.DictReader(f)}
    assert len(manifest) == len(rows) == 10            # 9 cases + the stray file
    assert rows["lits-007"]["status"] == "excluded"
    assert rows["lits-007"]["reason"] == "unexpected_labels"
    assert rows["lits-008"]["reason"] == "missing_segmentation"
    assert rows["Training Batch 1/notes.txt"]["reason"] == "unrecognised_file_name"
    splits = [rows[lits_build.case_id_of(k)]["split"] for k in range(7)]
    assert sorted(splits) == sorted(["train"] * 5 + ["val"] + ["test"])
    # Seeded: the same seed gives the same split, another seed (here) a different one.
    ids = [lits_build.case_id_of(k) for k in range(7)]
    assert lits_build.assign_splits(ids, seed=3) == {lits_build.case_id_of(k): s for k, s in enumerate(splits)}
    assert any(lits_build.assign_splits(ids, seed=s) != lits_build.assign_splits(ids, seed=3) for s in (4, 5, 6))

    assert lits.read_attributes(out)["in_plane"] == 6
    image, mask = lits.open_case(out, "lits-003")
    assert image.shape == mask.shape == (5, 6, 6)      # 8 × 2.5 mm = 20 mm → 5 slices
    assert image.chunk_layout.read_chunk.shape[0] == lits.CHUNK_SLICES
    window = lits.read_window(mask, -2, 8)
    assert window.shape == (8, 6, 6)
    assert window[:2].sum() == 0 and window[7].sum() == 0   # blank outside the case
    np.testing.assert_array_equal(window[2:7], mask.read().result())
    assert int(rows["lits-003"]["liver_voxels"]) == int(mask.read().result().sum()) > 0
    assert lits.cases(out, "val") == [c for c in lits.cases(out) if rows[c]["split"] == "val"]


def test_paper_split_sizes():
    ids = [lits_build.case_id_of(k) for k in range(131)]
    split = lits_build.assign_splits(ids, seed=0)
    counts = {s: list(split.values()).count(s) for s in labels.SPLITS}
    assert counts == {"train": 92, "val": 19, "test": 20}


def test_shape_mismatch_is_a_recorded_error(tmp_path):
    vol, seg, affine = _ras_case()
    _save(str(tmp_path / "volume-0.nii"), vol, affine)
    _save(str(tmp_path / "segmentation-0.nii"), seg[:, :, :4].copy(), affine)
    with pytest.raises(lits.CaseError, match="geometry_mismatch"):
        lits.prepare_case(str(tmp_path / "volume-0.nii"), str(tmp_path / "segmentation-0.nii"),
                          in_plane=4)
