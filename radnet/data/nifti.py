"""NIfTI segmentation cases: case preparation and the reader of the prepared dataset.

``prepare_case`` turns one image / label-map pair of NIfTI files (a Decathlon
``imagesTr/liver_0.nii.gz`` + ``labelsTr/liver_0.nii.gz``, an nnU-Net v2 raw case
``imagesTr/NAME_0000.nii.gz`` + ``labelsTr/NAME.nii.gz``, or a LiTS
``volume-<k>.nii`` + ``segmentation-<k>.nii``) into the arrays a segmentation task trains
on. The batch tool ``python -m data_prep.nifti`` finds the cases of a folder in any of
these layouts and writes the dataset; a user preprocesses a new volume with the same
function at run time. For each case:

1. **Orientation.** Both files are brought to one convention, the one the pretraining
   volumes use for an axial DICOM series (slices ascending along the normal, then image
   rows, then image columns, radiological display): array axes ``[slice, row, column]``
   run **inferior→superior, anterior→posterior, patient right→patient left**
   (DICOM LPS: +z, +y, +x). The NIfTI affine of the *image* decides the flips and
   transposes (nibabel's ``io_orientation``: the closest axis-aligned orientation); the
   label map is drawn on the same voxel grid, so the same transform is applied to it.
2. **Resampling.** Along the slice axis to ``slice_spacing_mm`` (5 mm, the paper):
   output slice *k* sits at ``k × 5 mm`` from the first input slice; linear for the image,
   nearest for the labels. In plane to ``in_plane × in_plane`` (192, the network's input),
   pixel centres mapped onto pixel centres (``src = (dst + 0.5) × n_in / n_out − 0.5``),
   linear for the image, nearest for the labels. The in-plane spacing after the resize is
   recorded.
3. **Intensity.** As pretraining: min-max per volume to 256 grey levels (uint8).
4. **Labels.** ``label_map`` maps each source label value to a class index (0 = background);
   a value outside it makes the case an error (recorded, the run goes on). LiTS's default
   folds tumour (2) into liver (1), as the paper does.
5. **Native grid.** With ``keep_native``, the label map is also kept on its own voxel grid
   (only reoriented, no resampling) so metrics can be computed where the annotation was
   drawn (radnet.train.segment resamples predictions back onto it).

Layout of DATASET (zarr v3, written with TensorStore)::

    zarr.json          group; attributes: kind "segmentation", labels (class names),
                       num_classes, layout, in_plane, slice_spacing_mm, orientation, chunk
    image/<case_id>/   uint8 [n_slices, in_plane, in_plane]   chunks of 8 slices
    mask/<case_id>/    uint8 [n_slices, in_plane, in_plane]   class index per voxel
    native/<case_id>/  uint8 [source slices, rows, columns]   class index, source grid
    manifest.csv       one row per case and per unmatched file: status, reason, split

Chunks of 8 slices match the proposal's stride, so a 48-slice window reads 6 chunks and
never the whole case. Splits are 70/15/15 (the paper's 92/19/20 of 131 cases) over the
usable cases, shuffled with a seed (``data_prep.nifti``). Datasets written by earlier
versions (``kind`` "lits", no ``native/``, classes background and liver) still read.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from radnet import preprocess
from radnet.data import schema
from radnet.labels import SPLITS

ORIENTATION = "slices inferior->superior, rows anterior->posterior, columns right->left (LPS +z,+y,+x)"
# nibabel axis codes of the intermediate [x, y, z] array before the final transpose.
_TARGET_AXCODES = ("L", "P", "S")
CHUNK_SLICES = 8
# LiTS: 0 background, 1 liver, 2 tumour; the paper segments the liver with its tumours.
LIVER_LABELS = (1, 2)
VALID_LABELS = (0, 1, 2)
LITS_LABEL_MAP = {0: 0, 1: 1, 2: 1}
LITS_CLASS_NAMES = ("background", "liver")
KINDS = ("segmentation", "lits")     # "lits": datasets of earlier versions

MANIFEST_COLUMNS = (
    "case_id", "volume_file", "segmentation_file", "status", "reason", "split",
    "n_slices", "rows", "columns", "slice_spacing_mm", "pixel_spacing_mm",
    "source_shape", "source_spacing_mm", "source_axcodes", "foreground_voxels",
    "class_voxels", "liver_voxels",
)


class CaseError(ValueError):
    """A case that cannot be used; ``reason`` is the short code written to the manifest."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------- geometry

