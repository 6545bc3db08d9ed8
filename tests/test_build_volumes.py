"""data_prep.build_volumes: pixel rules on real DICOM files, the dataset, resume after kill -9.

References are computed independently of the builder: scipy's map_coordinates for the
linear resize (half-pixel centres), numpy for sorting and min-max.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tensorstore as ts
from pydicom.data import get_testdata_file
from scipy import ndimage

from configs import build_volumes as config_lib
from data_prep.phantoms import volume_synth as synth
from data_prep.volumes import builder as volume_builder
from radnet import preprocess
from radnet import labels
from radnet.data import schema

ROOT = Path(__file__).resolve().parents[1]


def reference_uint8(truth: np.ndarray, shape) -> np.ndarray:
    """The paper's preprocessing of a true volume [n, r, c], written independently."""
    n = truth.shape[0]
    padded = n < shape[0]
    target = (n if padded else shape[0], shape[1], shape[2])
    coords = np.meshgrid(*[np.clip((np.arange(o) + 0.5) * s / o - 0.5, 0, s - 1)
                           for o, s in zip(target, truth.shape)], indexing="ij")
    resized = ndimage.map_coordinates(truth.astype(np.float64), coords, order=1)
    lo, hi = resized.min(), resized.max()
    q = np.zeros(resized.shape) if hi == lo else np.rint((resized - lo) / (hi - lo) * 255)
    out = np.zeros(shape, np.int64)
    before = (shape[0] - n) // 2 if padded else 0
    out[before:before + target[0]] = q
    return out


def opts(shape=(8, 16, 16), **kw):
    return preprocess.VolumeOptions(volume_shape=shape, **{"min_slices": 2, **kw})


# ------------------------------------------------------------------------- resizing


def test_linear_taps_match_scipy_half_pixel_resize():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(13, 7))
    for n_out in (4, 13, 29):
        idx, w = preprocess.linear_taps(13, n_out)
        got = preprocess.apply_taps(x, idx, w, 0)
        centres = np.clip((np.arange(n_out) + 0.5) * 13 / n_out - 0.5, 0, 12)
        ref = ndimage.map_coordinates(x, np.meshgrid(centres, np.arange(7), indexing="ij"), order=1)
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_antialias_suppresses_aliasing_when_shrinking():
    stripes = np.tile([0.0, 1.0], 48)[None, :].repeat(4, 0)  # [4, 96] period 2
    plain = preprocess.PlaneResizer(4, 32, antialias=False)(stripes)
    smooth = preprocess.PlaneResizer(4, 32, antialias=True)(stripes)
    assert plain.std() > 0.4  # plain linear hits single samples: the stripes alias at full contrast
    assert smooth.std() < 0.1 and abs(smooth.mean() - 0.5) < 0.05
    idx, w = preprocess.linear_taps(64, 16, antialias=True)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)


def test_resample_follows_true_positions_and_rejects_gaps():
    positions = np.array([0.0, 1.0, 2.1, 3.0, 4.0, 5.0, 6.0, 7.0])  # one slightly uneven gap
    stack = positions[:, None, None] * np.ones((1, 2, 2))  # value = position along n
    out = preprocess.resample_slices(stack.astype(np.float32), positions, 4)
    # Output centres span the voxel extent [-0.5, 7.5] in four steps of 2 mm.
    np.testing.assert_allclose(out[:, 0, 0], [0.5, 2.5, 4.5, 6.5], atol=1e-5)
    assert preprocess.check_spacing(positions, 0.25) == pytest.approx(1.0)
    with pytest.raises(preprocess.SeriesError, match="missing or misplaced") as err:
        preprocess.check_spacing(np.array([0.0, 1.0, 2.0, 4.0, 5.0]), 0.25)
    assert err.value.reason == "inconsistent_geometry"


def test_quantisation_modes_and_constant_volume():
    const = np.full((4, 3, 3), 37.5, np.float32)
    for mode in ("minmax", "percentile"):
        out = preprocess.to_uint8(const, opts(normalise=mode))
        assert out.dtype == np.uint8 and not out.any()
    ramp = np.linspace(-1000, 1000, 4 * 9, dtype=np.float32).reshape(4, 3, 3)
    out = preprocess.to_uint8(ramp, opts())
    assert out.min() == 0 and out.max() == 255
    window = preprocess.to_uint8(ramp, opts(normalise="window", window_level=0.0, window_width=200.0))
    assert np.all(window[ramp < -100] == 0) and np.all(window[ramp > 100] == 255)
    with pytest.raises(ValueError, match="normalise"):
        preprocess.to_uint8(ramp, opts(normalise="zscore"))


