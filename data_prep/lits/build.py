"""LiTS (Liver Tumor Segmentation challenge) → radnet liver dataset: the batch tool.

    python -m data_prep.lits --lits_dir=DIR --out=DATASET [--in_plane=192] [--workers=N]

Finds every ``volume-<k>.nii[.gz]`` / ``segmentation-<k>.nii[.gz]`` pair under
``lits_dir`` (any depth: the challenge ships two "Training Batch" folders), prepares
each case with the library (``radnet.data.lits.prepare_case``: orientation, 5 mm
slices, in-plane resize, uint8, liver mask), writes it, and splits the usable cases
70/15/15 (the paper's 92/19/20 of 131 cases), shuffled with a seed. The dataset layout
and its reader are in ``radnet/data/lits.py``.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import math
import multiprocessing
import os
import re
from typing import Any, Sequence

import numpy as np
import tensorstore as ts
from absl import logging
from tqdm import tqdm

from radnet.data import lits, schema
from radnet.labels import SPLITS

_FILE_RE = re.compile(r"^(volume|segmentation)-(\d+)\.nii(\.gz)?$")


def write_group(dataset: str, attributes: dict) -> None:
    """The dataset's zarr group (``attributes``: what radnet.data.lits.read_attributes
    reads) and its image/ and mask/ subgroups."""
    kv = ts.KvStore.open(schema.kvstore_spec(dataset.rstrip("/") + "/")).result()
    kv.write("zarr.json", json.dumps({"zarr_format": 3, "node_type": "group",
                                      "attributes": attributes}, indent=1).encode()).result()
    for kind in ("image", "mask"):
        kv.write(f"{kind}/zarr.json", json.dumps(
            {"zarr_format": 3, "node_type": "group", "attributes": {}}).encode()).result()


def write_case(dataset: str, case_id: str, case: lits.PreparedCase) -> None:
    """One prepared case → its image and mask arrays (replacing any earlier ones)."""
    for kind, arr in (("image", case.image), ("mask", case.mask)):
        store = ts.open(lits.array_spec(dataset, kind, case_id, arr.shape),
                        create=True, delete_existing=True).result()
        store.write(arr).result()


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
        return case_id, lits.prepare_case(vol, seg, in_plane, spacing), None
    except lits.CaseError as e:
        return case_id, None, (e.reason, e.detail)
    except MemoryError:
        return case_id, None, ("out_of_memory", "case too large for this worker")


def build(lits_dir: str, out: str, in_plane: int = 192, slice_spacing_mm: float = 5.0,
          seed: int = 0, split_fractions=(0.7, 0.15, 0.15), workers: int = 1,
          progress: bool = True) -> list[dict[str, Any]]:
    """Builds the dataset; returns the manifest rows (also written to manifest.csv)."""
    if not os.path.isdir(lits_dir):
        raise FileNotFoundError(f"--lits_dir {lits_dir} is not a directory")
    found, stray = find_cases(lits_dir)
    os.makedirs(out, exist_ok=True)
    write_group(out, {"kind": "lits", "in_plane": in_plane,
                      "slice_spacing_mm": slice_spacing_mm, "orientation": lits.ORIENTATION,
                      "chunk_slices": lits.CHUNK_SLICES, "liver_labels": list(lits.LIVER_LABELS),
                      "intensity": "uint8 min-max per volume"})
    rows: dict[str, dict[str, Any]] = {}
    jobs = []
    for k in sorted(found):
        case_id = case_id_of(k)
        entry = found[k]
        row = {c: "" for c in lits.MANIFEST_COLUMNS}
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
        row = {c: "" for c in lits.MANIFEST_COLUMNS}
        row.update(s, status="excluded")
        manifest.append(row)
    with open(os.path.join(out, "manifest.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=lits.MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(manifest)
    counts = {s: sum(1 for r in manifest if r["split"] == s) for s in SPLITS}
    logging.info("LiTS dataset %s: %d included (%s), %d excluded rows", out, len(included),
                 counts, len(manifest) - len(included))
    return manifest
