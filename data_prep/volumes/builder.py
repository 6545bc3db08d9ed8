"""Orchestration of the volume build: index → tasks → worker pool → dataset.

Crash safety rests on one ordering: a series' *done marker*
``DATASET/_build/done/<index>.json`` (its outcome: status, reason, measured geometry) is
written only after TensorStore reported its volume chunk write complete. A re-run lists
the markers and redoes every series without one, overwriting whatever partial chunk a
killed run may have left. Markers are one small key per series, so they work on every
kvstore (local files, gs://, s3://) and shards never append to a shared file.

Each worker writes its chunks and markers itself, one write in flight: while TensorStore
compresses and writes (and fsyncs) series k on its own threads, the worker already
decodes series k+1; before it starts the next write it waits for series k's chunk, then
writes k's marker. The last write is completed when the worker exits (a finalizer), so
the coordinator reads every marker after the pool has joined. A worker killed with a
write in flight leaves no marker for it: that series is redone.

The label arrays and manifest.csv are written once, by whichever process finds every
marker present ("finalize"): they are a pure function of the index and the markers, so
a repeated or concurrent finalize writes identical bytes, and no two workers ever
read-modify-write a shared label chunk. Until then every label reads as unknown and
every split as -1, so a trainer can never use a half-built dataset by mistake.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import multiprocessing.util
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import tensorstore as ts
from absl import logging

from radnet import preprocess
from radnet import labels
from radnet.data import schema

BUILD_PREFIX = "_build/done/"
MANIFEST_COLUMNS = ("index", "series_key", "patient_key", "split", "sequence", "view", "contrast",
                    "coverage", "n_slices", "rows", "columns", "slice_spacing_mm",
                    "effective_spacing_mm", "status", "reason")


@dataclasses.dataclass(frozen=True)
class Task:
    index: int
    series_key: str
    paths: tuple[str, ...]  # relative to dicom_root, '/'-separated (never logged)
    orientation: tuple[float, ...] | None = None  # the index's 6 cosines, if given


def parse_orientation(text: str | None) -> tuple[float, ...] | None:
    """series.csv ``orientation`` (6 cosines ';'-joined) → floats; None if absent or malformed."""
    try:
        values = tuple(float(v) for v in (text or "").split(";"))
    except ValueError:
        return None
    return values if len(values) == 6 and all(math.isfinite(v) for v in values) else None


def options_from_config(config) -> preprocess.VolumeOptions:
    return preprocess.VolumeOptions(
        volume_shape=tuple(int(s) for s in config.volume_shape),
        min_slices=int(config.min_slices),
        max_effective_spacing_mm=float(config.max_effective_spacing_mm),
        max_spacing_deviation=float(config.max_spacing_deviation),
        max_orientation_deviation_deg=float(config.max_orientation_deviation_deg),
        antialias=bool(config.antialias),
        normalise=str(config.normalise),
        percentiles=tuple(float(p) for p in config.percentiles),
        window_level=float(config.window_level),
        window_width=float(config.window_width))


# ------------------------------------------------------------------------------ index


def load_index(index_dir: str) -> tuple[list[dict], dict[str, list[str]], str]:
    """Included series rows (sorted by series_key), their included files, a fingerprint.

    The fingerprint (SHA-256 of files.csv and series.csv) ties a dataset to the index it
    was built from, so a resume never mixes two indexes.
    """
    digest = hashlib.sha256()
    tables = {}
    for name in ("series.csv", "files.csv"):
        path = os.path.join(index_dir, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: run data_prep.index first")
        with open(path, "rb") as f:
            raw = f.read()
        digest.update(name.encode() + b"\0" + raw)
        tables[name] = list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))
    needed = {"series.csv": ("series_key", "status", "split"),
              "files.csv": ("path", "series_key", "status")}
    for name, columns in needed.items():
        if tables[name]:
            missing = [c for c in columns if c not in tables[name][0]]
            if missing:
                raise ValueError(f"{index_dir}/{name} lacks columns {missing}")
    series = sorted((r for r in tables["series.csv"] if r["status"] == "included"),
                    key=lambda r: r["series_key"])
    keys = {r["series_key"] for r in series}
    files: dict[str, list[str]] = {k: [] for k in keys}
    for r in tables["files.csv"]:
        if r["status"] == "included" and r["series_key"] in keys:
            files[r["series_key"]].append(r["path"])
    return series, files, digest.hexdigest()


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard={text}: need 0 <= i < n")
    return i, n


# ----------------------------------------------------------------------------- worker

_WORKER: dict[str, Any] = {}


def _kvstore(out: str, prefix: str = "", context: ts.Context | None = None) -> ts.KvStore:
    return ts.KvStore.open(schema.kvstore_spec(out.rstrip("/") + "/" + prefix),
                           context=context or ts.Context()).result()


def _context(fsync: bool) -> ts.Context:
    # fsync makes a completed write survive a power loss or OS crash, not just kill -9.
    return ts.Context({"file_io_sync": bool(fsync)})


def _init_worker(out: str, dicom_root: str, options: preprocess.VolumeOptions,
                 fsync: bool = True, finalizer: bool = True) -> None:
    context = _context(fsync)
    _WORKER["volume"] = schema.open_arrays(out, names=("volume",), read_only=False,
                                           context=context)["volume"]
    _WORKER["markers"] = _kvstore(out, BUILD_PREFIX, context)
    _WORKER["dicom_root"] = dicom_root
    _WORKER["options"] = options
    _WORKER["workspace"] = preprocess.Workspace(options)  # buffers kept across series
    _WORKER["pending"] = None  # (chunk write future, outcome) of the series in flight
    if finalizer:
        # A pool worker completes its last write when it exits normally (pool.close()).
        multiprocessing.util.Finalize(None, flush_worker, exitpriority=10)


def flush_worker() -> None:
    """Waits for the write in flight, then writes its done marker (never before)."""
    pending, _WORKER["pending"] = _WORKER.get("pending"), None
    if pending is None:
        return
    chunk, outcome = pending
    if chunk is not None:
        chunk.result()
    _WORKER["markers"].write(_marker_key(outcome["index"]),
                             json.dumps(outcome, sort_keys=True).encode()).result()


def _marker_key(index: int) -> str:
    return f"{index:09d}.json"


def _scrub(message: str, paths: list[str], dicom_root: str) -> str:
    """Error text without file paths (they can carry patient names)."""
    for p in sorted(paths, key=len, reverse=True):
        message = message.replace(p, "<file>")
    return message.replace(dicom_root, "<dicom_root>")


def _bytes(paths: list[str]) -> int:
    """Total size of the files that exist (one stat each; a missing one fails the series later)."""
    total = 0
    for p in paths:
        try:
            total += os.path.getsize(p)
        except OSError:
            pass
    return total


def _work(task: Task) -> dict:
    """Builds one series and starts its chunk write; the marker follows its completion.

    Returns the outcome (for progress and the run summary) while the write may still
    be in flight; durability is recorded by the marker alone.
    """
    options: preprocess.VolumeOptions = _WORKER["options"]
    root = _WORKER["dicom_root"]
    abs_paths = [os.path.join(root, *p.split("/")) for p in task.paths]
    outcome = {"index": task.index, "series_key": task.series_key, "status": "included",
               "reason": "", "message": "", "n_slices": None, "rows": None, "columns": None,
               "slice_spacing_mm": None, "effective_spacing_mm": None,
               "bytes_read": _bytes(abs_paths)}
    built = None
    try:
        if not abs_paths:
            # files.csv lists no file under this key: e.g. a multi-frame file whose
            # frames the index split into several series is listed under one of them.
            raise preprocess.SeriesError("decode_failed", "files.csv lists no included file "
                                          "for this series")
        built = preprocess.build_volume(abs_paths, options, orientation=task.orientation,
                                         workspace=_WORKER["workspace"])
    except preprocess.SeriesError as err:
        outcome.update(status="excluded", reason=err.reason,
                       message=_scrub(err.message, abs_paths, root), **err.info)
    except Exception as err:  # any other failure of one series must not stop the build
        outcome.update(status="excluded", reason="decode_failed",
                       message=_scrub(f"{type(err).__name__}: {err}", abs_paths, root))
    # One write in flight per worker: the previous series' chunk must be complete (and
    # get its marker) before this one's write starts.
    flush_worker()
    chunk = None
    if outcome["status"] == "included":
        chunk = _WORKER["volume"][task.index].write(built.volume)
        outcome.update(n_slices=built.n_slices, rows=built.rows, columns=built.columns,
                       slice_spacing_mm=built.slice_spacing_mm,
                       effective_spacing_mm=built.effective_spacing_mm)
    _WORKER["pending"] = (chunk, outcome)
    return outcome


# ------------------------------------------------------------------------------ build


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def read_markers(out: str) -> dict[int, dict]:
    kv = _kvstore(out, BUILD_PREFIX)
    keys = kv.list().result()
    futures = {int(k.decode().split(".")[0]): kv.read(k) for k in keys if k.endswith(b".json")}
    done = {}
    for index, fut in futures.items():
        result = fut.result()
        if result.state == "value":
            done[index] = json.loads(result.value)
    return done


def finalize(out: str, series: list[dict], done: dict[int, dict]) -> dict:
    """Writes label arrays, manifest.csv, errors.csv and summary.json from the markers."""
    n = len(series)
    arrays = schema.open_arrays(out, names=tuple(schema.LABEL_ARRAYS), read_only=False)
    values = {name: np.full((n, *trailing), fill if fill != "NaN" else np.nan, dtype)
              for name, (dtype, trailing, fill) in schema.LABEL_ARRAYS.items()}
    manifest = io.StringIO()
    writer = csv.DictWriter(manifest, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    errors = io.StringIO()
    err_writer = csv.writer(errors, lineterminator="\n")
    err_writer.writerow(["index", "series_key", "reason", "message"])
    reasons: Counter = Counter()
    for i, row in enumerate(series):
        outcome = done[i]
        if outcome["series_key"] != row["series_key"]:
            raise RuntimeError(f"done marker {i} belongs to another series; rebuild with --overwrite")
        built = outcome["status"] == "included"
        for head in labels.CLASS_HEADS:
            values[head][i] = labels.to_index(head, row.get(head, ""))
        values["coverage"][i] = labels.coverage_to_multihot(row.get("coverage", ""))
        if outcome["effective_spacing_mm"] is not None:
            values["effective_spacing_mm"][i] = outcome["effective_spacing_mm"]
        values["split"][i] = labels.split_index(row.get("split", "")) if built else labels.UNKNOWN
        if not built:
            reasons[outcome["reason"]] += 1
            err_writer.writerow([i, row["series_key"], outcome["reason"], outcome["message"]])
        writer.writerow({
            "index": i, "series_key": row["series_key"], "patient_key": row.get("patient_key", ""),
            "split": row.get("split", "") if built else "",
            "sequence": row.get("sequence", ""), "view": row.get("view", ""),
            "contrast": row.get("contrast", ""), "coverage": row.get("coverage", ""),
            "n_slices": _fmt(outcome["n_slices"]), "rows": _fmt(outcome["rows"]),
            "columns": _fmt(outcome["columns"]),
            "slice_spacing_mm": _fmt(outcome["slice_spacing_mm"]),
            "effective_spacing_mm": _fmt(outcome["effective_spacing_mm"]),
            "status": outcome["status"], "reason": outcome["reason"]})
    for name, arr in arrays.items():
        arr.write(values[name]).result()
    summary = {"num_series": n, "built": n - sum(reasons.values()),
               "excluded": dict(sorted(reasons.items())),
               "splits": dict(Counter(labels.SPLITS[s] for s in values["split"] if s >= 0))}
    kv = _kvstore(out)
    kv.write("manifest.csv", manifest.getvalue().encode()).result()
    kv.write("errors.csv", errors.getvalue().encode()).result()
    kv.write("summary.json", (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode()).result()
    return summary


def _prepare_dataset(out: str, n: int, config, fingerprint: str, overwrite: bool) -> None:
    build_attrs = {"index_sha256": fingerprint,
                   "config": json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config)}
    try:
        existing = schema.read_attributes(out)
    except FileNotFoundError:
        existing = None
    if existing is not None and not overwrite:
        if existing.get("build") != build_attrs:
            raise ValueError(f"{out} holds a dataset built from another index or config; "
                             "pass --overwrite to replace it (or choose another --out)")
        logging.info("Resuming the build in %s", out)
    elif existing is not None:
        logging.warning("Overwriting the dataset in %s", out)
        _kvstore(out).delete_range(ts.KvStore.KeyRange("_build/", "_build0")).result()
    # Without --overwrite this opens or creates, so a resume after a kill during creation
    # completes it, and shards starting together never delete each other's chunks.
    schema.create(out, n, volume_shape=tuple(config.volume_shape), codec=config.codec,
                  attributes={"build": build_attrs}, overwrite=overwrite)


def build(index_dir: str, dicom_root: str, out: str, config, workers: int = 0,
          shard: tuple[int, int] = (0, 1), overwrite: bool = False,
          progress: bool = True) -> dict:
    """Builds (or resumes) this shard's part of the dataset; finalizes when all is done.

    Returns a summary: this run's counts and timing, plus ``finalized`` and, when
    finalized, the dataset summary.
    """
    series, files, fingerprint = load_index(index_dir)
    if not series:
        raise ValueError(f"{index_dir}/series.csv has no included series")
    shard_i, shard_n = shard
    _prepare_dataset(out, len(series), config, fingerprint, overwrite)
    done = read_markers(out)
    tasks = [Task(i, row["series_key"], tuple(files[row["series_key"]]),
                  parse_orientation(row.get("orientation")))
             for i, row in enumerate(series)
             if i % shard_n == shard_i and i not in done]
    logging.info("%d series in the index; shard %d/%d has %d left to build (%d already done)",
                 len(series), shard_i, shard_n, len(tasks), len(done))
    options = options_from_config(config)
    fsync = bool(config.fsync)
    start = time.perf_counter()
    outcomes: list[dict] = []
    if tasks:
        from tqdm import tqdm
        bar = tqdm(total=len(tasks), unit="series", disable=not progress, desc="volumes")
        if workers <= 0:
            _init_worker(out, dicom_root, options, fsync, finalizer=False)
            results = map(_work, tasks)
            pool = None
        else:
            # spawn: TensorStore runs threads, and forking a threaded parent can deadlock.
            pool = multiprocessing.get_context("spawn").Pool(
                workers, initializer=_init_worker, initargs=(out, dicom_root, options, fsync))
            results = pool.imap_unordered(_work, tasks, chunksize=1)
        try:
            for outcome in results:
                outcomes.append(outcome)
                if outcome["status"] != "included":
                    logging.warning("series %d (%s): %s: %s", outcome["index"],
                                    outcome["series_key"][:12], outcome["reason"], outcome["message"])
                bar.update(1)
            if pool is None:
                flush_worker()
        finally:
            bar.close()
            if pool is not None:
                pool.close()  # workers finish their last write and marker as they exit
                pool.join()
    seconds = time.perf_counter() - start
    run = {"shard": f"{shard_i}/{shard_n}", "series_this_run": len(outcomes),
           "built_this_run": sum(o["status"] == "included" for o in outcomes),
           "seconds": round(seconds, 3),
           "series_per_s": round(len(outcomes) / seconds, 3) if outcomes and seconds > 0 else None,
           "mb_read_per_s": round(sum(o["bytes_read"] for o in outcomes) / 1e6 / seconds, 3)
           if outcomes and seconds > 0 else None}
    done = read_markers(out)
    if len(done) == len(series):
        run["finalized"] = True
        run["dataset"] = finalize(out, series, done)
    else:
        run["finalized"] = False
        logging.info("%d of %d series done; the last shard to finish writes the labels and "
                     "manifest (re-running any shard also does)", len(done), len(series))
    logging.info("summary: %s", json.dumps(run, sort_keys=True))
    return run