# --------------------------------------------------------------- real DICOM files


def ct5n_paths():
    folder = os.path.dirname(get_testdata_file("dicomdirtests/98892001/CT5N/2062"))
    return sorted((os.path.join(folder, f) for f in os.listdir(folder)), reverse=True)


def test_ct5n_geometric_order_padded_not_stretched():
    paths = ct5n_paths()
    dss = [pydicom.dcmread(p) for p in paths]
    z = np.array([float(d.ImagePositionPatient[2]) for d in dss])
    inst = np.array([int(d.InstanceNumber) for d in dss])
    # The trap: InstanceNumber rises while the position along n = (0, 0, 1) falls.
    assert np.corrcoef(z, inst)[0, 1] < -0.99
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])
    truth = hu[np.argsort(z)]
    built = preprocess.build_volume(paths, opts((8, 16, 16), min_slices=5))
    assert built.n_slices == 5 and built.padded
    assert built.effective_spacing_mm == pytest.approx(2.5)  # padded: original spacing
    assert built.slice_spacing_mm == pytest.approx(2.5)
    ref = reference_uint8(truth, (8, 16, 16))
    assert np.abs(built.volume.astype(int) - ref).max() <= 1
    assert not built.volume[0].any() and not built.volume[6:].any()  # blank padding, centred
    by_instance = reference_uint8(hu[np.argsort(inst)], (8, 16, 16))
    assert np.abs(built.volume.astype(int) - by_instance).max() > 50  # the wrong order differs
    # With the paper's minimum of 16 slices the same series is refused, with the reason.
    with pytest.raises(preprocess.SeriesError) as err:
        preprocess.build_volume(paths, opts((8, 16, 16), min_slices=16))
    assert err.value.reason == "too_few_slices"


@pytest.mark.parametrize("orientation", [synth.AXIAL, synth.CORONAL, synth.SAGITTAL],
                         ids=["axial", "coronal", "sagittal"])
@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
@pytest.mark.parametrize("n_slices", [21, 6])
def test_volume_matches_truth(tmp_path, orientation, enhanced, n_slices):
    rng = np.random.default_rng(n_slices)
    slopes = rng.choice([0.5, 1.0, 2.0], n_slices)
    intercepts = rng.choice([-1024.0, -1000.0, 0.0], n_slices)
    paths, truth = synth.write_body_series(
        str(tmp_path), n_slices, 24, 20, orientation=orientation, slice_spacing_mm=3.0,
        enhanced=enhanced, slopes=slopes, intercepts=intercepts, instance_order="reversed", rng=rng)
    built = preprocess.build_volume(paths, opts((8, 12, 16)))
    ref = reference_uint8(truth, (8, 12, 16))
    assert np.abs(built.volume.astype(int) - ref).max() <= 2
    assert (built.n_slices, built.rows, built.columns) == (n_slices, 24, 20)
    expected = 3.0 if n_slices < 8 else 3.0 * n_slices / 8
    assert built.effective_spacing_mm == pytest.approx(expected, rel=1e-4)


def test_series_errors_carry_specific_reasons(tmp_path):
    paths, _ = synth.write_body_series(str(tmp_path / "a"), 10, 8, 8, slice_spacing_mm=20.0)
    with pytest.raises(preprocess.SeriesError) as err:
        preprocess.build_volume(paths, opts((4, 8, 8)))
    assert err.value.reason == "spacing_too_large" and err.value.info["effective_spacing_mm"] == 50.0
    twice = paths + synth.write_body_series(str(tmp_path / "b"), 10, 8, 8, slice_spacing_mm=20.0)[0]
    with pytest.raises(preprocess.SeriesError, match="share a position") as err:
        preprocess.build_volume(twice, opts((4, 8, 8), max_effective_spacing_mm=100.0))
    assert err.value.reason == "inconsistent_geometry"
    bad = tmp_path / "truncated"
    bad.write_bytes(Path(paths[0]).read_bytes()[:-100])  # pixel data cut short
    with pytest.raises(preprocess.SeriesError) as err:
        preprocess.build_volume(paths[1:] + [str(bad)], opts((4, 8, 8), max_effective_spacing_mm=100.0))
    assert err.value.reason == "decode_failed" and str(tmp_path) not in err.value.message


