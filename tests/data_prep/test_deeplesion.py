"""The DeepLesion importer on a fixture in the public layout: 16-bit PNG slices and a
DL_info.csv with the real columns, written here."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_prep.deeplesion import build
from radnet.data import deeplesion as dl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _row(file_name, patient, study, series, key, box, diam, spacing, split, ltype, noisy=0):
    x1, y1, x2, y2 = box
    return {
        "File_name": file_name, "Patient_index": patient, "Study_index": study,
        "Series_ID": series, "Key_slice_index": key,
        "Measurement_coordinates": f"{x1 + 5}, {y1 + 5}, {x2 - 5}, {y2 - 5}, "
                                   f"{x1 + 5}, {y2 - 5}, {x2 - 5}, {y1 + 5}",
        "Bounding_boxes": f"{x1}, {y1}, {x2}, {y2}",
        "Lesion_diameters_Pixel_": f"{diam[0]}, {diam[1]}",
        "Normalized_lesion_location": "0.5, 0.5, 0.5", "Coarse_lesion_type": ltype,
        "Possibly_noisy": noisy, "Slice_range": f"{key - 2}, {key + 2}",
        "Spacing_mm_px_": f"{spacing}, {spacing}, 5", "Image_size": "64, 64",
        "DICOM_windows": "-175, 275", "Patient_gender": "F", "Patient_age": 62,
        "Train_Val_Test": split}


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("deeplesion")
    rng = np.random.default_rng(0)
    slices = {}
    for folder, indices in (("000001_01_01", range(100, 105)), ("000002_01_02", range(7, 10))):
        os.makedirs(root / "Images_png" / folder)
        for s in indices:
            hu = rng.integers(-1100, 1500, (64, 64)).astype(np.int32)
            slices[(folder, s)] = hu
            Image.fromarray((hu + 32768).astype(np.uint16)).save(
                root / "Images_png" / folder / f"{s:03d}.png")
    rows = [
        _row("000001_01_01_102.png", 1, 1, 1, 102, (10.5, 12.25, 30.0, 28.75), (22.1, 14.0),
             0.4, 1, 4),
        _row("000001_01_01_102.png", 1, 1, 1, 102, (40, 40, 50, 56), (16.0, 9.5), 0.4, 1, 5),
        _row("000001_01_01_104.png", 1, 1, 1, 104, (3, 4, 20, 20), (20.0, 12.0), 0.4, 2, 7, 1),
        _row("000002_01_02_008.png", 2, 1, 2, 8, (20, 21, 33.5, 40), (19.5, 10.0), 0.8, 3, -1),
        _row("000003_01_01_050.png", 3, 1, 1, 50, (1, 1, 9, 9), (8, 6), 0.8, 1, 2),
    ]
    with open(root / "DL_info.csv", "w", newline="") as f:
        w = csv.DictWriter(f, build.DL_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return str(root), rows, slices


def test_import_reproduces_boxes_key_slices_spacing_split(fixture_root, tmp_path):
    root, rows, slices = fixture_root
    out = str(tmp_path / "ds")
    window = (-1024, 1024)
    summary = build.build(root, out, context=1, mm_per_pixel=0.8, size=64, window_hu=window)
    assert summary["rows"] == 5 and summary["images"] == 4 and summary["images_ok"] == 3
    assert summary["lesions_ok"] == 4 and summary["lesions_error"] == 1
    ds = dl.open_dataset(out)
    assert ds.image.shape == (4, 3, 64, 64)
    images = {r["image_key"]: r for r in ds.images}
    lesions = ds.lesions
    assert len(lesions) == 5  # every DL_info row accounted for
    for row, les in zip(rows, lesions):
        img = images[row["File_name"]]
        assert int(les["lesion_id"]) == rows.index(row)
        if row["File_name"].startswith("000003"):
            assert les["status"] == "error" and les["reason"] == "missing_image"
            assert img["status"] == "error"
            continue
        assert les["status"] == "ok"
        assert [float(les[k]) for k in ("x1", "y1", "x2", "y2")] == build.floats(
            row["Bounding_boxes"])
        assert int(img["key_slice_index"]) == row["Key_slice_index"]
        assert float(img["spacing_mm"]) == build.floats(row["Spacing_mm_px_"])[0]
        assert les["split"] == img["split"] == dl.SPLIT_CODES[row["Train_Val_Test"]]
        assert int(les["lesion_type"]) == row["Coarse_lesion_type"]
        assert int(les["possibly_noisy"]) == row["Possibly_noisy"]
        scale = build.floats(row["Spacing_mm_px_"])[0] / 0.8
        np.testing.assert_allclose([float(les[k]) for k in ("bx1", "by1", "bx2", "by2")],
                                   np.array(build.floats(row["Bounding_boxes"])) * scale,
                                   atol=1e-3)
        assert float(les["long_mm"]) == pytest.approx(
            build.floats(row["Lesion_diameters_Pixel_"])[0] * build.floats(
                row["Spacing_mm_px_"])[0], abs=1e-3)
    # native spacing (0.8 mm): the slab is the windowed key slice and its neighbours
    i = int(images["000002_01_02_008.png"]["index"])
    slab = ds.image[i].read().result()
    for c, s in enumerate((7, 8, 9)):
        np.testing.assert_array_equal(slab[c], dl.window_to_uint8(slices[("000002_01_02", s)],
                                                                  window))
    # the last slice of a run: the context beyond it repeats it
    i = int(images["000001_01_01_104.png"]["index"])
    slab = ds.image[i].read().result()
    np.testing.assert_array_equal(slab[1], slab[2])
    assert (slab[:, 32:, :].max(), slab[:, :, 32:].max()) == (0, 0)  # 0.4 mm → half size
    assert ds.indices("train") == [0] and ds.indices("val") == [1] and ds.indices("test") == [2]
    assert ds.boxes(0).shape == (2, 4)


def test_cli_one_line_exit_2_on_missing_root(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_prep.deeplesion",
                        f"--deeplesion_root={tmp_path}/nope", f"--out={tmp_path}/ds"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("radnet: error: --deeplesion_root=")


def test_context_indices():
    assert dl.context_indices(5, [3, 4, 5, 6], 2) == [3, 4, 5, 6, 6]
    assert dl.context_indices(3, [3, 4, 5, 7], 2) == [3, 3, 3, 4, 5]
    assert dl.context_indices(5, [3, 4, 5, 7], 2) == [3, 4, 5, 5, 5]  # a gap ends the run