def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Index of the nearest input pixel centre for each output pixel centre."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    return np.clip(np.floor(src + 0.5).astype(np.int64), 0, n_in - 1)


def slice_positions(n_slices: int, spacing_mm: float, target_mm: float) -> np.ndarray:
    """Fractional input slice index of each output slice (the first slices coincide).

    Output slice k lies ``k × target_mm`` from the first input slice; the last one is the
    last that still lies inside the scanned extent.
    """
    if spacing_mm <= 0 or not math.isfinite(spacing_mm):
        raise CaseError("bad_spacing", f"slice spacing {spacing_mm} mm")
    extent_mm = (n_slices - 1) * spacing_mm
    n_out = int(math.floor(extent_mm / target_mm + 1e-6)) + 1
    return np.arange(n_out) * (target_mm / spacing_mm)


def reorient(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Array in voxel order of ``affine`` → ``[slice, row, column]`` view (see ORIENTATION).

    Returns the view (no copy), the spacing in mm of its three axes, and the source's
    axis codes (e.g. ``"RAS"``) for the manifest.
    """
    import nibabel as nib  # noqa: PLC0415  (only the data tool needs it)

    ornt = nib.orientations.io_orientation(affine)
    codes = "".join(nib.orientations.ornt2axcodes(ornt))
    transform = nib.orientations.ornt_transform(
        ornt, nib.orientations.axcodes2ornt(_TARGET_AXCODES))
    lps = nib.orientations.apply_orientation(arr, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, arr.shape)
    spacing_xyz = np.sqrt((new_affine[:3, :3] ** 2).sum(axis=0))
    return lps.transpose(2, 1, 0), spacing_xyz[::-1].astype(np.float64), codes


# ----------------------------------------------------------------------------- one case

@dataclass
class PreparedCase:
    image: np.ndarray            # uint8 [n_slices, in_plane, in_plane]
    mask: np.ndarray             # uint8 [n_slices, in_plane, in_plane], class index
    row: dict[str, Any]          # manifest fields
    native: np.ndarray | None = None   # uint8 [source slices, rows, cols], class index


def _load(path: str):
    import nibabel as nib  # noqa: PLC0415

    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises several types for broken files
        raise CaseError("unreadable", f"{os.path.basename(path)}: {type(e).__name__}: {e}") from None
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4:
        raise CaseError("multi_channel", f"{os.path.basename(path)} has shape "
                        f"{tuple(img.shape)}: {shape[3]} channels; radnet takes one")
    if len(shape) != 3:
        raise CaseError("not_3d", f"{os.path.basename(path)} has shape {tuple(img.shape)}")
    # Unscaled data keeps int16 CT at 2 bytes a voxel; scaling is applied slice by slice.
    if nib.is_proxy(img.dataobj):
        raw = np.asarray(img.dataobj.get_unscaled()).reshape(shape)
        slope = float(img.dataobj.slope)
        inter = float(img.dataobj.inter)
    else:
        raw = np.asarray(img.dataobj).reshape(shape)
        slope, inter = 1.0, 0.0
    if not (math.isfinite(slope) and math.isfinite(inter)) or slope == 0:
        raise CaseError("unreadable", f"{os.path.basename(path)}: scaling {slope}, {inter}")
    return img.affine, raw, slope, inter


class _LabelLookup:
    """Source label values → class indices; values outside the map are collected."""

    def __init__(self, label_map: dict[int, int]):
        self.keys = np.array(sorted(label_map), np.int64)
        self.values = np.array([label_map[k] for k in self.keys], np.uint8)
        self.unexpected: set[int] = set()

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels, np.int64)
        idx = np.clip(np.searchsorted(self.keys, labels), 0, len(self.keys) - 1)
        hit = self.keys[idx] == labels
        if not hit.all():
            self.unexpected.update(np.unique(labels[~hit]).tolist())
        return np.where(hit, self.values[idx], 0).astype(np.uint8)


def prepare_case(volume_path: str, segmentation_path: str, in_plane: int = 192,
                 slice_spacing_mm: float = 5.0, label_map: dict[int, int] | None = None,
                 keep_native: bool = False) -> PreparedCase:
    """Reads, reorients, resamples and normalises one case (module docstring).

    ``label_map``: source label value → class index (default: LiTS, tumour folded into
    liver); ``keep_native``: also return the class map on the source grid.
    """
    lookup = _LabelLookup(LITS_LABEL_MAP if label_map is None else label_map)
    affine, raw_image, slope, inter = _load(volume_path)
    _, raw_mask, mslope, minter = _load(segmentation_path)
    if raw_mask.shape != raw_image.shape:
        raise CaseError("geometry_mismatch",
                        f"volume {raw_image.shape} vs segmentation {raw_mask.shape}")
    image, spacing, codes = reorient(raw_image, affine)
    mask, _, _ = reorient(raw_mask, affine)  # same voxel grid as the volume
    n_src, rows_src, cols_src = image.shape
    if rows_src < 2 or cols_src < 2:
        raise CaseError("not_3d", f"in-plane size {rows_src}x{cols_src}")

    positions = slice_positions(n_src, float(spacing[0]), slice_spacing_mm)
    # The pretraining volumes' own in-plane resize and quantisation (radnet.preprocess),
    # so the liver images are preprocessed exactly like the volumes the encoder learnt on.
    resize = preprocess.PlaneResizer(in_plane, in_plane, antialias=False)
    nn_rows = _nearest_index(rows_src, in_plane)
    nn_cols = _nearest_index(cols_src, in_plane)

    out_image = np.empty((len(positions), in_plane, in_plane), np.float32)
    out_mask = np.empty((len(positions), in_plane, in_plane), np.uint8)

    def source_slice(k: int) -> np.ndarray:
        return np.asarray(image[k], np.float32) * np.float32(slope) + np.float32(inter)

    for k, p in enumerate(positions):
        lo = int(math.floor(p))
        hi = min(lo + 1, n_src - 1)
        w = np.float32(p - lo)
        plane = source_slice(lo) if w == 0 or hi == lo else (
            (1 - w) * source_slice(lo) + w * source_slice(hi))
        resize(plane, out_image[k])
        labels = np.asarray(mask[min(int(math.floor(p + 0.5)), n_src - 1)], np.float64)
        labels = labels * mslope + minter
        out_mask[k] = lookup(np.rint(labels[np.ix_(nn_rows, nn_cols)]))
    native = None
    if keep_native:
        native = np.empty(mask.shape, np.uint8)
        for k in range(n_src):
            native[k] = lookup(np.rint(np.asarray(mask[k], np.float64) * mslope + minter))
    if lookup.unexpected:
        raise CaseError("unexpected_labels",
                        f"the label map holds values {sorted(lookup.unexpected)[:10]}; the "
                        f"dataset's labels are {lookup.keys.tolist()}")
    if not np.isfinite(out_image).all():
        raise CaseError("unreadable", "non-finite voxel values")
    lo_v, hi_v = float(out_image.min()), float(out_image.max())
    if hi_v <= lo_v:
        raise CaseError("constant_image", f"every voxel is {lo_v}")
    image_u8 = preprocess.to_uint8(out_image, preprocess.VolumeOptions(), in_place=True)

    row = {
        "n_slices": len(positions),
        "rows": in_plane,
        "columns": in_plane,
        "slice_spacing_mm": f"{slice_spacing_mm:g}",
        "pixel_spacing_mm": (f"{spacing[1] * rows_src / in_plane:.4f};"
                             f"{spacing[2] * cols_src / in_plane:.4f}"),
        "source_shape": ";".join(str(s) for s in image.shape),
        "source_spacing_mm": ";".join(f"{s:.4f}" for s in spacing),
        "source_axcodes": codes,
        "foreground_voxels": int(np.count_nonzero(out_mask)),
        "class_voxels": ";".join(str(int(c)) for c in np.bincount(
            out_mask.reshape(-1), minlength=int(lookup.values.max()) + 1)),
        "liver_voxels": int(np.count_nonzero(out_mask)),
    }
    return PreparedCase(image_u8, out_mask, row, native)


# ----------------------------------------------------------------------------- dataset I/O

def array_spec(dataset: str, kind: str, case_id: str, shape=None) -> dict:
    """One case's image or mask array: schema's array layout, chunks of CHUNK_SLICES."""
    return schema.slices_array_spec(dataset, f"{kind}/{case_id}", CHUNK_SLICES, shape)


def read_attributes(dataset: str) -> dict:
    return schema.read_attributes_of_kind(dataset, KINDS, "segmentation dataset",
                                          "python -m data_prep.nifti")


def class_names(attrs: dict) -> list[str]:
    """Class names by index (0 = background) of a dataset's attributes."""
    return list(attrs.get("labels") or LITS_CLASS_NAMES)


def has_native(attrs: dict) -> bool:
    return bool(attrs.get("native"))


def read_manifest(dataset: str) -> list[dict[str, str]]:
    """Rows of ``manifest.csv`` (all of them, excluded cases included)."""
    with open(os.path.join(dataset, "manifest.csv"), newline="") as f:
        return list(csv.DictReader(f))


def cases(dataset: str, split: str | None = None) -> list[str]:
    """Case ids of the usable cases (of one split), in manifest order."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
    return [r["case_id"] for r in read_manifest(dataset)
            if r["status"] == "included" and (split is None or r["split"] == split)]


def open_case(dataset: str, case_id: str) -> tuple[ts.TensorStore, ts.TensorStore]:
    """(image, mask) TensorStores of one case, each ``[n_slices, H, W]`` uint8."""
    return (ts.open(array_spec(dataset, "image", case_id), read=True).result(),
            ts.open(array_spec(dataset, "mask", case_id), read=True).result())


def read_native(dataset: str, case_id: str) -> np.ndarray:
    """The class map of one case on its source voxel grid (reoriented): uint8 ``[D, H, W]``."""
    return ts.open(array_spec(dataset, "native", case_id), read=True).result().read().result()


def spacing_of(row: dict[str, str]) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(training-grid spacing, source-grid spacing) in mm of a manifest row, ``(z, y, x)``."""
    py, px = (float(v) for v in row["pixel_spacing_mm"].split(";"))
    source = tuple(float(v) for v in row["source_spacing_mm"].split(";"))
    return (float(row["slice_spacing_mm"]), py, px), source  # type: ignore[return-value]


def read_crop(store: ts.TensorStore, start: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """The box ``[start, start + shape)`` of a ``[D, H, W]`` array, zeros outside it.

    Any start may be negative or run past the end (windows larger than a case are
    centred with blank voxels). Only the chunks the box touches are read.
    """
    out = np.zeros(tuple(shape), np.uint8)
    lo = [max(s, 0) for s in start]
    hi = [min(s + n, dim) for s, n, dim in zip(start, shape, store.shape)]
    if all(h > l for l, h in zip(lo, hi)):
        dst = tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))
        out[dst] = store[tuple(slice(l, h) for l, h in zip(lo, hi))].read().result()
    return out


def read_window(store: ts.TensorStore, start: int, num_slices: int) -> np.ndarray:
    """Slices ``[start, start + num_slices)`` of a case, zeros outside it: ``[D, H, W]``.

    ``start`` may be negative (cases shorter than a window are centred with blank
    slices, as the pretraining volumes are). Only the chunks the window touches are read.
    """
    n = store.shape[0]
    out = np.zeros((num_slices, *store.shape[1:]), np.uint8)
    lo, hi = max(start, 0), min(start + num_slices, n)
    if hi > lo:
        out[lo - start:hi - start] = store[lo:hi].read().result()
    return out