def test_monochrome1_is_refused_by_name(tmp_path):
    paths, _ = synth.write_body_series(str(tmp_path / "m1"), 10, 8, 8, slice_spacing_mm=2.0)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(p)
    with pytest.raises(preprocess.SeriesError, match="MONOCHROME1") as err:
        preprocess.build_volume(paths, opts((4, 8, 8)))
    assert err.value.reason == "decode_failed"


def test_effective_spacing_at_the_limit_is_kept(tmp_path):
    """15 mm is the paper's limit: exactly 15 (up to the decimal-string noise of a tilted
    stack's positions) is kept, and the index and the builder agree; 15.1 is dropped."""
    from radnet import rules
    t = np.radians(7.9)  # a gantry-tilt-like orientation: positions are irrational
    tilted = (1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(-np.sin(t)))
    options = opts((8, 16, 16))
    for spacing, kept in ((7.5, True), (7.55, False)):
        paths, _ = synth.write_body_series(str(tmp_path / f"s{spacing}"), 16, 16, 16,
                                           orientation=tilted, slice_spacing_mm=spacing)
        if kept:
            built = preprocess.build_volume(paths, options)
            assert built.effective_spacing_mm == pytest.approx(15.0, abs=1e-4)
        else:
            with pytest.raises(preprocess.SeriesError) as err:
                preprocess.build_volume(paths, options)
            assert err.value.reason == "spacing_too_large"
    assert not rules.spacing_too_large(15.0000001, 15.0) and rules.spacing_too_large(15.01, 15.0)


def test_index_and_builder_measure_one_spacing():
    """One slightly uneven gap (within both tolerances): the index's predicted spacing and
    effective spacing are the builder's, so neither keeps what the other drops."""
    from configs import index as index_config
    from radnet import rules
    positions = np.arange(144) * 5.0
    positions[100:] += 0.4
    n = len(positions)
    stack = rules.stack_rule(list(positions), [f"sop{i}" for i in range(n)], [None] * n,
                             [""] * n, None, index_config.get_config())
    assert not stack.reasons
    measured = preprocess.check_spacing(positions, 0.25)
    assert stack.slice_spacing_mm == pytest.approx(measured, abs=1e-9)
    assert measured == pytest.approx(715.4 / 143)  # extent / (n − 1), not the median 5.0


def test_multi_stack_file_gives_the_series_its_own_frames(tmp_path):
    rng = np.random.default_rng(2)
    axial, _ = synth.write_body_series(str(tmp_path / "a"), 9, 16, 16, orientation=synth.AXIAL,
                                       enhanced=True, rng=rng)
    coronal, truth = synth.write_body_series(str(tmp_path / "c"), 7, 16, 16, enhanced=True,
                                             orientation=synth.CORONAL, rng=rng)
    both = synth.merge_enhanced(axial + coronal, str(tmp_path / "both"))
    built = preprocess.build_volume([both], opts((8, 16, 16)), orientation=synth.CORONAL)
    assert built.n_slices == 7
    assert np.abs(built.volume.astype(int) - reference_uint8(truth, (8, 16, 16))).max() <= 2
    with pytest.raises(preprocess.SeriesError, match="orientations differ"):
        preprocess.build_volume([both], opts((8, 16, 16)))  # without the index's orientation
    with pytest.raises(preprocess.SeriesError, match="none of its 16 frames"):
        preprocess.build_volume([both], opts((8, 16, 16)), orientation=synth.SAGITTAL)
    # Through the dataset builder, with the index's current output for such a file:
    # listed once in files.csv (under the coronal series), the axial series without files.
    synth.write_index(str(tmp_path / "index"), str(tmp_path), [
        dict(series_key="a" * 32, paths=[], orientation="1;0;0;0;1;0"),
        dict(series_key="c" * 32, paths=[both], orientation=";".join(map(str, synth.CORONAL)))])
    run = volume_builder.build(str(tmp_path / "index"), str(tmp_path), str(tmp_path / "ds"),
                               tiny_config(), progress=False)
    errors = (tmp_path / "ds" / "errors.csv").read_text()
    assert run["dataset"]["built"] == 1 and "files.csv lists no included file" in errors


