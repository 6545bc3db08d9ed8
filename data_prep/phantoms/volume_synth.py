"""Small synthetic DICOM series with known physical values, for tests and benchmarks.

The phantom archive (data_prep.phantoms) is the end-to-end ground truth; this module
writes single series with exactly the traps the volume builder must handle (random file
names, InstanceNumber against position, per-slice or per-frame rescale, any plane,
classic or enhanced multi-frame), so the builder's rules are tested on their own.
No PHI: every identifier is generated.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def body_hu(points_mm: np.ndarray) -> np.ndarray:
    """A smooth torso-like CT field (HU) at world points [..., 3] (patient x, y, z in mm).

    Air outside an elliptic cylinder of soft tissue, a bright 'spine', a dark 'lung'
    and an organ whose intensity changes along z, so every axis carries structure.
    """
    x, y, z = points_mm[..., 0], points_mm[..., 1], points_mm[..., 2]
    hu = np.full(x.shape, -1000.0)
    body = (x / 160.0) ** 2 + (y / 110.0) ** 2 < 1.0
    hu[body] = 40.0
    lung = ((x - 60) / 45.0) ** 2 + ((y + 10) / 55.0) ** 2 + ((z - 40) / 90.0) ** 2 < 1.0
    hu[lung] = -800.0
    organ = ((x + 55) / 50.0) ** 2 + ((y + 5) / 45.0) ** 2 < 1.0
    hu[organ] = 60.0 + 0.8 * z[organ]
    spine = (x / 18.0) ** 2 + ((y - 75) / 18.0) ** 2 < 1.0
    hu[spine] = 700.0 + 100.0 * np.sin(z[spine] / 15.0)
    return hu


def sample_grid(n_slices: int, rows: int, cols: int, origin_mm: Sequence[float],
                orientation: Sequence[float], pixel_spacing_mm: Sequence[float],
                slice_spacing_mm: float) -> np.ndarray:
    """World coordinates [n, rows, cols, 3] of the voxel centres of a series.

    Slice k lies at origin + k · slice_spacing · n with n = row cosines × column cosines,
    so index 0 of the result is the slice lowest along the normal.
    """
    o = np.asarray(orientation, np.float64)
    r_cos, c_cos = o[:3], o[3:]
    normal = np.cross(r_cos, c_cos)
    # DICOM: PixelSpacing = (row spacing, column spacing); moving along a row (column
    # index j) steps by the column spacing along the row cosines.
    dr, dc = pixel_spacing_mm
    k = np.arange(n_slices)[:, None, None, None]
    i = np.arange(rows)[None, :, None, None]
    j = np.arange(cols)[None, None, :, None]
    return (np.asarray(origin_mm, np.float64) + k * slice_spacing_mm * normal
            + i * dr * c_cos + j * dc * r_cos)


def _base(modality: str, sop_class: str, rows: int, cols: int, study_uid: str,
          series_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientID = "SYNTH"
    ds.SeriesDescription = "synthetic"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    return ds


def _stored(values: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    stored = np.rint((values - intercept) / slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError("values do not fit int16 with this slope/intercept")
    return stored.astype("<i2")


def write_series(out_dir: str, values: np.ndarray, origin_mm: Sequence[float],
                 orientation: Sequence[float], pixel_spacing_mm: Sequence[float],
                 slice_spacing_mm: float, *, modality: str = "CT",
                 slopes: Sequence[float] | None = None, intercepts: Sequence[float] | None = None,
                 instance_order: str = "reversed", enhanced: bool = False,
                 padding: int | None = None, padding_limit: int | None = None,
                 pad_mask: np.ndarray | None = None, pad_stored=None,
                 rng: np.random.Generator | None = None) -> list[str]:
    """Writes ``values`` [n, rows, cols] (physical, slice 0 lowest along the normal).

    ``instance_order``: InstanceNumber ``reversed`` (against position), ``ascending`` or
    ``random``. File names are random hex. Per-slice ``slopes``/``intercepts`` (per frame
    when ``enhanced``). ``padding``/``padding_limit``: PixelPaddingValue and
    PixelPaddingRangeLimit written into every file; where ``pad_mask`` [n, rows, cols]
    is true the stored value is ``pad_stored`` (an int or an int array [n, rows, cols];
    default: ``padding``) instead of ``values`` — the padded pixels. Returns the written paths in random order.
    """
    rng = rng or np.random.default_rng(0)
    n, rows, cols = values.shape
    slopes = list(slopes) if slopes is not None else [1.0] * n
    intercepts = list(intercepts) if intercepts is not None else [-1024.0] * n
    o = np.asarray(orientation, np.float64)
    normal = np.cross(o[:3], o[3:])
    positions = [np.asarray(origin_mm, np.float64) + k * slice_spacing_mm * normal for k in range(n)]
    if instance_order == "reversed":
        instance = [n - k for k in range(n)]
    elif instance_order == "ascending":
        instance = [k + 1 for k in range(n)]
    elif instance_order == "random":
        instance = list(rng.permutation(n) + 1)
    else:
        raise ValueError(f"unknown instance_order {instance_order!r}")
    os.makedirs(out_dir, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []

    def _name() -> str:
        return os.path.join(out_dir, rng.bytes(8).hex())

    def _frame(k: int) -> np.ndarray:
        stored = _stored(values[k], slopes[k], intercepts[k])
        if pad_mask is not None:
            fill = padding if pad_stored is None else pad_stored
            fill = np.broadcast_to(np.asarray(fill), values.shape)[k]
            stored[pad_mask[k]] = fill[pad_mask[k]]
        return stored

    def _padding_attributes(ds: Dataset) -> None:
        if padding is not None:
            ds.PixelPaddingValue = int(padding)
        if padding_limit is not None:
            ds.PixelPaddingRangeLimit = int(padding_limit)

    if enhanced:
        sop = ENHANCED_CT_IMAGE if modality == "CT" else "1.2.840.10008.5.1.4.1.1.4.1"
        ds = _base(modality, sop, rows, cols, study_uid, series_uid)
        order = rng.permutation(n)  # frames stored in no geometric order
        ds.NumberOfFrames = n
        _padding_attributes(ds)
        shared = Dataset()
        plane = Dataset()
        plane.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        shared.PlaneOrientationSequence = DicomSequence([plane])
        measures = Dataset()
        measures.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing_mm]
        measures.SliceThickness = f"{slice_spacing_mm:.6f}"
        shared.PixelMeasuresSequence = DicomSequence([measures])
        ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
        groups, frames = [], []
        for k in order:
            group = Dataset()
            pos = Dataset()
            pos.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
            group.PlanePositionSequence = DicomSequence([pos])
            transform = Dataset()
            transform.RescaleSlope = f"{slopes[k]:g}"
            transform.RescaleIntercept = f"{intercepts[k]:g}"
            group.PixelValueTransformationSequence = DicomSequence([transform])
            content = Dataset()
            content.InStackPositionNumber = int(instance[k])
            group.FrameContentSequence = DicomSequence([content])
            groups.append(group)
            frames.append(_frame(k))
        ds.PerFrameFunctionalGroupsSequence = DicomSequence(groups)
        ds.PixelData = np.stack(frames).tobytes()
        path = _name()
        ds.save_as(path, enforce_file_format=True)
        return [path]

    for k in rng.permutation(n):
        ds = _base(modality, CT_IMAGE if modality == "CT" else MR_IMAGE, rows, cols,
                   study_uid, series_uid)
        ds.InstanceNumber = int(instance[k])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing_mm]
        ds.SliceThickness = f"{slice_spacing_mm:.6f}"
        ds.RescaleSlope = f"{slopes[k]:g}"
        ds.RescaleIntercept = f"{intercepts[k]:g}"
        _padding_attributes(ds)
        ds.PixelData = _frame(k).tobytes()
        path = _name()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_two_stack_file(folder: str, size: int = 16, seed: int = 2) -> tuple[str, np.ndarray]:
    """One enhanced file holding a 9-slice axial and a 7-slice coronal stack, as a
    multi-stack MR object does: (its path, the coronal stack's true values)."""
    rng = np.random.default_rng(seed)
    axial, _ = write_body_series(os.path.join(folder, "a"), 9, size, size, orientation=AXIAL,
                                 enhanced=True, rng=rng)
    coronal, truth = write_body_series(os.path.join(folder, "c"), 7, size, size, enhanced=True,
                                       orientation=CORONAL, rng=rng)
    return merge_enhanced(axial + coronal, os.path.join(folder, "both")), truth


def merge_enhanced(paths: Sequence[str], out_path: str) -> str:
    """Several enhanced multi-frame files (same size) → one file holding all their stacks.

    The orientation moves from the shared to the per-frame functional groups (stacks
    differ in it), as in a multi-stack enhanced MR or CT object.
    """
    import copy

    parts = [pydicom.dcmread(p) for p in paths]
    merged = parts[0]
    groups, pixels = [], b""
    for ds in parts:
        shared = ds.SharedFunctionalGroupsSequence[0]
        orientation = shared.get("PlaneOrientationSequence")
        for group in ds.PerFrameFunctionalGroupsSequence:
            if orientation is not None:
                group.PlaneOrientationSequence = copy.deepcopy(orientation)
            groups.append(group)
        pixels += ds.PixelData
    if "PlaneOrientationSequence" in merged.SharedFunctionalGroupsSequence[0]:
        del merged.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
    merged.PerFrameFunctionalGroupsSequence = DicomSequence(groups)
    merged.NumberOfFrames = len(groups)
    merged.PixelData = pixels
    merged.save_as(out_path, enforce_file_format=True)
    return out_path


def write_body_series(out_dir: str, n_slices: int, rows: int, cols: int, *,
                      orientation: Sequence[float] = AXIAL, slice_spacing_mm: float = 5.0,
                      noise_hu: float = 0.0, rng: np.random.Generator | None = None,
                      **kwargs) -> tuple[list[str], np.ndarray]:
    """A series through :func:`body_hu` centred on the body; returns (paths, truth).

    ``truth`` [n, rows, cols] float64 is what the files encode up to the stored integer
    rounding, slices ascending along the normal.
    """
    rng = rng or np.random.default_rng(0)
    fov_mm = 360.0
    pixel_spacing = (fov_mm / rows, fov_mm / cols)
    o = np.asarray(orientation, np.float64)
    normal = np.cross(o[:3], o[3:])
    # Centre the grid on the world origin: step back half the field along both in-plane
    # axes and half the stack along the normal.
    origin = (-(rows - 1) / 2 * pixel_spacing[0] * o[3:] - (cols - 1) / 2 * pixel_spacing[1] * o[:3]
              - (n_slices - 1) / 2 * slice_spacing_mm * normal)
    grid = sample_grid(n_slices, rows, cols, origin, orientation, pixel_spacing, slice_spacing_mm)
    truth = body_hu(grid)
    if noise_hu:
        truth = truth + rng.normal(0.0, noise_hu, truth.shape)
    paths = write_series(out_dir, truth, origin, orientation, pixel_spacing, slice_spacing_mm,
                         rng=rng, **kwargs)
    return paths, truth


def write_index(index_dir: str, dicom_root: str, series: Sequence[dict],
                extra_files: Sequence[tuple[str, str]] = ()) -> None:
    """A minimal index in the format of docs/interfaces.md, for builder tests.

    ``series``: dicts with ``series_key``, ``paths`` (absolute, under dicom_root) and any
    series.csv columns (status defaults to included, split to train). ``extra_files``:
    (absolute path, reason) of excluded files without a series.
    """
    from data_prep.index.outputs import FILES_COLUMNS, SERIES_COLUMNS, write_csv

    os.makedirs(index_dir, exist_ok=True)
    file_rows, series_rows = [], []
    for s in series:
        status = s.get("status", "included")
        for p in s["paths"]:
            rel = os.path.relpath(p, dicom_root).replace(os.sep, "/")
            file_rows.append({"path": rel, "series_key": s["series_key"], "status": status,
                              "reason": "" if status == "included" else s.get("reasons", "")})
        row = {c: "" for c in SERIES_COLUMNS}
        row.update({"status": "included", "split": "train", "n_files": len(s["paths"]),
                    "sequence": "CT", "view": "axial", "contrast": "no_contrast"})
        row.update({k: v for k, v in s.items() if k in SERIES_COLUMNS})
        series_rows.append(row)
    for p, reason in extra_files:
        file_rows.append({"path": os.path.relpath(p, dicom_root).replace(os.sep, "/"),
                          "series_key": "", "status": "excluded", "reason": reason})
    write_csv(os.path.join(index_dir, "files.csv"), FILES_COLUMNS,
               sorted(file_rows, key=lambda r: r["path"]))
    write_csv(os.path.join(index_dir, "series.csv"), SERIES_COLUMNS,
               sorted(series_rows, key=lambda r: r["series_key"]))


def reference_uint8(truth: np.ndarray, shape) -> np.ndarray:
    """The paper's preprocessing of a true volume [n, r, c] → int64 ``shape``, written
    independently of radnet.preprocess (scipy's half-pixel linear resize, numpy min-max):
    the expected output of the volume builder in the tests."""
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


def fill_padded(truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pixel padding as the standard means it, independently of radnet.preprocess: padded
    pixels (``mask``) get the least real value."""
    filled = truth.astype(np.float64).copy()
    filled[mask] = filled[~mask].min()
    return filled
