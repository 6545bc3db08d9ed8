"""LiTS (Liver Tumor Segmentation challenge) → radnet liver dataset.

    python -m data_prep.lits --lits_dir=DIR --out=DATASET [--in_plane=192]

Finds every ``volume-<k>.nii[.gz]`` / ``segmentation-<k>.nii[.gz]`` pair under
``lits_dir`` (any depth: the challenge ships two "Training Batch" folders), and for
each case:

1. **Orientation.** Both files are brought to one convention, the one the pretraining
   volumes use for an axial DICOM series (slices ascending along the normal, then image
   rows, then image columns, radiological display): array axes ``[slice, row, column]``
   run **inferior→superior, anterior→posterior, patient right→patient left**
   (DICOM LPS: +z, +y, +x). The NIfTI affine of the *volume* decides the flips and
   transposes (nibabel's ``io_orientation``: the closest axis-aligned orientation); the
   segmentation is drawn on the same voxel grid, so the same transform is applied to it.
2. **Resampling.** Along the slice axis to ``slice_spacing_mm`` (5 mm, the paper):
   output slice *k* sits at ``k × 5 mm`` from the first input slice; linear for the image,
   nearest for the mask. In plane to ``in_plane × in_plane`` (192, the network's input),
   pixel centres mapped onto pixel centres (``src = (dst + 0.5) × n_in / n_out − 0.5``),
   linear for the image, nearest for the mask. The in-plane spacing after the resize is
   recorded.
3. **Intensity.** As pretraining: min-max per volume to 256 grey levels (uint8).
4. **Mask.** Liver = labels 1 (liver) and 2 (tumour, which lies inside the liver); any
   other label value makes the case an error (recorded, the run goes on).

Layout of DATASET (zarr v3, written with TensorStore)::

    zarr.json          group; attributes: in_plane, slice_spacing_mm, orientation, chunk
    image/<case_id>/   uint8 [n_slices, in_plane, in_plane]   chunks of 8 slices
    mask/<case_id>/    uint8 [n_slices, in_plane, in_plane]   0 background, 1 liver
    manifest.csv       one row per case and per unmatched file: status, reason, split

Chunks of 8 slices match the proposal's stride, so a 48-slice window reads 6 chunks and
never the whole case. Splits are 70/15/15 (the paper's 92/19/20 of 131 cases) over the
usable cases, shuffled with a seed.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import math
import multiprocessing
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from radnet import preprocess
from radnet.data import schema

ORIENTATION = "slices inferior->superior, rows anterior->posterior, columns right->left (LPS +z,+y,+x)"
# nibabel axis codes of the intermediate [x, y, z] array before the final transpose.
_TARGET_AXCODES = ("L", "P", "S")
CHUNK_SLICES = 8
SPLITS = ("train", "val", "test")
LIVER_LABELS = (1, 2)
VALID_LABELS = (0, 1, 2)

MANIFEST_COLUMNS = (
    "case_id", "volume_file", "segmentation_file", "status", "reason", "split",
    "n_slices", "rows", "columns", "slice_spacing_mm", "pixel_spacing_mm",
    "source_shape", "source_spacing_mm", "source_axcodes", "liver_voxels",
)

_FILE_RE = re.compile(r"^(volume|segmentation)-(\d+)\.nii(\.gz)?$")


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
    mask: np.ndarray             # uint8 [n_slices, in_plane, in_plane], 1 = liver
    row: dict[str, Any]          # manifest fields


def _load(path: str):
    import nibabel as nib  # noqa: PLC0415

    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises several types for broken files
        raise CaseError("unreadable", f"{os.path.basename(path)}: {type(e).__name__}: {e}") from None
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
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


def prepare_case(volume_path: str, segmentation_path: str, in_plane: int = 192,
                 slice_spacing_mm: float = 5.0) -> PreparedCase:
    """Reads, reorients, resamples and normalises one case (module docstring)."""
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

    seen_labels: set[int] = set()
    for k, p in enumerate(positions):
        lo = int(math.floor(p))
        hi = min(lo + 1, n_src - 1)
        w = np.float32(p - lo)
        plane = source_slice(lo) if w == 0 or hi == lo else (
            (1 - w) * source_slice(lo) + w * source_slice(hi))
        resize(plane, out_image[k])
        labels = np.asarray(mask[min(int(math.floor(p + 0.5)), n_src - 1)], np.float64)
        labels = labels * mslope + minter
        labels = np.rint(labels[np.ix_(nn_rows, nn_cols)]).astype(np.int64)
        seen_labels.update(np.unique(labels).tolist())
        out_mask[k] = np.isin(labels, LIVER_LABELS)
    unexpected = sorted(seen_labels - set(VALID_LABELS))
    if unexpected:
        raise CaseError("unexpected_labels",
                        f"segmentation holds labels {unexpected}; LiTS uses {list(VALID_LABELS)}")
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
        "liver_voxels": int(out_mask.sum()),
    }
    return PreparedCase(image_u8, out_mask, row)


# ----------------------------------------------------------------------------- dataset I/O

def _array_spec(dataset: str, kind: str, case_id: str, shape=None) -> dict:
    """One case's image or mask array: schema's array layout, chunks of CHUNK_SLICES."""
    name = f"{kind}/{case_id}"
    if shape is None:  # open an existing array
        return {"driver": "zarr3", "kvstore": schema.kvstore_spec(f"{dataset.rstrip('/')}/{name}")}
    return schema.array_spec(dataset, name, shape, "uint8", (CHUNK_SLICES, *shape[1:]),
                              schema.CODECS["zstd"], 0)


def _write_group(dataset: str, attributes: dict) -> None:
    kv = ts.KvStore.open(schema.kvstore_spec(dataset.rstrip("/") + "/")).result()
    kv.write("zarr.json", json.dumps({"zarr_format": 3, "node_type": "group",
                                      "attributes": attributes}, indent=1).encode()).result()
    for kind in ("image", "mask"):
        kv.write(f"{kind}/zarr.json", json.dumps(
            {"zarr_format": 3, "node_type": "group", "attributes": {}}).encode()).result()


def write_case(dataset: str, case_id: str, case: PreparedCase) -> None:
    for kind, arr in (("image", case.image), ("mask", case.mask)):
        store = ts.open(_array_spec(dataset, kind, case_id, arr.shape),
                        create=True, delete_existing=True).result()
        store.write(arr).result()


def read_attributes(dataset: str) -> dict:
    try:
        attrs = schema.read_attributes(dataset)
    except FileNotFoundError:
        raise FileNotFoundError(f"{dataset} is not a LiTS dataset of radnet (no zarr.json)") from None
    if attrs.get("kind") != "lits":
        raise FileNotFoundError(f"{dataset} is not a LiTS dataset of radnet (kind={attrs.get('kind')!r})")
    return attrs


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
    return (ts.open(_array_spec(dataset, "image", case_id), read=True).result(),
            ts.open(_array_spec(dataset, "mask", case_id), read=True).result())


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


# ----------------------------------------------------------------------------- whole run

def find_cases(lits_dir: str) -> tuple[dict[int, dict[str, str]], list[dict[str, str]]]:
    """``{k: {"volume": rel, "segmentation": rel}}`` and rows for files that match nothing."""
    found: dict[int, dict[str, str]] = {}
    stray: list[dict[str, str]] = []
    for root, dirs, files in os.walk(lits_dir):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), lits_dir).replace(os.sep, "/")
            m = _FILE_RE.match(name)
            if not m:
                stray.append({"volume_file": rel, "reason": "unrecognised_file_name"})
                continue
            kind, k = m.group(1), int(m.group(2))
            entry = found.setdefault(k, {})
            if kind in entry:
                stray.append({"volume_file": rel, "reason": "duplicate_case",
                              "case_id": case_id_of(k)})
                continue
            entry[kind] = rel
    return found, stray


def case_id_of(k: int) -> str:
    return f"lits-{k:03d}"


def assign_splits(case_ids: Sequence[str], fractions=(0.7, 0.15, 0.15),
                  seed: int = 0) -> dict[str, str]:
    """Seeded 70/15/15 split: round(70%) train, floor(15%) val, the rest test (≥1 each)."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    ids = sorted(case_ids)
    n = len(ids)
    if n < 3:
        raise ValueError(f"need at least 3 usable cases for train/val/test, got {n}")
    n_val = max(1, int(math.floor(fractions[1] * n)))
    n_test = max(1, n - int(round(fractions[0] * n)) - n_val)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{n} cases leave no training case with fractions {fractions}")
    order = np.random.default_rng(seed).permutation(n)
    out = {}
    for rank, idx in enumerate(order):
        out[ids[idx]] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return out