def test_orientation_recheck_uses_the_index_angle():
    def frame(deg, z):
        t = np.radians(deg)  # row cosines tilted in the x–z plane
        return preprocess.Frame(np.array([0.0, 0.0, z]), np.array([np.cos(t), 0, np.sin(t), 0, 1, 0]),
                                 4, 4, np.zeros((2, 2), np.float32))
    frames = [frame(0.0, 0.0), frame(0.6, 2.0), frame(0.0, 1.0)]
    ordered, positions = preprocess.order_frames(frames, 1.0)
    np.testing.assert_allclose(positions, [0.0, 1.0, 2.0], atol=0.05)
    with pytest.raises(preprocess.SeriesError, match="orientations differ"):
        preprocess.order_frames(frames + [frame(1.5, 3.0)], 1.0)


def circle_outside(n: int, rows: int, cols: int) -> np.ndarray:
    """bool [n, rows, cols]: outside the inscribed circle (a CT reconstruction circle)."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    r = (min(rows, cols) - 1) / 2
    out = (yy - (rows - 1) / 2) ** 2 + (xx - (cols - 1) / 2) ** 2 > r * r
    return np.broadcast_to(out, (n, rows, cols)).copy()


def fill_padded(truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The standard's semantics, independently: padded pixels get the least real value."""
    filled = truth.astype(np.float64).copy()
    filled[mask] = filled[~mask].min()
    return filled


@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
def test_pixel_padding_compared_on_stored_values_and_filled_with_least_value(tmp_path, enhanced):
    n, rows, cols, shape = 10, 24, 24, (8, 12, 12)
    rng = np.random.default_rng(5)
    grid = synth.sample_grid(n, rows, cols, (-180.0, -180.0, -20.0), synth.AXIAL, (15.0, 15.0), 4.0)
    truth = synth.body_hu(grid)
    # The trap: real pixels whose PHYSICAL value equals the padding value (stored -976
    # with intercept -1024). Comparing after the rescale would call them padding.
    truth[3:6, 10:14, 10:14] = -2000.0
    mask = circle_outside(n, rows, cols)
    slopes, intercepts = rng.choice([1.0, 2.0], n), np.full(n, -1024.0)
    if enhanced:  # a range, given high-to-low (either order is valid)
        kw = dict(padding=-1990, padding_limit=-2000, pad_stored=rng.integers(-2000, -1989, mask.shape))
    else:
        kw = dict(padding=-2000)
    paths = synth.write_series(str(tmp_path), truth, grid[0, 0, 0], synth.AXIAL, (15.0, 15.0), 4.0,
                               slopes=slopes, intercepts=intercepts, enhanced=enhanced,
                               pad_mask=mask, rng=rng, **kw)
    built = preprocess.build_volume(paths, opts(shape)).volume.astype(int)
    expected = reference_uint8(fill_padded(truth, mask), shape)
    assert np.abs(built - expected).max() <= 2
    assert built[:, 0, 0].max() == 0  # padding as dark as the darkest real pixel
    trap = mask.copy()
    trap[3:6, 10:14, 10:14] = True  # what comparing physical values would do
    assert np.abs(built - reference_uint8(fill_padded(truth, trap), shape)).max() > 30
    # Without the padding rule the padded corners would be the darkest grey and squash
    # the image's contrast: the reference with raw padding differs by far.
    raw = truth.copy()
    raw[mask] = (kw["padding"] * slopes[:, None, None] + intercepts[:, None, None]
                 ).repeat(rows, 1).repeat(cols, 2)[mask]
    assert np.abs(built - reference_uint8(raw, shape)).max() > 30


def test_padding_attributes_follow_pixel_representation(tmp_path):
    ds = pydicom.Dataset()
    ds.BitsAllocated, ds.PixelRepresentation = 16, 1
    assert preprocess.Padding.from_dataset(ds) is None
    ds.PixelPaddingValue = 63536  # -2000 written with VR US: the bit pattern counts
    assert preprocess.Padding.from_dataset(ds) == preprocess.Padding(-2000, -2000)
    ds.PixelRepresentation, ds.PixelPaddingValue, ds.PixelPaddingRangeLimit = 0, 100, 0
    pad = preprocess.Padding.from_dataset(ds)
    assert pad == preprocess.Padding(0, 100)
    np.testing.assert_array_equal(pad.mask(np.array([0, 50, 100, 101], np.uint16)),
                                  [True, True, True, False])
    # A series that is all padding is constant: zeros, never NaN.
    paths, truth = synth.write_body_series(str(tmp_path), 4, 8, 8, padding=-2000,
                                           pad_mask=np.ones((4, 8, 8), bool))
    built = preprocess.build_volume(paths, opts((4, 8, 8)))
    assert built.volume.dtype == np.uint8 and not built.volume.any()


