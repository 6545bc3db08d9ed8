"""A built dataset opens in other tools: zarr-python and xarray read its Zarr group without a
single warning, with named dimensions and each volume's voxel spacing (radnet/data/schema.py)."""

import warnings

import numpy as np
import pydicom

from configs import build_volumes as config_lib
from data_prep.phantoms import volume_synth as synth
from data_prep.volumes import builder
from radnet import labels
from radnet.data import schema


def _build(tmp_path):
    dicom, series = tmp_path / "dicom", []
    for k, (n, spacing) in enumerate([(12, 2.5), (20, 5.0), (8, 1.0)]):
        paths, _ = synth.write_body_series(str(dicom / f"s{k}"), n, 24, 24, slice_spacing_mm=spacing,
                                           rng=np.random.default_rng(k))
        ps = pydicom.dcmread(paths[0], stop_before_pixels=True).PixelSpacing
        series.append(dict(series_key=f"{k:032x}", paths=paths, patient_key=f"p{k}",
                           split=labels.SPLITS[k], pixel_spacing_mm=f"{ps[0]};{ps[1]}"))
    synth.write_index(str(tmp_path / "index"), str(dicom), series)
    config = config_lib.get_config("tiny")
    config.volume_shape, config.min_slices = (8, 12, 12), 4
    out = tmp_path / "ds"
    run = builder.build(str(tmp_path / "index"), str(dicom), str(out), config, workers=0,
                        progress=False)
    assert run["finalized"]
    return out, series


def test_zarr_and_xarray_read_the_dataset_without_warnings(tmp_path):
    import xarray as xr  # requirements-dev.txt
    import zarr

    out, series = _build(tmp_path)
    group_path = out / schema.ZARR_GROUP
    assert schema.zarr_root(str(out)) == str(group_path)
    # Only Zarr inside the group; the build's other files beside it.
    assert {p.name for p in out.iterdir()} >= {schema.ZARR_GROUP, "manifest.csv", "summary.json"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        group = zarr.open_group(str(group_path), mode="r")
        names = sorted(group.keys())
        volume = group["volume"]
        ds = xr.open_zarr(str(group_path), consolidated=False)
        ds.load()
    assert names == sorted(schema.ARRAY_NAMES)
    assert volume.metadata.dimension_names == ("row", "slice", "y", "x")
    assert ds["volume"].dims == ("row", "slice", "y", "x") and ds.sizes["row"] == 3
    assert ds["coverage"].dims == ("row", "region")
    assert ds["voxel_spacing_mm"].attrs["units"] == "mm"
    assert ds["sequence"].attrs["classes"] == list(labels.SEQUENCE)
    np.testing.assert_array_equal(ds["volume"].values, schema.open_arrays(str(out))["volume"].read().result())
    # Voxel spacing: slices at the effective spacing; in-plane the PixelSpacing scaled 24 → 12.
    spacing = ds["voxel_spacing_mm"].values
    for i, s in enumerate(sorted(series, key=lambda r: r["series_key"])):
        row_mm = float(s["pixel_spacing_mm"].split(";")[0])
        assert spacing[i, 1] == np.float32(row_mm * 24 / 12)
        assert spacing[i, 0] == ds["effective_spacing_mm"].values[i]
    assert spacing[0, 0] == np.float32(2.5 * 12 / 8)  # 12 slices of 2.5 mm resampled to 8


def test_a_dataset_of_the_earlier_layout_is_still_read(tmp_path):
    """Before arrays.zarr, the group was DATASET itself: readers find it there."""
    legacy = tmp_path / "legacy"
    schema.create(str(tmp_path / "tmp"), 2, volume_shape=(2, 4, 4))
    (tmp_path / "tmp" / schema.ZARR_GROUP).rename(legacy)
    assert schema.zarr_root(str(legacy)) == str(legacy)
    assert schema.read_attributes(str(legacy))["volume_shape"] == [2, 4, 4]
    assert schema.open_arrays(str(legacy))["volume"].shape == (2, 2, 4, 4)
