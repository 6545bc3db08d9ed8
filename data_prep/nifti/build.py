"""NIfTI segmentation cases (MSD, nnU-Net v2 raw, LiTS) → radnet segmentation dataset.

    python -m data_prep.nifti --dataset_dir=DIR --out=DATASET [--fold_foreground=liver]
        [--in_plane=192] [--slice_spacing_mm=5] [--layout=auto|msd|nnunet|lits]

Finds the cases of DIR in its layout (data_prep/nifti/layouts.py), prepares each with the
library (``radnet.data.nifti.prepare_case``: orientation, slices at ``slice_spacing_mm``
with the image linear and the labels nearest, in-plane resize, uint8, class map, the
class map on its source grid too), writes it, and splits the usable cases 70/15/15,
shuffled with a seed. The class vocabulary (names by index) is stored in the group's
attributes; ``--fold_foreground=NAME`` makes every non-zero label one class NAME (the
paper's liver = liver ∪ tumour).

Nothing half-written: the dataset is built in a sibling folder ``.<name>.partial`` and
moved to ``--out`` only when complete; a folder of an unknown layout, a dataset.json with
several channels or too few usable cases leave nothing behind.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import math
import multiprocessing
import os
import shutil
from typing import Any, Sequence

import numpy as np
import tensorstore as ts
from absl import logging
from tqdm import tqdm

from data_prep.nifti import layouts
from radnet.data import nifti, schema
from radnet.labels import SPLITS


def write_group(dataset: str, attributes: dict,
                subgroups: Sequence[str] = ("image", "mask", "native")) -> None:
    """The dataset's zarr group (``attributes``: what radnet.data.nifti.read_attributes
    reads) and its empty subgroups (image/, mask/ and native/ for a segmentation dataset)."""
    kv = ts.KvStore.open(schema.kvstore_spec(dataset.rstrip("/") + "/")).result()
    kv.write("zarr.json", json.dumps({"zarr_format": 3, "node_type": "group",
                                      "attributes": attributes}, indent=1).encode()).result()
    for kind in subgroups:
        kv.write(f"{kind}/zarr.json", json.dumps(
            {"zarr_format": 3, "node_type": "group", "attributes": {}}).encode()).result()


def write_case(dataset: str, case_id: str, case: nifti.PreparedCase) -> None:
    """One prepared case → its arrays (replacing any earlier ones)."""
    arrays = [("image", case.image), ("mask", case.mask)]
    if case.native is not None:
        arrays.append(("native", case.native))
    for kind, arr in arrays:
        store = ts.open(nifti.array_spec(dataset, kind, case_id, arr.shape),
                        create=True, delete_existing=True).result()
        store.write(arr).result()


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


def class_vocabulary(label_names: dict[int, str], fold_foreground: str = ""
                     ) -> tuple[list[str], dict[int, int]]:
    """(class names by index, source value → class index). Classes follow the sorted
    source values (0 = background first); ``fold_foreground`` merges every non-zero value
    into one class of that name."""
    if fold_foreground:
        return ([label_names.get(0, "background"), fold_foreground],
                {v: (0 if v == 0 else 1) for v in label_names})
    values = sorted(label_names)
    return [label_names[v] for v in values], {v: i for i, v in enumerate(values)}


def _prepare_worker(args):
    case_id, image, label, in_plane, spacing, label_map = args
    try:
        return case_id, nifti.prepare_case(image, label, in_plane, spacing, label_map,
                                           keep_native=True), None
    except nifti.CaseError as e:
        return case_id, None, (e.reason, e.detail)
    except MemoryError:
        return case_id, None, ("out_of_memory", "case too large for this worker")


def _partial_dir(out: str) -> str:
    head, name = os.path.split(os.path.abspath(out.rstrip("/")))
    return os.path.join(head, f".{name}.partial")


def _check_out(out: str) -> None:
    """``--out`` may be new, empty, or an earlier radnet segmentation dataset (replaced)."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise FileExistsError(f"--out {out} exists and is not a folder; choose another path")
    if os.listdir(out) and not os.path.isfile(os.path.join(out, "manifest.csv")):
        raise FileExistsError(f"--out {out} is a non-empty folder that is not a radnet "
                              "segmentation dataset; choose a new or empty folder")