# ------------------------------------------------------------ native decode fast path


def _pydicom_test_files():
    import pydicom.data
    folder = Path(pydicom.data.__file__).parent / "test_files"
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_native_pixels_equal_pydicom_on_its_own_test_files():
    """The fast path returns exactly pydicom's pixel_array wherever it applies."""
    import warnings
    checked = set()
    for path in _pydicom_test_files():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
        except Exception:  # not DICOM, or a deliberately broken file
            continue
        if "PixelData" not in ds:
            continue
        fast = preprocess.native_pixels(ds)
        if fast is None:
            continue
        ref = ds.pixel_array
        assert fast.dtype == ref.dtype and fast.shape == ref.shape, path.name
        np.testing.assert_array_equal(fast, ref, err_msg=path.name)
        checked.add(path.name)
    assert len(checked) >= 20 and {"CT_small.dcm", "MR_small.dcm"} <= checked


@pytest.mark.parametrize("bits,stored,signed,frames", [
    (16, 12, 1, 1), (16, 12, 0, 1), (16, 16, 1, 3), (8, 7, 1, 1), (32, 20, 1, 2)])
def test_native_pixels_drop_unused_bits_as_pydicom(tmp_path, bits, stored, signed, frames):
    """Garbage in the unused high bits (PS3.5 8.1.1) is dropped, with sign extension."""
    rng = np.random.default_rng(bits + stored)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    raw = rng.integers(0, 2 ** bits, (frames, 6, 5), dtype=np.uint64).astype(f"<u{bits // 8}")
    path = tmp_path / "x.dcm"
    ds = synth_dataset(raw.view(dtype), stored)
    ds.save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path)
    fast, ref = preprocess.native_pixels(ds), ds.pixel_array
    assert fast.dtype == ref.dtype == dtype and fast.shape == ref.shape
    np.testing.assert_array_equal(fast, ref)
    if stored < bits:  # the garbage was there and is gone
        assert not np.array_equal(fast, raw.view(dtype).reshape(fast.shape))
    short = pydicom.dcmread(path)
    short.PixelData = short.PixelData[:-2]  # too few bytes: pydicom decodes (and reports)
    assert preprocess.native_pixels(short) is None


def synth_dataset(pixels: np.ndarray, bits_stored: int) -> pydicom.Dataset:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    frames, rows, cols = pixels.shape
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored = pixels.dtype.itemsize * 8, bits_stored
    ds.HighBit, ds.PixelRepresentation = bits_stored - 1, int(pixels.dtype.kind == "i")
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB" if pixels.dtype.itemsize == 1 else "OW"
    return ds


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm",
                                  "MR_small_implicit.dcm"])
def test_other_transfer_syntaxes_decode_like_the_uncompressed_file(name):
    """pydicom's copies of one MR slice, compressed (pylibjpeg plugins) or in another
    byte order, give exactly the frame of the uncompressed file."""
    workspace = preprocess.Workspace(opts((4, 16, 16)))
    ref = preprocess.read_frames(get_testdata_file("MR_small.dcm"), workspace)[0]
    got = preprocess.read_frames(get_testdata_file(name), workspace)[0]
    np.testing.assert_array_equal(got.pixels, ref.pixels)
    np.testing.assert_array_equal(got.position, ref.position)


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless"])
def test_compressed_series_builds_the_same_volume_and_corrupt_stream_is_named(tmp_path, syntax):
    uid = getattr(pydicom.uid, syntax)
    paths, _ = synth.write_body_series(str(tmp_path / "plain"), 12, 40, 36,
                                       rng=np.random.default_rng(4))
    compressed = []
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.compress(uid)
        compressed.append(str(tmp_path / f"c{k}.dcm"))
        ds.save_as(compressed[-1])
    assert pydicom.dcmread(compressed[0]).file_meta.TransferSyntaxUID == uid
    options = opts((8, 16, 16))
    np.testing.assert_array_equal(preprocess.build_volume(compressed, options).volume,
                                  preprocess.build_volume(paths, options).volume)
    # A truncated stream in one file: the series fails with decode_failed and pydicom's
    # message, named by the file's label, never its path.
    ds = pydicom.dcmread(compressed[5])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    ds.save_as(compressed[5])
    with pytest.raises(preprocess.SeriesError) as err:
        preprocess.build_volume(compressed, options, names=[f"f{k}" for k in range(12)])
    assert err.value.reason == "decode_failed" and err.value.message.startswith("f5: ")
    assert str(tmp_path) not in err.value.message


