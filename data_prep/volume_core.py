"""The pixel path of the volume builder: DICOM files of one series → uint8 volume.

Pure functions over pydicom and numpy (no TensorStore, no multiprocessing), so the
rules can be tested on small hand-made series:

1. every frame is decoded with pydicom and mapped to physical values with its own
   RescaleSlope/Intercept (classic files: per file; enhanced multi-frame: per frame
   from the functional groups) and resized in-plane at once, so a worker never
   holds more than one full-resolution frame beside the already shrunk series;
   pixel padding (PixelPaddingValue/RangeLimit, compared with the stored values) is
   filled with the series' least real value, so it neither becomes a grey level of its
   own nor squashes the contrast;
2. frames are ordered by their position along the slice normal
   n = row cosines × column cosines (never by InstanceNumber or file order) and the
   spacing is re-checked from those positions;
3. the slice axis is resampled linearly by position to ``num_slices`` when the series
   has at least that many slices; a shorter series is centred and padded with blank
   slices instead (the paper: never stretched);
4. the volume is min-max normalised and quantised to 256 grey levels.

The acquisition plane is kept: axis 0 = slices ascending along n, axis 1 = image rows,
axis 2 = image columns. Every resize uses the half-pixel convention (voxel centres at
(j + 0.5) · n_in / n_out − 0.5, clamped at the edges), which keeps the physical extent:
effective spacing = spacing · n_slices / num_slices.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np
import pydicom
from pydicom.multival import MultiValue

# Two frames closer than this along the normal are the same slice position (a repeated
# acquisition or a time series), which cannot be ordered into one volume.
DUPLICATE_POSITION_MM = 1e-3


class SeriesError(Exception):
    """A series that cannot become a volume; ``reason`` is from labels.EXCLUSION_REASONS."""

    def __init__(self, reason: str, message: str, info: dict | None = None):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.info = dict(info or {})  # geometry measured before the failure, for the manifest


@dataclasses.dataclass(frozen=True)
class VolumeOptions:
    """How a series becomes a volume (filled from configs/build_volumes.py)."""

    volume_shape: tuple[int, int, int] = (48, 192, 192)
    min_slices: int = 16
    max_effective_spacing_mm: float = 15.0
    # Relative deviation of one slice gap from the median gap that counts as a
    # missing or misplaced slice (re-check of the index's spacing).
    max_spacing_deviation: float = 0.25
    # Largest angle (degrees) between the row (or column) cosines of two slices of one
    # series; the index groups slices into series with the same angle, so the re-check
    # never rejects a series the index formed (at 1° and 200 mm from the centre the
    # stacked planes are off by 3.5 mm, under two output voxels of a 400 mm field).
    max_orientation_deviation_deg: float = 1.0
    antialias: bool = False  # in-plane triangle filter when shrinking (paper: off)
    normalise: str = "minmax"  # minmax | percentile | window
    percentiles: tuple[float, float] = (0.5, 99.5)
    window_level: float = 40.0  # HU, mode "window" (CT soft tissue by default)
    window_width: float = 400.0


@dataclasses.dataclass
class BuiltVolume:
    """A built volume and the geometry it was built from."""

    volume: np.ndarray  # uint8 [D, H, W]
    n_slices: int
    rows: int
    columns: int
    slice_spacing_mm: float  # mean gap between the original slices along n
    effective_spacing_mm: float  # gap between the D slices of ``volume``
    padded: bool


# --------------------------------------------------------------------------- resizing


def linear_taps(n_in: int, n_out: int, antialias: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights [n_out, K] of a half-pixel linear resize from n_in to n_out.

    Plain linear (the paper) uses the two neighbours of each output centre. With
    ``antialias`` and shrinking, the triangle kernel is widened by the shrink factor so
    every input sample contributes (weights renormalised at the edges).
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"cannot resize {n_in} samples to {n_out}")
    scale = n_in / n_out
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    if not antialias or scale <= 1.0:
        centres = np.clip(centres, 0.0, n_in - 1)
        lo = np.floor(centres).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = centres - lo
        idx = np.stack([lo, hi], axis=1)
        w = np.stack([1.0 - frac, frac], axis=1)
        return idx, w.astype(np.float32)
    half = scale  # support of the widened triangle: |x| < scale
    k = int(np.ceil(2 * half)) + 1
    start = np.floor(centres - half).astype(np.int64) + 1
    idx = start[:, None] + np.arange(k)[None, :]
    w = np.maximum(0.0, 1.0 - np.abs(idx - centres[:, None]) / half)
    w[(idx < 0) | (idx >= n_in)] = 0.0
    w /= w.sum(axis=1, keepdims=True)
    return np.clip(idx, 0, n_in - 1), w.astype(np.float32)


def apply_taps(x: np.ndarray, idx: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """Resizes ``x`` along ``axis`` with taps from :func:`linear_taps` (float32 out)."""
    x = np.moveaxis(x, axis, 0)
    out = None
    for k in range(idx.shape[1]):
        wk = w[:, k].reshape((-1,) + (1,) * (x.ndim - 1))
        term = x[idx[:, k]] * wk
        out = term if out is None else out + term
    return np.moveaxis(out.astype(np.float32, copy=False), 0, axis)


class PlaneResizer:
    """Resizes 2-D frames [rows, cols] to (out_rows, out_cols); taps cached per shape.

    With two taps per axis (plain linear) each output pixel is a weighted sum of four
    input pixels, gathered straight from the decoded frame: the cost scales with the
    output size, not the input size, so resizing stays cheap next to decoding. Wider
    anti-aliasing kernels are applied separably.
    """

    def __init__(self, out_rows: int, out_cols: int, antialias: bool):
        self.out = (out_rows, out_cols)
        self.antialias = antialias
        self._plans: dict[tuple[int, int], tuple] = {}

    def _plan(self, shape: tuple[int, int]):
        (ri, rw), (ci, cw) = (linear_taps(shape[0], self.out[0], self.antialias),
                              linear_taps(shape[1], self.out[1], self.antialias))
        if ri.shape[1] * ci.shape[1] <= 4:
            flat = (ri[:, None, :, None] * shape[1] + ci[None, :, None, :])  # [R, C, Kr, Kc]
            weight = rw[:, None, :, None] * cw[None, :, None, :]
            k = ri.shape[1] * ci.shape[1]
            return ("gather", flat.reshape(*self.out, k).transpose(2, 0, 1).copy(),
                    weight.reshape(*self.out, k).transpose(2, 0, 1).astype(np.float32).copy())
        return ("separable", (ri, rw), (ci, cw))

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """[rows, cols] any numeric dtype → float32 [out_rows, out_cols]."""
        key = frame.shape
        if key not in self._plans:
            self._plans[key] = self._plan(key)
        plan = self._plans[key]
        if plan[0] == "gather":
            _, flat, weight = plan
            taps = np.ravel(frame).take(flat).astype(np.float32)  # [K, out_rows, out_cols]
            taps *= weight
            return taps.sum(axis=0)
        _, (ri, rw), (ci, cw) = plan
        # Rows first: the intermediate is out_rows × cols, the cheaper order when shrinking.
        return apply_taps(apply_taps(frame, ri, rw, 0), ci, cw, 1)


def resample_slices(stack, positions_mm: np.ndarray, num_slices: int) -> np.ndarray:
    """[n, H, W] slices (an array or a list of [H, W]) at ascending ``positions_mm`` → [num_slices, H, W] by position.

    The output covers the same extent as the input voxels (first centre − gap/2 to last
    centre + gap/2) in ``num_slices`` equal steps; each output slice is interpolated
    linearly between the two input slices around its centre. For evenly spaced input this
    is exactly the half-pixel linear resize; for slightly uneven spacing it follows the
    true positions instead of assuming the slices are evenly spaced.
    """
    n = len(stack)
    if n == num_slices:
        return np.stack(stack).astype(np.float32, copy=False)
    gap = (positions_mm[-1] - positions_mm[0]) / (n - 1)
    step = gap * n / num_slices
    centres = positions_mm[0] - gap / 2 + (np.arange(num_slices) + 0.5) * step
    frac_index = np.interp(centres, positions_mm, np.arange(n, dtype=np.float64))
    lo = np.floor(frac_index).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    frac = (frac_index - lo).astype(np.float32)
    out = np.empty((num_slices, *stack[0].shape), np.float32)
    for k in range(num_slices):  # slice by slice: no [n, H, W] temporaries
        np.multiply(stack[lo[k]], 1.0 - frac[k], out=out[k])
        if frac[k]:
            out[k] += stack[hi[k]] * frac[k]
    return out


# ---------------------------------------------------------------------- quantisation


def to_uint8(volume: np.ndarray, options: VolumeOptions) -> np.ndarray:
    """Float volume → uint8 with 256 grey levels; a constant volume → zeros (never NaN).

    ``minmax`` (the paper) maps [min, max] to [0, 255]; ``percentile`` clips at the
    given percentiles first (robust to a few hot pixels); ``window`` uses a fixed
    CT window in HU (level ± width/2).
    """
    if options.normalise == "minmax":
        lo, hi = float(volume.min()), float(volume.max())
    elif options.normalise == "percentile":
        lo, hi = (float(v) for v in np.percentile(volume, options.percentiles))
    elif options.normalise == "window":
        lo = options.window_level - options.window_width / 2
        hi = options.window_level + options.window_width / 2
    else:
        raise ValueError(f"unknown normalise mode {options.normalise!r}; "
                         "choose minmax, percentile or window")
    if not hi > lo:
        return np.zeros(volume.shape, np.uint8)
    scaled = volume - np.float32(lo)
    scaled *= np.float32(255.0 / (hi - lo))
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return np.rint(scaled, out=scaled).astype(np.uint8)


# ------------------------------------------------------------------------ DICOM frames


@dataclasses.dataclass
class Frame:
    """One decoded image plane, already resized in-plane.

    With pixel padding (see :class:`Padding`) the padded pixels are left out of
    ``pixels`` (they count as 0) and ``pad_fraction`` says how much of each output pixel
    they cover, so the series can fill them with one value once every frame is read:
    filled = pixels + value × pad_fraction (exact, the resize being linear).
    """

    position: np.ndarray  # [3] ImagePositionPatient, mm
    orientation: np.ndarray  # [6] ImageOrientationPatient (row cosines, column cosines)
    rows: int
    columns: int
    pixels: np.ndarray  # float32 [out_rows, out_cols], physical values (HU for CT)
    pad_fraction: np.ndarray | None = None  # float32 [out_rows, out_cols]; None: no padding
    min_value: float | None = None  # least non-padded physical value; None: all padded


@dataclasses.dataclass(frozen=True)
class Padding:
    """Pixel Padding Value (0028,0120) and Range Limit (0028,0121), PS3.3 C.7.5.1.1.2.

    Padding marks pixels that are no image (GE CT writes -2000 outside the
    reconstruction circle). Both are compared with the STORED values, before any
    rescale; with a range limit every stored value between the two (inclusive, in
    either order) is padding.
    """

    low: int
    high: int

    @classmethod
    def from_dataset(cls, ds) -> "Padding | None":
        if "PixelPaddingValue" not in ds:
            return None
        # The two attributes take the pixel data's signedness (VR US or SS); a file that
        # encodes them with the other VR gets its bit pattern read back the right way.
        bits = int(ds.get("BitsAllocated", 16) or 16)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1

        def value(keyword):
            v = ds[keyword].value
            if isinstance(v, (list, tuple, MultiValue)):
                v = v[0]
            v = int(v)
            if signed and v >= 1 << (bits - 1):
                v -= 1 << bits
            elif not signed and v < 0:
                v += 1 << bits
            return v

        try:
            pad = value("PixelPaddingValue")
            limit = value("PixelPaddingRangeLimit") if "PixelPaddingRangeLimit" in ds else pad
        except (TypeError, ValueError, IndexError):
            return None  # an unreadable padding attribute cannot be honoured: no padding
        return cls(min(pad, limit), max(pad, limit))

    def mask(self, stored: np.ndarray) -> np.ndarray:
        """bool [rows, cols]: which stored values are padding."""
        if self.low == self.high:
            return stored == self.low
        return (stored >= self.low) & (stored <= self.high)


def _floats(value, count: int, what: str) -> np.ndarray:
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise SeriesError("inconsistent_geometry", f"{what} is not numeric: {value!r}") from None
    if out.shape != (count,) or not np.all(np.isfinite(out)):
        raise SeriesError("inconsistent_geometry", f"{what} needs {count} finite numbers")
    return out


def _first_item(ds, sequence: str):
    seq = ds.get(sequence) if ds is not None else None
    return seq[0] if seq else None


def _group_value(frame_group, shared_group, sequence: str, keyword: str):
    """A functional-group attribute: per-frame group first, then the shared group."""
    for group in (frame_group, shared_group):
        item = _first_item(group, sequence)
        if item is not None and keyword in item:
            return item[keyword].value
    return None


def _rescale(pixels: np.ndarray, slope, intercept) -> np.ndarray:
    """Stored values → physical values (in place when ``pixels`` is float32 already)."""
    slope = 1.0 if slope is None else float(slope)
    intercept = 0.0 if intercept is None else float(intercept)
    out = pixels.astype(np.float32, copy=False)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def _decode(ds, what: str) -> np.ndarray:
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples != 1:
        raise SeriesError("decode_failed", f"{what}: {samples} samples per pixel, not greyscale")
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        # MONOCHROME1 shows the lowest value white (PS3.3 C.7.6.3.1.2): scaled as it is, it
        # would reach the network with inverted grey levels next to MONOCHROME2 series.
        # Rejected by name until inversion is implemented together with pixel padding.
        raise SeriesError("decode_failed", f"{what}: MONOCHROME1 (inverted grey scale) is "
                                           "not supported")
    try:
        pixels = ds.pixel_array
    except Exception as err:  # pydicom/pylibjpeg raise many types for corrupt streams
        raise SeriesError("decode_failed", f"{what}: {type(err).__name__}: {err}") from None
    if pixels.dtype.kind == "f" and not np.all(np.isfinite(pixels)):
        raise SeriesError("decode_failed", f"{what}: non-finite pixel values")
    return pixels


def _physical(stored: np.ndarray, resize: "PlaneResizer", slope, intercept,
              padding: Padding | None, lut_ds=None) -> tuple[np.ndarray, np.ndarray | None, float | None]:
    """One stored frame → (resized physical values, pad fraction, least non-padded value).

    The least value is taken at full resolution in a file that declares padding (it
    fills the padded pixels of the series), else from the resized frame (cheap; it only
    matters for a series mixing files with and without padding). The pad fraction is
    None when no pixel is padded. ``lut_ds``: a dataset whose Modality LUT Sequence
    replaces the rescale (rare for CT/MR; pydicom applies the LUT exactly).
    """
    if padding is not None and stored.dtype.kind in "iu":
        return _physical_padded(stored, padding.mask(stored), resize, slope, intercept, lut_ds,
                                padding.low if padding.low == padding.high else None)
    if lut_ds is not None:
        from pydicom.pixels import apply_modality_lut
        physical = resize(np.asarray(apply_modality_lut(stored, lut_ds), dtype=np.float32))
    else:
        # The rescale is affine and the resize weights sum to one, so resizing the stored
        # values first is exact and rescales out_rows × out_cols values instead of all.
        physical = _rescale(resize(stored), slope, intercept)
    return physical, None, float(physical.min())


def _physical_padded(stored, mask, resize, slope, intercept, lut_ds, pad_value=None):
    """As :func:`_physical` for a file that declares padding; ``mask``: its padded pixels."""
    keep = ~mask
    padded = not keep.all()
    fraction = resize(mask) if padded else None  # share of padding in each output pixel
    if not keep.any():
        return np.zeros_like(fraction), fraction, None
    if lut_ds is not None:
        from pydicom.pixels import apply_modality_lut
        physical = np.asarray(apply_modality_lut(stored, lut_ds), dtype=np.float32)
        least = float(physical[keep].min())
        return resize(np.where(mask, np.float32(0), physical)), fraction, least
    s = 1.0 if slope is None else float(slope)
    b = 0.0 if intercept is None else float(intercept)
    info = np.iinfo(stored.dtype)
    # The least physical value is the least stored one for slope > 0 (the usual case).
    # (np.where + min is several times faster than a masked reduction, min(where=…).)
    if s >= 0:
        least_stored = float(np.where(mask, info.max, stored).min())
    else:
        least_stored = float(np.where(mask, info.min, stored).max())
    if not padded:
        return _rescale(resize(stored), s, b), None, s * least_stored + b
    # Padded pixels count as 0: resize(stored with padding → 0) · slope + intercept ·
    # (1 − fraction) is the resized physical frame without them, exactly. With one
    # padding value (the usual case) that is resize(stored) − value · fraction, which
    # spares a full-resolution pass.
    if pad_value is not None:
        physical = resize(stored)
        physical -= np.float32(pad_value) * fraction
    else:
        physical = resize(np.where(mask, stored.dtype.type(0), stored))
    physical *= np.float32(s)
    if b:
        physical += np.float32(b) * (np.float32(1.0) - fraction)
    return physical, fraction, s * least_stored + b


def read_frames(path: str, resize: PlaneResizer, what: str = "file") -> list[Frame]:
    """All frames of one DICOM file, rescaled to physical values and resized in-plane."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:
        raise SeriesError("decode_failed", f"{what}: unreadable: {type(err).__name__}: {err}") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise SeriesError("decode_failed", f"{what}: no pixel data")
    rows, cols = int(ds.Rows), int(ds.Columns)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    padding = Padding.from_dataset(ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None:  # enhanced multi-frame: geometry and rescale per frame
        shared = _first_item(ds, "SharedFunctionalGroupsSequence")
        if len(per_frame) != n_frames:
            raise SeriesError("inconsistent_geometry",
                              f"{what}: {len(per_frame)} frame groups for {n_frames} frames")
        pixels = _decode(ds, what).reshape(n_frames, rows, cols)
        frames = []
        for k, group in enumerate(per_frame):
            ipp = _group_value(group, shared, "PlanePositionSequence", "ImagePositionPatient")
            iop = _group_value(group, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
            if ipp is None or iop is None:
                raise SeriesError("inconsistent_geometry", f"{what}: frame {k + 1} has no plane position/orientation")
            slope = _group_value(group, shared, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = _group_value(group, shared, "PixelValueTransformationSequence", "RescaleIntercept")
            physical, fraction, least = _physical(pixels[k], resize, slope, intercept, padding)
            frames.append(Frame(_floats(ipp, 3, "ImagePositionPatient"),
                                _floats(iop, 6, "ImageOrientationPatient"), rows, cols,
                                physical, fraction, least))
        return frames
    if n_frames != 1:
        raise SeriesError("inconsistent_geometry",
                          f"{what}: {n_frames} frames without per-frame positions")
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        raise SeriesError("inconsistent_geometry", f"{what}: no ImagePositionPatient/ImageOrientationPatient")
    pixels = _decode(ds, what)
    physical, fraction, least = _physical(
        pixels, resize, ds.get("RescaleSlope"), ds.get("RescaleIntercept"), padding,
        lut_ds=ds if "ModalityLUTSequence" in ds else None)
    return [Frame(_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient"),
                  _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient"),
                  rows, cols, physical, fraction, least)]


def fill_padding(frames: Sequence[Frame]) -> None:
    """Gives padded pixels the least non-padded value of the series (in place).

    Padding (e.g. -3024 HU outside the CT reconstruction circle) is no image: left as
    it is, it would become the darkest grey and squash the contrast of the real image
    into the upper grey levels; given the series' least real value (air), it stays as
    dark as air and takes no grey levels of its own. A series that is all padding
    becomes constant (→ zeros).
    """
    if not any(f.pad_fraction is not None for f in frames):
        return
    least = [f.min_value for f in frames if f.min_value is not None]
    fill = np.float32(min(least) if least else 0.0)
    for f in frames:
        if f.pad_fraction is not None:
            f.pixels += fill * f.pad_fraction
            f.pad_fraction = None


# ----------------------------------------------------------------------------- series


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal n = row cosines × column cosines of ImageOrientationPatient."""
    o = np.asarray(orientation, dtype=np.float64)
    n = np.cross(o[:3], o[3:])
    norm = np.linalg.norm(n)
    if not norm > 0.5:  # cosines parallel or not unit vectors
        raise SeriesError("inconsistent_geometry", f"degenerate ImageOrientationPatient {list(o)}")
    return n / norm


def _unit_cosines(orientation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o = np.asarray(orientation, dtype=np.float64)
    r, c = o[:3], o[3:]
    return r / (np.linalg.norm(r) or 1.0), c / (np.linalg.norm(c) or 1.0)


def same_orientation(a: np.ndarray, b: np.ndarray, max_deg: float) -> bool:
    """Row cosines and column cosines of ``a`` and ``b`` each within ``max_deg`` degrees."""
    (ra, ca), (rb, cb) = _unit_cosines(a), _unit_cosines(b)
    cos_tol = np.cos(np.radians(max_deg))
    return bool(ra @ rb >= cos_tol and ca @ cb >= cos_tol)


def order_frames(frames: list[Frame], max_orientation_deg: float = 1.0
                 ) -> tuple[list[Frame], np.ndarray]:
    """Frames sorted ascending along the slice normal, and their positions along it (mm)."""
    first = frames[0]
    for f in frames[1:]:
        if (f.rows, f.columns) != (first.rows, first.columns):
            raise SeriesError("inconsistent_geometry",
                              f"image sizes differ: {first.rows}x{first.columns} and {f.rows}x{f.columns}")
        if not same_orientation(f.orientation, first.orientation, max_orientation_deg):
            raise SeriesError("inconsistent_geometry", "slice orientations differ within the series "
                              f"(by more than {max_orientation_deg}°)")
    normal = slice_normal(first.orientation)
    positions = np.array([f.position @ normal for f in frames])
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    if len(positions) > 1 and np.min(np.diff(positions)) < DUPLICATE_POSITION_MM:
        dup = int(np.sum(np.diff(positions) < DUPLICATE_POSITION_MM))
        raise SeriesError("inconsistent_geometry",
                          f"{dup} slice(s) share a position along the normal (repeated acquisition?)")
    return [frames[i] for i in order], positions


def frames_of_series(frames: list[Frame], orientation: Sequence[float] | None,
                     max_deg: float, what: str) -> list[Frame]:
    """The frames of a multi-frame file that belong to the series of ``orientation``.

    An enhanced multi-frame file can hold several stacks (e.g. axial and coronal); the
    index splits them into one series each by orientation. Only when a file's frames
    have several orientations are the others dropped; a file of one orientation is
    kept whole (a wrong orientation is then the re-check's business).
    """
    if orientation is None or len(frames) < 2:
        return frames
    if all(same_orientation(f.orientation, frames[0].orientation, max_deg) for f in frames[1:]):
        return frames
    target = np.asarray(orientation, dtype=np.float64)
    kept = [f for f in frames if same_orientation(f.orientation, target, max_deg)]
    if not kept:
        raise SeriesError("inconsistent_geometry",
                          f"{what}: none of its {len(frames)} frames has the series' orientation")
    return kept


def check_spacing(positions_mm: np.ndarray, max_deviation: float) -> float:
    """Mean slice gap (mm) after checking the gaps are even (no missing slice)."""
    gaps = np.diff(positions_mm)
    median = float(np.median(gaps))
    worst = float(np.max(np.abs(gaps - median)))
    if worst > max_deviation * median:
        raise SeriesError("inconsistent_geometry",
                          f"uneven slice gaps: median {median:.3f} mm, one off by {worst:.3f} mm "
                          "(a missing or misplaced slice)")
    return float((positions_mm[-1] - positions_mm[0]) / (len(positions_mm) - 1))


def build_volume(paths: Iterable[str], options: VolumeOptions,
                 names: Sequence[str] | None = None,
                 orientation: Sequence[float] | None = None) -> BuiltVolume:
    """DICOM files of one series (any order) → :class:`BuiltVolume`.

    ``names`` label the files in error messages (default: "file k"); never pass paths
    that could carry patient names into outputs. ``orientation``: the series' six
    cosines from the index, which pick the series' frames out of a multi-frame file
    holding several stacks. Raises :class:`SeriesError`.
    """
    num_slices, out_rows, out_cols = options.volume_shape
    resize = PlaneResizer(out_rows, out_cols, options.antialias)
    frames: list[Frame] = []
    paths = list(paths)
    if not paths:
        raise SeriesError("decode_failed", "the series has no files")
    for k, path in enumerate(paths):
        what = names[k] if names is not None else f"file {k + 1} of {len(paths)}"
        frames.extend(frames_of_series(read_frames(path, resize, what), orientation,
                                       options.max_orientation_deviation_deg, what))
    frames, positions = order_frames(frames, options.max_orientation_deviation_deg)
    fill_padding(frames)
    n, rows, columns = len(frames), frames[0].rows, frames[0].columns
    info = {"n_slices": n, "rows": rows, "columns": columns}
    if n < max(2, options.min_slices):
        raise SeriesError("too_few_slices", f"{n} slices, fewer than {max(2, options.min_slices)}",
                          info)
    try:
        spacing = check_spacing(positions, options.max_spacing_deviation)
    except SeriesError as err:
        err.info.update(info)
        raise
    padded = n < num_slices
    # The paper's effective spacing: the voxel extent n · spacing shared by the resized
    # slices; a padded series keeps its slices and so its spacing.
    effective = spacing if padded else spacing * n / num_slices
    info.update(slice_spacing_mm=spacing, effective_spacing_mm=effective)
    if effective > options.max_effective_spacing_mm:
        raise SeriesError("spacing_too_large",
                          f"effective slice spacing {effective:.2f} mm > "
                          f"{options.max_effective_spacing_mm} mm", info)
    slices = [f.pixels for f in frames]  # n × float32 [out_rows, out_cols]
    del frames
    if padded:
        volume = np.zeros((num_slices, out_rows, out_cols), np.uint8)
        before = (num_slices - n) // 2
        volume[before:before + n] = to_uint8(np.stack(slices), options)
    else:
        volume = to_uint8(resample_slices(slices, positions, num_slices), options)
    return BuiltVolume(volume=volume, n_slices=n, rows=rows, columns=columns,
                       slice_spacing_mm=spacing, effective_spacing_mm=effective, padded=padded)
