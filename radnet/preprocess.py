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
import os
import stat
from typing import Callable, Iterable, Sequence

import numpy as np
import pydicom

from pydicom.multival import MultiValue

from radnet import rules
from radnet.dicom import geometry
from radnet.dicom import values as dicom_values

# The paper's volume rules (Du & Vardhanabhuti 2020, 2.1.5), shared by the index
# (configs/index.py), which predicts them, and the volume builder
# (configs/build_volumes.py), which applies them: one place, so the two never drift.
PAPER_VOLUME_SHAPE = (48, 192, 192)  # slices along the normal, rows, columns
PAPER_MIN_SLICES = 16  # fewer slices: too_few_slices
PAPER_MAX_EFFECTIVE_SPACING_MM = 15.0  # effective slice spacing above it: spacing_too_large

# Two frames closer than this along the normal are the same slice position (a repeated
# acquisition or a time series), which cannot be ordered into one volume.
DUPLICATE_POSITION_MM = 1e-3


class SeriesError(Exception):
    """A series that cannot become a volume; ``reason`` is from labels.EXCLUSION_REASONS.

    ``transient``: the failure says nothing about the series (a file could not be read
    just now: I/O error, a mount gone); the volume build tries it again in its next run.
    """

    def __init__(self, reason: str, message: str, info: dict | None = None,
                 transient: bool = False):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.info = dict(info or {})  # geometry measured before the failure, for the manifest
        self.transient = transient


@dataclasses.dataclass(frozen=True)
class VolumeOptions:
    """How a series becomes a volume (filled from configs/build_volumes.py)."""

    volume_shape: tuple[int, int, int] = PAPER_VOLUME_SHAPE
    min_slices: int = PAPER_MIN_SLICES
    max_effective_spacing_mm: float = PAPER_MAX_EFFECTIVE_SPACING_MM
    # Relative deviation of one slice gap from the median gap that counts as a
    # missing or misplaced slice (re-check of the index's spacing).
    max_spacing_deviation: float = 0.25
    # Largest angle (degrees) between the row (or column) cosines of two slices of one
    # series; the index groups slices into series with the same angle, so the re-check
    # never rejects a series the index formed (at 1° and 200 mm from the centre the
    # stacked planes are off by 3.5 mm, under two output voxels of a 400 mm field).
    max_orientation_deviation_deg: float = geometry.ORIENTATION_GROUP_DEG
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