def test_workspace_reuse_with_padding_across_frame_sizes(tmp_path):
    """Padded series of several frame sizes, back and forth, through one workspace build
    exactly what fresh workspaces build (its scratch buffers and padding cache follow)."""
    rng = np.random.default_rng(8)
    options = opts((8, 16, 16), max_effective_spacing_mm=100.0)
    workspace = preprocess.Workspace(options)
    for k, size in enumerate([20, 24, 20, 28, 24]):
        mask = circle_outside(10, size, size)
        paths, _ = synth.write_body_series(str(tmp_path / f"s{k}"), 10, size, size,
                                           padding=-2000, pad_mask=mask, rng=rng)
        fresh = preprocess.build_volume(paths, options).volume
        reused = preprocess.build_volume(paths, options, workspace=workspace).volume
        np.testing.assert_array_equal(fresh, reused)


def test_workspace_reuse_gives_the_same_volumes(tmp_path):
    """One worker's kept buffers never leak one series into the next."""
    rng = np.random.default_rng(3)
    series = []
    for k, (n, size, view) in enumerate([(12, 24, synth.AXIAL), (5, 20, synth.CORONAL),
                                         (30, 24, synth.SAGITTAL), (12, 24, synth.AXIAL)]):
        paths, _ = synth.write_body_series(str(tmp_path / f"s{k}"), n, size, size + 4,
                                           orientation=view, rng=rng)
        series.append(paths)
    options = opts((8, 16, 16), max_effective_spacing_mm=100.0)
    workspace = preprocess.Workspace(options, keep_frames=16)
    for paths in series + series[::-1]:
        fresh = preprocess.build_volume(paths, options).volume
        reused = preprocess.build_volume(paths, options, workspace=workspace).volume
        np.testing.assert_array_equal(fresh, reused)
    assert len(workspace._blocks) <= 1 + 30 // workspace.BLOCK  # noqa: SLF001


# ---------------------------------------------------------------------- the dataset


def make_archive(root: Path, num_series: int = 6, n_slices=None, size: int = 32, seed: int = 0):
    """A small archive + index; returns the truths per series key."""
    rng = np.random.default_rng(seed)
    dicom, series, truths = root / "dicom", [], {}
    views = (synth.AXIAL, synth.CORONAL, synth.SAGITTAL)
    for k in range(num_series):
        n = n_slices or int(rng.integers(6, 40))
        spacing = 30.0 if k == 3 else float(rng.choice([1.0, 2.5, 5.0]))
        paths, truth = synth.write_body_series(
            str(dicom / f"s{k}"), n, size, size, orientation=views[k % 3], slice_spacing_mm=spacing,
            slopes=rng.choice([1.0, 2.0], n), enhanced=(k == 4), rng=rng)
        key = f"{rng.bytes(8).hex()}"
        truths[key] = truth
        series.append(dict(series_key=key, paths=paths, patient_key=f"p{k % 4}",
                           split=labels.SPLITS[k % 3], view=labels.VIEW[k % 3],
                           coverage="liver;kidney" if k % 2 else ""))
    bad = dicom / "s0" / "broken"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02" * 40)  # an unreadable file inside series 0
    series[0]["paths"].append(str(bad))
    synth.write_index(str(root / "index"), str(dicom), series)
    return truths


def tiny_config(**kw):
    config = config_lib.get_config("tiny")
    config.volume_shape = (8, 16, 16)
    config.min_slices = 4
    config.update(kw)
    return config


def read_dataset(path) -> dict:
    arrays = schema.open_arrays(str(path))
    out = {name: arr.read().result() for name, arr in arrays.items()}
    for name in ("manifest.csv", "errors.csv", "summary.json"):
        out[name] = (Path(path) / name).read_text()
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], np.ndarray):
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            assert a[name] == b[name], name