def build(dataset_dir: str, out: str, in_plane: int = 192, slice_spacing_mm: float = 5.0,
          seed: int = 0, split_fractions=(0.7, 0.15, 0.15), workers: int = 1,
          progress: bool = True, layout: str = "auto", fold_foreground: str = ""
          ) -> list[dict[str, Any]]:
    """Builds the dataset; returns the manifest rows (also written to manifest.csv).

    Raises FileNotFoundError / layouts.LayoutError / FileExistsError / ValueError (too
    few usable cases) for the user to fix; in every case ``out`` is left as it was.
    """
    found = layouts.detect(dataset_dir, layout)          # before anything is written
    _check_out(out)
    names, label_map = class_vocabulary(found.label_names, fold_foreground)
    partial = _partial_dir(out)
    shutil.rmtree(partial, ignore_errors=True)           # a killed earlier build
    os.makedirs(partial)
    try:
        manifest = _build_into(found, dataset_dir, partial, in_plane, slice_spacing_mm, seed,
                               split_fractions, workers, progress, names, label_map)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(partial, out)
    return manifest


def _build_into(found: layouts.Found, dataset_dir: str, out: str, in_plane: int,
                slice_spacing_mm: float, seed: int, split_fractions, workers: int,
                progress: bool, names: list[str], label_map: dict[int, int]) -> list[dict]:
    write_group(out, {
        "kind": "segmentation", "layout": found.layout, "channel": found.channel,
        "labels": names, "num_classes": len(names),
        "source_labels": {str(v): found.label_names[v] for v in found.label_names},
        "label_map": {str(v): c for v, c in label_map.items()},
        "in_plane": in_plane, "slice_spacing_mm": slice_spacing_mm,
        "orientation": nifti.ORIENTATION, "chunk_slices": nifti.CHUNK_SLICES,
        "intensity": "uint8 min-max per volume", "native": True})
    rows: dict[str, dict[str, Any]] = {}
    jobs = []
    for case in found.cases:
        row = {c: "" for c in nifti.MANIFEST_COLUMNS}
        row.update(case_id=case.case_id, volume_file=case.image, segmentation_file=case.label)
        rows[case.case_id] = row
        if not case.image or not case.label:
            row.update(status="excluded", reason="missing_volume" if not case.image
                       else "missing_segmentation")
            continue
        jobs.append((case.case_id, os.path.join(dataset_dir, case.image),
                     os.path.join(dataset_dir, case.label), in_plane, slice_spacing_mm,
                     label_map))

    def handle(result):
        case_id, prepared, error = result
        row = rows[case_id]
        if error is not None:
            row.update(status="excluded", reason=error[0])
            logging.warning("%s excluded: %s: %s", case_id, *error)
            return
        write_case(out, case_id, prepared)
        row.update(prepared.row, status="included")

    bar = tqdm(total=len(jobs), desc=f"{found.layout} cases", unit="case", disable=not progress)
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
    if len(included) < 3:
        reasons = sorted({r["reason"] for r in rows.values() if r["status"] == "excluded"})
        raise ValueError(f"{dataset_dir}: {len(included)} usable case(s) of {len(rows)} "
                         f"({found.layout} layout); train/val/test need at least 3"
                         + (f"; excluded for: {', '.join(reasons)}" if reasons else ""))
    for cid, split in assign_splits(included, split_fractions, seed).items():
        rows[cid]["split"] = split
    manifest = list(rows.values())
    for s in found.stray:
        row = {c: "" for c in nifti.MANIFEST_COLUMNS}
        row.update(s, status="excluded")
        manifest.append(row)
    with open(os.path.join(out, "manifest.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=nifti.MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(manifest)
    counts = {s: sum(1 for r in manifest if r["split"] == s) for s in SPLITS}
    logging.info("%s dataset: %d included (%s), %d excluded rows; classes %s", found.layout,
                 len(included), counts, len(manifest) - len(included), names)
    return manifest