def memory_estimate_bytes(rows: int, columns: int, n_slices: int, n_files: int,
                          options: "VolumeOptions") -> int:
    """Peak memory (bytes) of building one series, from its header facts, before decoding.

    The largest file's pixel data twice (its bytes as read and, for compressed data, the
    decoded array; 2 bytes per stored value), the full-resolution temporaries of one frame
    (float32 values, padding masks), the series' resized frames and the float volume.
    A 46340 × 46340 image the index accepted killed its worker by the OOM killer; with
    this estimate against ``max_series_memory_mb`` it is ``too_large`` before any decode.
    """
    num_slices, out_rows, out_cols = options.volume_shape
    frames_per_file = -(-max(n_slices, 1) // max(n_files, 1))
    plane = rows * columns
    return int(2 * 2 * plane * frames_per_file + 6 * plane
               + 4 * out_rows * out_cols * (max(n_slices, 1) + num_slices))


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

    Plain linear (two taps per axis) runs separably as two interpolations: whole input
    rows are picked for each output row (contiguous copies) and blended, then the
    columns of that [out_rows, cols] intermediate; the cost scales with the output
    size, not the input size, so resizing stays cheap next to decoding. Every
    intermediate lives in a buffer kept between calls, so resizing a frame into
    ``out`` allocates nothing and never touches fresh pages (page faults, not
    arithmetic, were the measured cost). Wider anti-aliasing kernels are applied
    with :func:`apply_taps`.
    """

    def __init__(self, out_rows: int, out_cols: int, antialias: bool):
        self.out = (out_rows, out_cols)
        self.antialias = antialias
        self._plans: dict[tuple[int, int], tuple] = {}
        self._buffers: dict[tuple, np.ndarray] = {}

    def _plan(self, shape: tuple[int, int]):
        (ri, rw), (ci, cw) = (linear_taps(shape[0], self.out[0], self.antialias),
                              linear_taps(shape[1], self.out[1], self.antialias))
        if ri.shape[1] == 2 and ci.shape[1] == 2:
            # out = lo + (hi − lo) · w, per axis (w: the weight of the upper neighbour).
            return ("lerp", ri[:, 0].astype(np.intp), ri[:, 1].astype(np.intp),
                    rw[:, 1:2].astype(np.float32), ci[:, 0].astype(np.intp),
                    ci[:, 1].astype(np.intp), cw[:, 1].astype(np.float32))
        return ("separable", (ri, rw), (ci, cw))

    def _buffer(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        key = (name, shape, np.dtype(dtype).str)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = np.empty(shape, dtype)
        return buf

    def __call__(self, frame: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """[rows, cols] any numeric dtype → float32 [out_rows, out_cols] (into ``out`` if given)."""
        key = frame.shape
        if key not in self._plans:
            self._plans[key] = self._plan(key)
        plan = self._plans[key]
        if out is None:
            out = np.empty(self.out, np.float32)
        if plan[0] == "lerp":
            _, r_lo, r_hi, w_row, c_lo, c_hi, w_col = plan
            if frame.dtype == np.bool_:
                frame = frame.view(np.uint8)
            between = (self.out[0], key[1])
            lower = self._buffer("lower", between, np.float32)
            upper = self._buffer("upper", between, np.float32)
            # mode="clip": the indices are in range by construction, and an unbuffered
            # take writes straight into the kept buffers.
            for rows, dest in ((r_lo, lower), (r_hi, upper)):
                picked = self._buffer("picked", between, frame.dtype)
                np.take(frame, rows, axis=0, out=picked, mode="clip")
                np.copyto(dest, picked, casting="unsafe")
            upper -= lower
            upper *= w_row
            lower += upper  # the rows, interpolated: [out_rows, cols]
            right = self._buffer("right", self.out, np.float32)
            np.take(lower, c_lo, axis=1, out=out, mode="clip")
            np.take(lower, c_hi, axis=1, out=right, mode="clip")
            right -= out
            right *= w_col
            out += right
            return out
        _, (ri, rw), (ci, cw) = plan
        # Rows first: the intermediate is out_rows × cols, the cheaper order when shrinking.
        out[...] = apply_taps(apply_taps(frame, ri, rw, 0), ci, cw, 1)
        return out


class Workspace:
    """Memory one worker reuses from series to series.

    A series' resized frames go into slots of fixed blocks, and the float volume into
    one kept buffer, so building a series of hundreds of slices allocates (and faults
    in) no fresh pages once the first series has been built. The blocks stay as many
    as the largest series needed, up to ``keep_frames``; blocks beyond that are
    released when the next series starts, so memory stays bounded by the current
    series.
    """

    BLOCK = 32

    def __init__(self, options: "VolumeOptions", keep_frames: int = 1024):
        _, rows, cols = options.volume_shape
        self.frame_shape = (rows, cols)
        self.antialias = options.antialias
        self.resize = PlaneResizer(rows, cols, options.antialias)
        self.keep_blocks = max(1, keep_frames // self.BLOCK)
        self._blocks: list[np.ndarray] = []
        self._used = 0
        self._volume = np.empty((0, rows, cols), np.float32)
        self._scratch: dict[str, np.ndarray] = {}  # one buffer per name: bounded memory
        # The last padding mask seen, its resized fraction and padded count, and what
        # derives from it: offsets per rescale, bound arrays per dtype.
        self._pad_cache: tuple | None = None
        self._pad_offsets: dict[tuple, np.ndarray] = {}
        self._pad_bounds: dict[tuple, np.ndarray] = {}

    def fits(self, options: "VolumeOptions") -> bool:
        return (tuple(options.volume_shape[1:]) == self.frame_shape
                and options.antialias == self.antialias)

    def start_series(self) -> None:
        self._used = 0
        del self._blocks[self.keep_blocks:]

    def frame(self) -> np.ndarray:
        """A free float32 [rows, cols] slot for the current series."""
        block, k = divmod(self._used, self.BLOCK)
        if block == len(self._blocks):
            self._blocks.append(np.empty((self.BLOCK, *self.frame_shape), np.float32))
        self._used += 1
        return self._blocks[block][k]

    def pad_fraction(self, mask: np.ndarray) -> tuple[np.ndarray | None, int]:
        """(resized ``mask``: the share of padding in each output pixel, or None when
        nothing is padded; the number of padded pixels).

        The padding of a CT series is the region outside the reconstruction circle,
        the same in every slice: a mask equal to the previous one reuses its fraction
        (exactly the same values) instead of resizing it again. Treat the returned
        array as read-only; frames share it.
        """
        cached = self._pad_cache
        if cached is not None and cached[0].shape == mask.shape:
            differs = self.scratch("pad_differs", mask.shape, np.bool_)
            if not np.not_equal(mask, cached[0], out=differs).any():
                return cached[1], cached[2]
        count = int(np.count_nonzero(mask))
        fraction = self.resize(mask) if count else None  # a new array: older frames keep theirs
        self._pad_cache = (mask.copy(), fraction, count)
        self._pad_offsets.clear()
        self._pad_bounds.clear()
        return fraction, count

    def pad_offset(self, slope: float, intercept: float, pad_value: int) -> np.ndarray:
        """For the last mask of :meth:`pad_fraction`: intercept − (slope · pad_value +
        intercept) · fraction, float32 [out_rows, out_cols] (kept per rescale)."""
        _, fraction, _ = self._pad_cache
        key = (float(slope), float(intercept), int(pad_value))
        if key not in self._pad_offsets:
            if len(self._pad_offsets) > 8:  # per-slice rescales: keep only the current few
                self._pad_offsets.clear()
            offset = fraction * np.float32(-(slope * pad_value + intercept))
            offset += np.float32(intercept)
            self._pad_offsets[key] = offset
        return self._pad_offsets[key]

    def pad_bound(self, dtype, high: bool) -> np.ndarray:
        """For the last mask of :meth:`pad_fraction`: the dtype's maximum (``high``) or
        minimum on padded pixels and the other extreme elsewhere, so that an elementwise
        max (min) with the stored values pushes exactly the padding out of the way."""
        mask = self._pad_cache[0]
        key = (np.dtype(dtype).str, high)
        if key not in self._pad_bounds:
            info = np.iinfo(dtype)
            far, near = (info.max, info.min) if high else (info.min, info.max)
            self._pad_bounds[key] = np.where(mask, dtype.type(far), dtype.type(near))
        return self._pad_bounds[key]

    def scratch(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """The kept buffer ``name`` for temporaries of one file (overwritten by the next);
        made anew only when the shape or dtype asked for changes."""
        buf = self._scratch.get(name)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
            buf = self._scratch[name] = np.empty(shape, dtype)
        return buf

    def volume(self, n: int) -> np.ndarray:
        """A float32 [n, rows, cols] buffer (overwritten by the next call)."""
        if self._volume.shape[0] < n:
            self._volume = np.empty((n, *self.frame_shape), np.float32)
        return self._volume[:n]


def resample_slices(stack, positions_mm: np.ndarray, num_slices: int,
                    out: np.ndarray | None = None) -> np.ndarray:
    """[n, H, W] slices (an array or a list of [H, W]) at ascending ``positions_mm`` → [num_slices, H, W] by position.

    The output covers the same extent as the input voxels (first centre − gap/2 to last
    centre + gap/2) in ``num_slices`` equal steps; each output slice is interpolated
    linearly between the two input slices around its centre. For evenly spaced input this
    is exactly the half-pixel linear resize; for slightly uneven spacing it follows the
    true positions instead of assuming the slices are evenly spaced. ``out``: a float32
    [num_slices, H, W] buffer to fill (else one is allocated).
    """
    n = len(stack)
    if out is None:
        out = np.empty((num_slices, *stack[0].shape), np.float32)
    if n == num_slices:
        for k in range(n):
            out[k] = stack[k]
        return out
    gap = (positions_mm[-1] - positions_mm[0]) / (n - 1)
    step = gap * n / num_slices
    centres = positions_mm[0] - gap / 2 + (np.arange(num_slices) + 0.5) * step
    frac_index = np.interp(centres, positions_mm, np.arange(n, dtype=np.float64))
    lo = np.floor(frac_index).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    frac = (frac_index - lo).astype(np.float32)
    for k in range(num_slices):  # slice by slice: no [n, H, W] temporaries
        np.multiply(stack[lo[k]], 1.0 - frac[k], out=out[k])
        if frac[k]:
            out[k] += stack[hi[k]] * frac[k]
    return out


# ---------------------------------------------------------------------- quantisation


def to_uint8(volume: np.ndarray, options: VolumeOptions, in_place: bool = False) -> np.ndarray:
    """Float volume → uint8 with 256 grey levels; a constant volume → zeros (never NaN).

    ``minmax`` (the paper) maps [min, max] to [0, 255]; ``percentile`` clips at the
    given percentiles first (robust to a few hot pixels); ``window`` uses a fixed
    CT window in HU (level ± width/2). ``in_place``: scale inside ``volume`` (a float32
    scratch buffer) instead of a copy.
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
    if in_place and volume.dtype == np.float32:
        scaled = volume
        scaled -= np.float32(lo)
    else:
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
        if not dicom_values.has(ds, "PixelPaddingValue"):
            return None
        # The two attributes take the pixel data's signedness (VR US or SS); a file that
        # encodes them with the other VR gets its bit pattern read back the right way.
        bits = int(dicom_values.number(ds, "BitsAllocated") or 16)
        signed = dicom_values.number(ds, "PixelRepresentation") == 1

        def value(keyword):
            v = dicom_values.value(ds, keyword)
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
            limit = (value("PixelPaddingRangeLimit")
                     if dicom_values.has(ds, "PixelPaddingRangeLimit") else pad)
        except (TypeError, ValueError, IndexError):
            return None  # an unreadable padding attribute cannot be honoured: no padding
        return cls(min(pad, limit), max(pad, limit))

    def mask(self, stored: np.ndarray, out: np.ndarray | None = None,
             scratch: np.ndarray | None = None) -> np.ndarray:
        """bool [rows, cols]: which stored values are padding (into ``out``, using
        ``scratch`` of the same shape for a range, when given)."""
        if self.low == self.high:
            return np.equal(stored, self.low, out=out)
        out = np.greater_equal(stored, self.low, out=out)
        out &= np.less_equal(stored, self.high, out=scratch)
        return out


def _floats(value, count: int, what: str) -> np.ndarray:
    if isinstance(value, (str, bytes, int, float)):  # one value (raw text or converted)
        value = [value]
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


def check_rescale(slope, intercept, what: str) -> None:
    """RescaleSlope must be a finite non-zero number and RescaleIntercept a finite one, in
    float32 too (the volume's arithmetic): one slice with slope NaN, 0 or 1e39 turned the
    whole min-max normalised series into zeros. Absent values mean 1 and 0."""
    for name, value, zero_ok in (("RescaleSlope", slope, False), ("RescaleIntercept", intercept, True)):
        if value is None:
            continue
        if isinstance(value, (list, tuple, MultiValue)):
            value = value[0] if len(value) else None
            if value is None:
                continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise SeriesError("invalid_rescale", f"{what}: {name} {str(value)[:20]!r} is not a number") from None
        if not np.isfinite(np.float32(number)) or (number == 0.0 and not zero_ok):
            raise SeriesError("invalid_rescale", f"{what}: {name} is {number:g}")


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


# Uncompressed little-endian transfer syntaxes (deflate only compresses the file): the
# pixel data element holds the stored values as they are.
_NATIVE_LITTLE_ENDIAN = frozenset({pydicom.uid.ImplicitVRLittleEndian,
                                   pydicom.uid.ExplicitVRLittleEndian,
                                   pydicom.uid.DeflatedExplicitVRLittleEndian})


def native_pixels(ds, scratch: Callable[[str, tuple, np.dtype], np.ndarray] | None = None
                  ) -> np.ndarray | None:
    """The stored values of uncompressed little-endian greyscale pixel data, or None.

    The same values and dtype as pydicom's ``pixel_array`` (shape [frames, rows, cols]
    for several frames), read straight from the element's bytes: pydicom's native
    decoder copies the whole frame into a fresh array, which costs more than the
    rest of reading the file once that memory has to be faulted in. Unused high bits
    (Bits Stored < Bits Allocated) are dropped as pydicom does by default (PS3.5 8.1.1:
    their content is undefined), with a sign extension for signed data, into
    ``scratch("stored", shape, dtype)`` (a kept buffer) or a new array. None — let pydicom
    decode (and report any problem) — for anything else: compressed or big-endian
    data, float pixel data, colour, bit depths other than 8/16/32, or too few bytes.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = dicom_values.value(meta, "TransferSyntaxUID") if meta is not None else None
    element = dicom_values.element(ds, "PixelData")
    if syntax not in _NATIVE_LITTLE_ENDIAN or element is None:
        return None
    try:
        data = element.value

        def count(keyword, default=None):  # absent → default; malformed → ValueError
            v = dicom_values.number(ds, keyword, default, strict=True)
            if v is None or v != int(v):
                raise ValueError(keyword)
            return int(v)

        bits = count("BitsAllocated")
        stored_bits = count("BitsStored", bits)
        signed = count("PixelRepresentation") == 1
        rows, cols = count("Rows"), count("Columns")
        frames = count("NumberOfFrames", 1)
        samples = count("SamplesPerPixel", 1)
    except (TypeError, ValueError):  # a missing or malformed attribute: pydicom decides
        return None
    count = rows * cols * frames
    if (not isinstance(data, bytes) or samples != 1 or bits not in (8, 16, 32)
            or not 0 < stored_bits <= bits or count <= 0 or len(data) < count * bits // 8):
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    shape = (frames, rows, cols) if frames > 1 else (rows, cols)
    pixels = np.frombuffer(data, dtype=dtype, count=count).reshape(shape)
    if stored_bits < bits:
        shift = bits - stored_bits
        out = scratch("stored", shape, dtype) if scratch is not None else np.empty(shape, dtype)
        np.left_shift(pixels, shift, out=out)
        np.right_shift(out, shift, out=out)  # arithmetic for signed: sign extension
        pixels = out
    return pixels


def check_pixel_data_length(ds, what: str) -> None:
    """Uncompressed Pixel Data must hold Rows × Columns × frames × samples × BitsAllocated
    bits (plus one byte of padding to an even length). BitsAllocated 8 declared on 16-bit
    data passes a "long enough" check and decodes to garbage; this one excludes it
    (``pixel_data_mismatch``). Compressed data is checked by its decoder."""
    meta = getattr(ds, "file_meta", None)
    syntax = dicom_values.value(meta, "TransferSyntaxUID") if meta is not None else None
    element = dicom_values.element(ds, "PixelData")
    if element is None or not isinstance(element.value, bytes):
        return
    try:
        if syntax is None or pydicom.uid.UID(str(syntax)).is_compressed:
            return
    except (ValueError, AttributeError):
        return
    numbers = {}
    for keyword, default in (("Rows", None), ("Columns", None), ("BitsAllocated", None),
                             ("NumberOfFrames", 1), ("SamplesPerPixel", 1)):
        value = dicom_values.number(ds, keyword, default)
        if value is None or value != int(value) or value < 1:
            return  # the decode names a missing or malformed attribute
        numbers[keyword] = int(value)
    expected = (numbers["Rows"] * numbers["Columns"] * numbers["NumberOfFrames"]
                * numbers["SamplesPerPixel"] * numbers["BitsAllocated"] + 7) // 8
    if len(element.value) not in (expected, expected + (expected % 2)):
        raise SeriesError("pixel_data_mismatch",
                          f"{what}: Pixel Data holds {len(element.value)} bytes, "
                          f"Rows×Columns×frames×samples×BitsAllocated needs {expected}")


# A stored frame whose rows run Rows pixels wide instead of Columns (Rows and Columns swapped
# on every slice: the Pixel Data length still matches) decodes to a sheared, striped image.
# In a true image the pixel one row below (a step of Columns in the flat array) is the
# closest neighbour; with the two swapped, the step of Rows is. Flagged when the mean
# absolute difference at a step of Rows is below this share of the one at Columns.
# pydicom's bundled non-square images and the phantoms sit at 2.0-35 stored correctly and
# at 0.03-0.5 swapped (0.5: Rows = 2 × Columns, where a step of Columns is two true rows);
# tests/radnet/test_preprocess.py. A noisy image with no structure gives ≈ 1 either way
# and passes: a miss, never a wrong exclusion.
SWAPPED_LAYOUT_RATIO = 0.7


def check_row_layout(stored: np.ndarray, what: str) -> None:
    """``swapped_dimensions`` when a non-square frame's rows look ``Rows`` long.

    Measured on one frame of a series (the middle file's): the index and the header
    cannot tell Rows/Columns swapped consistently on every slice (same byte count)."""
    if stored.ndim != 2:
        return
    rows, cols = stored.shape
    if rows == cols or min(rows, cols) < 8:
        return
    flat = stored.reshape(-1).astype(np.float32)
    step_declared = float(np.abs(flat[cols:] - flat[:-cols]).mean())
    step_swapped = float(np.abs(flat[rows:] - flat[:-rows]).mean())
    if step_swapped < SWAPPED_LAYOUT_RATIO * step_declared:
        raise SeriesError("swapped_dimensions",
                          f"{what}: the pixel rows look {rows} wide, not Columns = {cols}: "
                          f"Rows ({rows}) and Columns ({cols}) appear swapped "
                          f"(neighbour difference {step_swapped:.3g} at a step of Rows, "
                          f"{step_declared:.3g} at a step of Columns)")


def _decode(ds, what: str, scratch=None) -> np.ndarray:
    samples = dicom_values.number(ds, "SamplesPerPixel", 1.0)
    if samples != 1:
        raise SeriesError("decode_failed", f"{what}: {samples:g} samples per pixel, not greyscale")
    if str(dicom_values.value(ds, "PhotometricInterpretation") or "").strip() == "MONOCHROME1":
        # MONOCHROME1 shows the lowest value white (PS3.3 C.7.6.3.1.2): scaled as it is, it
        # would reach the network with inverted grey levels next to MONOCHROME2 series.
        # Rejected by name until inversion is implemented together with pixel padding.
        raise SeriesError("decode_failed", f"{what}: MONOCHROME1 (inverted grey scale) is "
                                           "not supported")
    check_pixel_data_length(ds, what)
    pixels = native_pixels(ds, scratch)
    if pixels is not None:
        return pixels
    try:
        pixels = ds.pixel_array
    except Exception as err:  # pydicom/pylibjpeg raise many types for corrupt streams
        raise SeriesError("decode_failed", f"{what}: {type(err).__name__}: {err}") from None
    if pixels.dtype.kind == "f" and not np.all(np.isfinite(pixels)):
        raise SeriesError("decode_failed", f"{what}: non-finite pixel values")
    return pixels


def _physical(stored: np.ndarray, workspace: "Workspace", slope, intercept,
              padding: Padding | None, lut_ds=None
              ) -> tuple[np.ndarray, np.ndarray | None, float | None]:
    """One stored frame → (resized physical values, pad fraction, least non-padded value).

    The resized values (and the pad fraction) go into slots of ``workspace``. The
    least value is taken at full resolution in a file that declares padding (it fills
    the padded pixels of the series), else from the resized frame (cheap; it only
    matters for a series mixing files with and without padding). The pad fraction is
    None when no pixel is padded. ``lut_ds``: a dataset whose Modality LUT Sequence
    replaces the rescale (rare for CT/MR; pydicom applies the LUT exactly).
    """
    resize, out = workspace.resize, workspace.frame()
    if padding is not None and stored.dtype.kind in "iu":
        return _physical_padded(stored, padding, workspace, slope, intercept, lut_ds, out)
    if lut_ds is not None:
        from pydicom.pixels import apply_modality_lut
        physical = resize(np.asarray(apply_modality_lut(stored, lut_ds), dtype=np.float32), out)
    else:
        # The rescale is affine and the resize weights sum to one, so resizing the stored
        # values first is exact and rescales out_rows × out_cols values instead of all.
        physical = _rescale(resize(stored, out), slope, intercept)
    return physical, None, float(physical.min())


def _physical_padded(stored, padding, workspace, slope, intercept, lut_ds, out):
    """As :func:`_physical` for a file that declares padding.

    Full-resolution temporaries live in the workspace's scratch buffers: a CT series
    with padding in every slice would otherwise fault in fresh memory several times
    per slice.
    """
    resize, scratch = workspace.resize, workspace.scratch
    mask = padding.mask(stored, out=scratch("pad_mask", stored.shape, np.bool_),
                        scratch=(None if padding.low == padding.high
                                 else scratch("pad_mask_upper", stored.shape, np.bool_)))
    fraction, n_padded = workspace.pad_fraction(mask)  # padding share per output pixel
    if n_padded == mask.size:
        out[...] = 0
        return out, fraction, None
    if lut_ds is not None:
        from pydicom.pixels import apply_modality_lut
        physical = np.asarray(apply_modality_lut(stored, lut_ds), dtype=np.float32)
        least = float(physical[~mask].min())
        return resize(np.where(mask, np.float32(0), physical), out), fraction, least
    s = 1.0 if slope is None else float(slope)
    b = 0.0 if intercept is None else float(intercept)
    info = np.iinfo(stored.dtype)
    # The least physical value is the least stored one for slope > 0 (the usual case):
    # the stored values with padding pushed to the dtype's far end, reduced. (An
    # elementwise max/min with a per-mask bound array is several times faster than a
    # masked copy or a masked reduction.)
    if n_padded:
        real = scratch("pad_real", stored.shape, stored.dtype)
        bound = workspace.pad_bound(stored.dtype, high=s >= 0)
        (np.maximum if s >= 0 else np.minimum)(stored, bound, out=real)
    else:
        real = stored
    least_stored = float(real.min() if s >= 0 else real.max())
    if not n_padded:
        return _rescale(resize(stored, out), s, b), None, s * least_stored + b
    # Padded pixels count as 0: resize(stored with padding → 0) · slope + intercept ·
    # (1 − fraction) is the resized physical frame without them, exactly. With one
    # padding value p (the usual case) that is slope · resize(stored) + [intercept −
    # (slope · p + intercept) · fraction], which spares a full-resolution pass; the
    # bracket is the same for every slice with the same mask and rescale (kept).
    if padding.low == padding.high:
        physical = resize(stored, out)
        if s != 1.0:
            physical *= np.float32(s)
        physical += workspace.pad_offset(s, b, padding.low)
        return physical, fraction, s * least_stored + b
    np.copyto(real, stored)
    np.copyto(real, 0, where=mask)  # a range of padding values (rare): a masked copy
    physical = resize(real, out)
    physical *= np.float32(s)
    if b:
        term = scratch("pad_term", out.shape, np.float32)
        np.subtract(np.float32(1.0), fraction, out=term)
        term *= np.float32(b)
        physical += term
    return physical, fraction, s * least_stored + b


def read_frames(path: str, workspace: "Workspace", what: str = "file",
                check_layout: bool = False) -> list[Frame]:
    """All frames of one DICOM file, rescaled to physical values and resized in-plane
    into slots of ``workspace``. ``check_layout``: also run :func:`check_row_layout` on
    its (middle) frame."""
    try:
        mode = os.stat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a FIFO would block the open
            raise SeriesError("unreadable", f"{what}: not a regular file")  # forever
        # (a folder in a file's place fails the open below: an OSError, tried again later)
        ds = pydicom.dcmread(path)
    except SeriesError:
        raise
    except OSError as err:  # the file, not its content: gone, unmounted, an I/O error
        raise SeriesError("unreadable", f"{what}: cannot be read: {type(err).__name__}: "
                                        f"{err.strerror or 'I/O error'}", transient=True) from None
    except Exception as err:
        raise SeriesError("decode_failed", f"{what}: unreadable: {type(err).__name__}: {err}") from None
    if not any(dicom_values.has(ds, k) for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise SeriesError("decode_failed", f"{what}: no pixel data")
    rows, cols = _count(ds, "Rows", what), _count(ds, "Columns", what)
    n_frames = int(dicom_values.number(ds, "NumberOfFrames") or 1)
    padding = Padding.from_dataset(ds)
    per_frame = (dicom_values.value(ds, "PerFrameFunctionalGroupsSequence")
                 if dicom_values.has(ds, "PerFrameFunctionalGroupsSequence") else None)
    if per_frame is not None:  # enhanced multi-frame: geometry and rescale per frame
        shared = _first_item(ds, "SharedFunctionalGroupsSequence")
        if len(per_frame) != n_frames:
            raise SeriesError("inconsistent_geometry",
                              f"{what}: {len(per_frame)} frame groups for {n_frames} frames")
        pixels = _decode(ds, what, workspace.scratch).reshape(n_frames, rows, cols)
        if check_layout:
            check_row_layout(pixels[n_frames // 2], what)
        frames = []
        for k, group in enumerate(per_frame):
            position = _group_value(group, shared, "PlanePositionSequence", "ImagePositionPatient")
            orientation = _group_value(group, shared, "PlaneOrientationSequence",
                                       "ImageOrientationPatient")
            if position is None or orientation is None:
                raise SeriesError("inconsistent_geometry", f"{what}: frame {k + 1} has no plane position/orientation")
            slope = _group_value(group, shared, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = _group_value(group, shared, "PixelValueTransformationSequence", "RescaleIntercept")
            check_rescale(slope, intercept, f"{what} frame {k + 1}")
            physical, fraction, least = _physical(pixels[k], workspace, slope, intercept, padding)
            frames.append(Frame(_floats(position, 3, "ImagePositionPatient"),
                                _floats(orientation, 6, "ImageOrientationPatient"), rows, cols,
                                physical, fraction, least))
        return frames
    if n_frames != 1:
        raise SeriesError("inconsistent_geometry",
                          f"{what}: {n_frames} frames without per-frame positions")
    position = dicom_values.value(ds, "ImagePositionPatient")
    orientation = dicom_values.value(ds, "ImageOrientationPatient")
    if position is None or orientation is None:
        raise SeriesError("inconsistent_geometry", f"{what}: no ImagePositionPatient/ImageOrientationPatient")
    position = _floats(position, 3, "ImagePositionPatient")
    orientation = _floats(orientation, 6, "ImageOrientationPatient")
    slope, intercept = dicom_values.value(ds, "RescaleSlope"), dicom_values.value(ds, "RescaleIntercept")
    lut_ds = ds if dicom_values.has(ds, "ModalityLUTSequence") else None
    if lut_ds is None:
        check_rescale(slope, intercept, what)
    pixels = _decode(ds, what, workspace.scratch)
    if check_layout:
        check_row_layout(pixels, what)
    physical, fraction, least = _physical(pixels, workspace, slope, intercept, padding,
                                          lut_ds=lut_ds)
    return [Frame(position, orientation, rows, cols, physical, fraction, least)]


def _count(ds, keyword: str, what: str) -> int:
    """A required positive integer attribute (Rows, Columns)."""
    value = dicom_values.number(ds, keyword)
    if value is None or value < 1 or value != int(value):
        raise SeriesError("decode_failed", f"{what}: {keyword} missing or invalid")
    return int(value)


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
    term = None
    for f in frames:
        if f.pad_fraction is not None:  # shared between frames: read only
            if term is None:
                term = np.empty_like(f.pixels)
            np.multiply(f.pad_fraction, fill, out=term)
            f.pixels += term
            f.pad_fraction = None


# ----------------------------------------------------------------------------- series


def order_frames(frames: list[Frame], max_orientation_deg: float = geometry.ORIENTATION_GROUP_DEG
                 ) -> tuple[list[Frame], np.ndarray]:
    """Frames sorted ascending along the slice normal, and their positions along it (mm)."""
    first = frames[0]
    for f in frames[1:]:
        if (f.rows, f.columns) != (first.rows, first.columns):
            raise SeriesError("inconsistent_geometry",
                              f"image sizes differ: {first.rows}x{first.columns} and {f.rows}x{f.columns}")
    # Row and column cosines of each frame within the angle of the first's.
    if len(geometry.orientation_groups(frames, lambda f: f.orientation, max_orientation_deg)) > 1:
        raise SeriesError("inconsistent_geometry", "slice orientations differ within the series "
                          f"(by more than {max_orientation_deg}°)")
    try:
        positions = np.asarray(geometry.positions_along_normal(
            [f.position for f in frames], first.orientation), np.float64)
    except ValueError as err:
        raise SeriesError("inconsistent_geometry", "degenerate ImageOrientationPatient "
                          f"{[float(v) for v in first.orientation]}: {err}") from None
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
    if len(geometry.orientation_groups(frames, lambda f: f.orientation, max_deg)) == 1:
        return frames
    kept = [f for f in frames if geometry.same_orientation(f.orientation, orientation, max_deg)]
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
                 orientation: Sequence[float] | None = None,
                 workspace: Workspace | None = None) -> BuiltVolume:
    """DICOM files of one series (any order) → :class:`BuiltVolume`.

    ``names`` label the files in error messages (default: "file k"); never pass paths
    that could carry patient names into outputs. ``orientation``: the series' six
    cosines from the index, which pick the series' frames out of a multi-frame file
    holding several stacks. ``workspace``: buffers kept between the series one worker
    builds (see :class:`Workspace`); the returned volume never shares memory with it.
    Raises :class:`SeriesError`.
    """
    num_slices, out_rows, out_cols = options.volume_shape
    if workspace is None or not workspace.fits(options):
        workspace = Workspace(options)
    workspace.start_series()
    frames: list[Frame] = []
    paths = list(paths)
    if not paths:
        raise SeriesError("decode_failed", "the series has no files")
    middle = len(paths) // 2   # one frame per series is enough to see a swapped layout
    for k, path in enumerate(paths):
        what = names[k] if names is not None else f"file {k + 1} of {len(paths)}"
        frames.extend(frames_of_series(read_frames(path, workspace, what, k == middle),
                                       orientation,
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
    effective = rules.effective_spacing_mm(spacing, n, num_slices)
    info.update(slice_spacing_mm=spacing, effective_spacing_mm=effective)
    if rules.spacing_too_large(effective, options.max_effective_spacing_mm):
        raise SeriesError("spacing_too_large",
                          f"effective slice spacing {effective:.2f} mm > "
                          f"{options.max_effective_spacing_mm} mm", info)
    slices = [f.pixels for f in frames]  # n × float32 [out_rows, out_cols]
    del frames
    # Nothing to learn from one grey level (all padding, or a flat phantom): excluded rather
    # than stored as zeros.
    lowest = min(float(p.min()) for p in slices)
    highest = max(float(p.max()) for p in slices)
    if not highest > lowest:
        raise SeriesError("constant_volume", f"every voxel is {lowest:g} after rescale and "
                          "padding removal", info)
    if padded:
        volume = np.zeros((num_slices, out_rows, out_cols), np.uint8)
        before = (num_slices - n) // 2
        stack = workspace.volume(n)
        for k, pixels in enumerate(slices):
            stack[k] = pixels
        volume[before:before + n] = to_uint8(stack, options, in_place=True)
    else:
        resampled = resample_slices(slices, positions, num_slices, out=workspace.volume(num_slices))
        volume = to_uint8(resampled, options, in_place=True)
    return BuiltVolume(volume=volume, n_slices=n, rows=rows, columns=columns,
                       slice_spacing_mm=spacing, effective_spacing_mm=effective, padded=padded)