def test_build_writes_dataset_manifest_and_reasons(tmp_path):
    truths = make_archive(tmp_path)
    out = tmp_path / "ds"
    run = volume_builder.build(str(tmp_path / "index"), str(tmp_path / "dicom"), str(out),
                               tiny_config(), workers=0, progress=False)
    assert run["finalized"] and run["dataset"]["num_series"] == 6
    data = read_dataset(out)
    rows = list(csv.DictReader(data["manifest.csv"].splitlines()))
    assert list(rows[0]) == list(volume_builder.MANIFEST_COLUMNS)
    assert [r["series_key"] for r in rows] == sorted(truths)
    for i, r in enumerate(rows):
        assert int(r["index"]) == i
        if r["status"] == "included":
            ref = reference_uint8(truths[r["series_key"]], (8, 16, 16))
            assert np.abs(data["volume"][i].astype(int) - ref).max() <= 2
            assert data["split"][i] == labels.split_index(r["split"])
            assert data["effective_spacing_mm"][i] == pytest.approx(float(r["effective_spacing_mm"]), abs=1e-3)
        else:
            assert data["split"][i] == -1 and r["split"] == ""
            assert not data["volume"][i].any()
        assert data["view"][i] == labels.to_index("view", r["view"])
        assert list(data["coverage"][i]) == labels.coverage_to_multihot(r["coverage"])
    reasons = {r["reason"] for r in rows if r["status"] == "excluded"}
    assert reasons == {"decode_failed", "spacing_too_large"}
    # No PHI and no paths anywhere in the outputs.
    for name in ("manifest.csv", "errors.csv", "summary.json"):
        assert str(tmp_path) not in data[name] and "SYNTH" not in data[name] and "dicom" not in data[name]
    # Readable by zarr-python and plain TensorStore alike.
    import zarr  # requirements-dev.txt
    group = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(group["volume"][:], data["volume"])
    assert group.attrs["volume_shape"] == [8, 16, 16]
    plain = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out / "split")}}).result()
    np.testing.assert_array_equal(plain.read().result(), data["split"])


def test_shards_and_resume_reproduce_single_build(tmp_path):
    make_archive(tmp_path, num_series=5, n_slices=10)
    index, dicom = str(tmp_path / "index"), str(tmp_path / "dicom")
    volume_builder.build(index, dicom, str(tmp_path / "one"), tiny_config(), progress=False)
    sharded = str(tmp_path / "sharded")
    first = volume_builder.build(index, dicom, sharded, tiny_config(), shard=(0, 2), progress=False)
    assert not first["finalized"]
    # Before the last shard finishes, nothing is usable for training.
    assert np.all(schema.read_labels(sharded)["split"] == -1)
    second = volume_builder.build(index, dicom, sharded, tiny_config(), shard=(1, 2), workers=2,
                                  progress=False)
    assert second["finalized"] and second["series_this_run"] == 2
    assert_same(read_dataset(tmp_path / "one"), read_dataset(sharded))
    again = volume_builder.build(index, dicom, sharded, tiny_config(), progress=False)
    assert again["series_this_run"] == 0
    with pytest.raises(ValueError, match="--overwrite"):
        volume_builder.build(index, dicom, sharded, tiny_config(normalise="percentile"), progress=False)


def test_kill_minus_9_then_rerun_gives_identical_dataset(tmp_path):
    make_archive(tmp_path, num_series=24, n_slices=12, size=48)
    index, dicom = str(tmp_path / "index"), str(tmp_path / "dicom")
    reference = tmp_path / "uninterrupted"
    volume_builder.build(index, dicom, str(reference), tiny_config(), progress=False)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "data_prep.build_volumes", f"--index={index}",
           f"--dicom_root={dicom}", f"--out={out}", "--workers=2", "--noprogress",
           "--config=configs/build_volumes.py:tiny", "--config.volume_shape=(8,16,16)"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = out / "_build" / "done"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if markers.is_dir() and len(list(markers.glob("*.json"))) >= 3:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, workers included, mid-build
    assert proc.wait() == -signal.SIGKILL, "the build ended before it could be killed"
    done_at_kill = len(list(markers.glob("*.json")))  # not TensorStore's temporary files
    assert 3 <= done_at_kill < 24
    assert not (out / "manifest.csv").exists()
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["finalized"] and summary["series_this_run"] == 24 - done_at_kill
    assert_same(read_dataset(reference), read_dataset(out))


# --------------------------------------------------------------- phantom acceptance


@pytest.fixture(scope="module")
def phantom_archive(tmp_path_factory):
    from data_prep.phantoms import pacs
    out = tmp_path_factory.mktemp("phantom_pacs")
    pacs.generate(str(out), patients=3, seed=4, lits_cases=0, workers=1)
    return out


