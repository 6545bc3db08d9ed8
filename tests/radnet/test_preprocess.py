"""radnet.preprocess: the pixel rules of series → volume on real DICOM files (pydicom's
bundled files and small synthetic series written with pydicom).

References are computed independently of the builder: scipy's map_coordinates for the
linear resize (half-pixel centres, data_prep.phantoms.volume_synth.reference_uint8),
numpy for sorting and min-max.
"""

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from scipy import ndimage

from data_prep.phantoms import volume_synth as synth
from data_prep.phantoms.volume_synth import fill_padded, reference_uint8
from radnet import preprocess


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
    # The length check names it before any decoder tries (issue 16 point 5).
    assert err.value.reason == "pixel_data_mismatch" and str(tmp_path) not in err.value.message


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
    both, truth = synth.write_two_stack_file(str(tmp_path))
    built = preprocess.build_volume([both], opts((8, 16, 16)), orientation=synth.CORONAL)
    assert built.n_slices == 7
    assert np.abs(built.volume.astype(int) - reference_uint8(truth, (8, 16, 16))).max() <= 2
    with pytest.raises(preprocess.SeriesError, match="orientations differ"):
        preprocess.build_volume([both], opts((8, 16, 16)))  # without the index's orientation
    with pytest.raises(preprocess.SeriesError, match="none of its 16 frames"):
        preprocess.build_volume([both], opts((8, 16, 16)), orientation=synth.SAGITTAL)


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
    # A series that is all padding is constant: excluded (issue 16 point 5), never NaN.
    paths, truth = synth.write_body_series(str(tmp_path), 4, 8, 8, padding=-2000,
                                           pad_mask=np.ones((4, 8, 8), bool))
    with pytest.raises(preprocess.SeriesError) as err:
        preprocess.build_volume(paths, opts((4, 8, 8)))
    assert err.value.reason == "constant_volume"


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


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "JPGExtended.dcm", "examples_overlay.dcm",
                                  "JPEGLSNearLossless_16.dcm"])
def test_row_layout_check_on_pydicoms_non_square_images(name):
    """Stored as they are, pydicom's non-square greyscale images pass; the same bytes
    with Rows and Columns swapped (same length, so no header check can see it) are
    ``swapped_dimensions``."""
    pixels = pydicom.dcmread(get_testdata_file(name)).pixel_array
    pixels = pixels[pixels.shape[0] // 2] if pixels.ndim == 3 else pixels
    preprocess.check_row_layout(pixels, "file")
    with pytest.raises(preprocess.SeriesError) as err:
        preprocess.check_row_layout(pixels.reshape(pixels.shape[::-1]), "file 3 of 9")
    assert err.value.reason == "swapped_dimensions" and "file 3 of 9" in err.value.message


@pytest.mark.parametrize("shape", [(32, 24), (256, 192), (192, 256), (128, 64), (64, 128)])
def test_a_series_with_rows_and_columns_swapped_on_every_slice_is_excluded(tmp_path, shape):
    rows, cols = shape
    paths, _ = synth.write_body_series(str(tmp_path / "s"), 6, rows, cols,
                                       rng=np.random.default_rng(rows + cols))
    good = preprocess.build_volume(paths, opts((4, 16, 16)))
    assert good.rows == rows and good.columns == cols
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.Rows, ds.Columns = cols, rows
        ds.save_as(path)
    with pytest.raises(preprocess.SeriesError) as err:
        preprocess.build_volume(paths, opts((4, 16, 16)))
    assert err.value.reason == "swapped_dimensions", err.value.message


def test_row_layout_check_passes_an_image_without_structure():
    """Pure noise has no nearest row (ratio ≈ 1 both ways): it must pass — the check may
    miss a swap there, never exclude a correctly stored frame."""
    noise = np.random.default_rng(0).normal(1000, 50, (96, 64)).astype(np.int16)
    preprocess.check_row_layout(noise, "file")
    preprocess.check_row_layout(noise.reshape(64, 96), "file")