def _prepare_worker(args):
    case_id, vol, seg, in_plane, spacing = args
    try:
        return case_id, prepare_case(vol, seg, in_plane, spacing), None
    except CaseError as e:
        return case_id, None, (e.reason, e.detail)
    except MemoryError:
        return case_id, None, ("out_of_memory", "case too large for this worker")


def build(lits_dir: str, out: str, in_plane: int = 192, slice_spacing_mm: float = 5.0,
          seed: int = 0, split_fractions=(0.7, 0.15, 0.15), workers: int = 1,
          progress: bool = True) -> list[dict[str, Any]]:
    """Builds the dataset; returns the manifest rows (also written to manifest.csv)."""
    from absl import logging  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    if not os.path.isdir(lits_dir):
        raise FileNotFoundError(f"--lits_dir {lits_dir} is not a directory")
    found, stray = find_cases(lits_dir)
    os.makedirs(out, exist_ok=True)
    _write_group(out, {"kind": "lits", "in_plane": in_plane,
                       "slice_spacing_mm": slice_spacing_mm, "orientation": ORIENTATION,
                       "chunk_slices": CHUNK_SLICES, "liver_labels": list(LIVER_LABELS),
                       "intensity": "uint8 min-max per volume"})
    rows: dict[str, dict[str, Any]] = {}
    jobs = []
    for k in sorted(found):
        case_id = case_id_of(k)
        entry = found[k]
        row = {c: "" for c in MANIFEST_COLUMNS}
        row.update(case_id=case_id, volume_file=entry.get("volume", ""),
                   segmentation_file=entry.get("segmentation", ""))
        rows[case_id] = row
        if "volume" not in entry or "segmentation" not in entry:
            row.update(status="excluded", reason="missing_volume" if "volume" not in entry
                       else "missing_segmentation")
            continue
        jobs.append((case_id, os.path.join(lits_dir, entry["volume"]),
                     os.path.join(lits_dir, entry["segmentation"]), in_plane, slice_spacing_mm))

    def handle(result):
        case_id, prepared, error = result
        row = rows[case_id]
        if error is not None:
            row.update(status="excluded", reason=error[0])
            logging.warning("%s excluded: %s: %s", case_id, *error)
            return
        write_case(out, case_id, prepared)
        row.update(prepared.row, status="included")

    bar = tqdm(total=len(jobs), desc="lits cases", unit="case", disable=not progress)
    if workers <= 1:
        for job in jobs:
            handle(_prepare_worker(job))
            bar.update()
    else:
        # spawn: TensorStore and JAX threads do not survive fork; the parent writes.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for result in pool.map(_prepare_worker, jobs):
                handle(result)
                bar.update()
    bar.close()

    included = [cid for cid, r in rows.items() if r["status"] == "included"]
    for cid, split in assign_splits(included, split_fractions, seed).items():
        rows[cid]["split"] = split
    manifest = list(rows.values())
    for s in stray:
        row = {c: "" for c in MANIFEST_COLUMNS}
        row.update(s, status="excluded")
        manifest.append(row)
    with open(os.path.join(out, "manifest.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(manifest)
    counts = {s: sum(1 for r in manifest if r["split"] == s) for s in SPLITS}
    logging.info("LiTS dataset %s: %d included (%s), %d excluded rows", out, len(included),
                 counts, len(manifest) - len(included))
    return manifest


def main(argv):
    from absl import flags  # noqa: PLC0415

    del argv
    f = flags.FLAGS
    fractions = tuple(float(x) for x in f.split.split(","))
    manifest = build(f.lits_dir, f.out, in_plane=f.in_plane,
                     slice_spacing_mm=f.slice_spacing_mm, seed=f.seed,
                     split_fractions=fractions, workers=f.workers)
    included = sum(r["status"] == "included" for r in manifest)
    print(json.dumps({"dataset": f.out, "included": included,
                      "excluded": len(manifest) - included,
                      **{s: sum(r["split"] == s for r in manifest) for s in SPLITS}}))
    return 0


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("lits_dir", None, "Folder holding volume-<k>.nii[.gz] and "
                        "segmentation-<k>.nii[.gz] (searched recursively).", required=True)
    flags.DEFINE_string("out", None, "Output dataset folder (zarr v3 + manifest.csv).",
                        required=True)
    flags.DEFINE_integer("in_plane", 192, "In-plane size after resampling (pixels).")
    flags.DEFINE_float("slice_spacing_mm", 5.0, "Slice spacing after resampling (mm).")
    flags.DEFINE_integer("seed", 0, "Seed of the train/val/test split.")
    flags.DEFINE_string("split", "0.7,0.15,0.15", "train,val,test fractions.")
    flags.DEFINE_integer("workers", max(1, min(4, (os.cpu_count() or 1) - 1)),
                         "Processes reading and resampling cases.")
    app.run(main)