def real_index(archive: Path, index_dir: Path) -> tuple[list[dict], list[dict]]:
    """Runs data_prep.index (its command line, salt file in the temporary folder).

    Through the command line on purpose: the builder must accept what a user's index run
    writes, flags and all.
    Returns (files.csv rows, series.csv rows).
    """
    salt = index_dir.parent / "salt"
    salt.write_text("volume-builder-test-salt-0123456789\n")
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.index", f"--dicom_root={archive / 'dicom'}",
         f"--out={index_dir}", "--workers=1", f"--salt_file={salt}", "--noprogress",
         f"--collections={archive / 'collections.csv'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [list(csv.DictReader(open(index_dir / name))) for name in ("files.csv", "series.csv")]
    return rows[0], rows[1]


def padded_pixels(first_file: Path, physical: np.ndarray) -> np.ndarray:
    """bool mask of a reference volume's padded pixels, by the standard's rule.

    reference_volume gives physical values (GE padding -2000 → -3024 HU); padding is
    defined on stored values, so the values are mapped back with the file's rescale
    (the phantom's CT rescale is the same for every slice) and compared there.
    """
    ds = pydicom.dcmread(first_file, stop_before_pixels=True)
    if "PixelPaddingValue" not in ds:
        return np.zeros(physical.shape, bool)
    stored = np.rint((physical.astype(np.float64) - float(ds.get("RescaleIntercept", 0)))
                     / float(ds.get("RescaleSlope", 1)))
    low = high = int(ds.PixelPaddingValue)
    if "PixelPaddingRangeLimit" in ds:
        low, high = sorted((low, int(ds.PixelPaddingRangeLimit)))
    return (stored >= low) & (stored <= high)


def test_phantom_pacs_volumes_match_reference(phantom_archive, tmp_path):
    """The real index of the phantom PACS → every included series builds and matches its reference."""
    from data_prep.phantoms.pacs import reference_volume

    files, series = real_index(phantom_archive, tmp_path / "index")
    # Index series ↔ phantom truth, through the truth's first file of each series.
    key_of = {r["path"]: r["series_key"] for r in files}
    truth = {key_of[t["first_file"]]: t for t in csv.DictReader(open(phantom_archive / "truth.csv"))}
    included = {r["series_key"]: r for r in series if r["status"] == "included"}
    assert included and set(included) <= set(truth)
    assert {truth[k]["view"] for k in included} == set(labels.VIEW)
    shape = (48, 32, 32)  # the paper's 48 slices, so truth's effective spacing applies
    config = config_lib.get_config("size=32")
    run = volume_builder.build(str(tmp_path / "index"), str(phantom_archive / "dicom"),
                               str(tmp_path / "ds"), config, workers=0, progress=False)
    assert run["finalized"]
    # Every series the index includes builds: no decode failure, no geometry rejection.
    assert run["dataset"]["built"] == len(included) and run["dataset"]["excluded"] == {}
    data = read_dataset(tmp_path / "ds")
    rows = list(csv.DictReader(data["manifest.csv"].splitlines()))
    assert [r["series_key"] for r in rows] == sorted(included)
    padded_series = 0
    for i, r in enumerate(rows):
        t, s = truth[r["series_key"]], included[r["series_key"]]
        assert r["status"] == "included", (t["series_id"], r["reason"])
        # The builder's re-measured geometry agrees with the index's header reading.
        for col in ("n_slices", "rows", "columns"):
            assert r[col] == s[col], (t["series_id"], col)
        for col in ("slice_spacing_mm", "effective_spacing_mm"):
            assert float(r[col]) == pytest.approx(float(s[col]), abs=0.01), (t["series_id"], col)
            assert float(r[col]) == pytest.approx(float(t[col]), abs=0.01), (t["series_id"], col)
        assert data["split"][i] == labels.split_index(s["split"])
        ref = reference_volume(str(phantom_archive), t["series_id"])
        assert int(r["n_slices"]) == ref.shape[0] and (int(r["rows"]), int(r["columns"])) == ref.shape[1:]
        padded = padded_pixels(phantom_archive / "dicom" / t["first_file"], ref)
        if padded.any():
            padded_series += 1
            ref = fill_padded(ref, padded)
        expected = reference_uint8(ref, shape)
        got = data["volume"][i].astype(int)
        diff = np.abs(got - expected).max()
        corr = np.corrcoef(got.ravel(), expected.ravel())[0, 1]
        assert diff <= 2, (t["series_id"], diff, corr)  # same interpolation: must agree closely
    assert padded_series > 0  # GE-style axial CT with padding outside the circle was built
