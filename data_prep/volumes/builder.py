"""Orchestration of the volume build: index → series tasks on Dask → dataset.

Crash safety rests on one ordering: a series' *done marker*
``DATASET/_build/done/<index>.json`` (its outcome: status, reason, measured geometry) is
written only after TensorStore reported its volume chunk write complete. A re-run lists
the markers and redoes every series without one, overwriting whatever partial chunk a
killed run may have left. Markers are one small key per series, so they work on every
kvstore (local files, gs://, s3://) and workers on many machines never append to a
shared file.

Each series is one Dask task (data_prep/cluster.py). A worker writes its chunks and
markers itself, one write in flight: while TensorStore compresses and writes (and
fsyncs) series k on its own threads, the worker already decodes series k+1; before it
starts the next write it waits for series k's chunk, then writes k's marker. When the
run's tasks are done, every worker completes its last write (``flush_worker``), and the
client reads the markers. A worker lost with a write in flight (killed, its machine
gone) leaves no marker for it, although its task had finished: the client builds such
series again in a next round. A series whose task killed its worker each time it ran
(Dask's allowed-failures) gets a marker written by the client (worker_died, transient),
so the run ends; transient markers (worker_died, an I/O error) are not done for the next
run, which builds those series again. A chunk or marker write that fails leaves the
series without a marker (logged); the run ends unfinished, names it and exits 1.

The label arrays and manifest.csv are written once, by the client, when every marker is
present ("finalize"): they are a pure function of the index and the markers, so a
repeated finalize writes identical bytes, and no two workers ever read-modify-write a
shared label chunk. Until then every label reads as unknown and every split as -1, so a
trainer can never use a half-built dataset by mistake.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import time
import uuid
from collections import Counter
from typing import Any

import numpy as np
import tensorstore as ts
from absl import logging

from data_prep import cluster
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
    size: tuple[int, int, int] | None = None  # the index's rows, columns, n_slices, if given


def parse_orientation(text: str | None) -> tuple[float, ...] | None:
    """series.csv ``orientation`` (6 cosines ';'-joined) → floats; None if absent or malformed."""
    try:
        values = tuple(float(v) for v in (text or "").split(";"))
    except ValueError:
        return None
    return values if len(values) == 6 and all(math.isfinite(v) for v in values) else None


def parse_size(row: dict) -> tuple[int, int, int] | None:
    """series.csv rows, columns, n_slices → ints; None if any is absent or malformed."""
    try:
        size = tuple(int(row.get(k) or 0) for k in ("rows", "columns", "n_slices"))
    except ValueError:
        return None
    return size if all(v > 0 for v in size) else None


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
        # surrogateescape: file names that are not UTF-8, as the index wrote them
        tables[name] = list(csv.DictReader(io.StringIO(raw.decode("utf-8", "surrogateescape"),
                                                       newline="")))
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


# ----------------------------------------------------------------------------- worker

@dataclasses.dataclass(frozen=True)
class Run:
    """What every series task of one build shares (sent with each task, small)."""
    run_id: str  # a fresh id per build call: handles are reopened for each run
    out: str
    dicom_root: str
    options: preprocess.VolumeOptions
    fsync: bool
    max_series_bytes: int | None = None  # memory a series may need (None: no limit)


# Per worker process, kept from task to task: the open arrays of the current run, its
# done-marker store, the write in flight, and the scratch buffers (kept across runs
# with the same options, like a long-lived worker of a cluster would want).
_WORKER: dict[str, Any] = {}


def _kvstore(out: str, prefix: str = "", context: ts.Context | None = None) -> ts.KvStore:
    return ts.KvStore.open(schema.kvstore_spec(out.rstrip("/") + "/" + prefix),
                           context=context or ts.Context()).result()


def _context(fsync: bool) -> ts.Context:
    # fsync makes a completed write survive a power loss or OS crash, not just kill -9.
    return ts.Context({"file_io_sync": bool(fsync)})


def _state(run: Run) -> dict[str, Any]:
    if _WORKER.get("run_id") != run.run_id:
        flush_worker()  # another run's last write (its run normally flushed it already)
        context = _context(run.fsync)
        _WORKER["volume"] = schema.open_arrays(run.out, names=("volume",), read_only=False,
                                               context=context)["volume"]
        _WORKER["markers"] = _kvstore(run.out, BUILD_PREFIX, context)
        if _WORKER.get("options") != run.options:
            _WORKER["workspace"] = preprocess.Workspace(run.options)  # buffers kept across series
        _WORKER.update(run_id=run.run_id, dicom_root=run.dicom_root, options=run.options,
                       pending=None)  # pending: (chunk write future, outcome) in flight
    return _WORKER


def flush_worker() -> None:
    """Waits for the write in flight, then writes its done marker (never before).

    Called before each next write, and on every worker when the run's tasks are done."""
    pending, _WORKER["pending"] = _WORKER.get("pending"), None
    if pending is None:
        return
    chunk, outcome = pending
    try:
        if chunk is not None:
            chunk.result()
        _WORKER["markers"].write(_marker_key(outcome["index"]),
                                 json.dumps(outcome, sort_keys=True).encode()).result()
    except Exception as err:  # noqa: BLE001 -- a full disk, a lost bucket: this series only
        # No marker: the series is not done, and the run says so at its end; a re-run
        # builds it again. The build goes on (other writes may still fit).
        logging.error("series %d (%s): its volume could not be written: %s", outcome["index"],
                      outcome["series_key"][:12], str(err).splitlines()[0][:300])


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


def _outcome(task: Task, bytes_read: int = 0) -> dict:
    # transient: a failure that says nothing about the series (labels.TRANSIENT_REASONS,
    # an I/O error): recorded, and built again by the next run.
    return {"index": task.index, "series_key": task.series_key, "status": "included",
            "reason": "", "message": "", "n_slices": None, "rows": None, "columns": None,
            "slice_spacing_mm": None, "effective_spacing_mm": None, "bytes_read": bytes_read,
            "transient": False}


def build_series(task: Task, run: Run) -> dict:
    """Builds one series and starts its chunk write; the marker follows its completion (a Dask task).

    Returns the outcome (for progress and the run summary) while the write may still
    be in flight; durability is recorded by the marker alone.
    """
    state = _state(run)
    options: preprocess.VolumeOptions = state["options"]
    root = state["dicom_root"]
    abs_paths = [os.path.join(root, *p.split("/")) for p in task.paths]
    outcome = _outcome(task, _bytes(abs_paths))
    built = None
    try:
        if not abs_paths:
            # files.csv lists no file under this key: e.g. a multi-frame file whose
            # frames the index split into several series is listed under one of them.
            raise preprocess.SeriesError("decode_failed", "files.csv lists no included file "
                                          "for this series")
        if run.max_series_bytes is not None and task.size is not None:
            need = preprocess.memory_estimate_bytes(*task.size, len(abs_paths), options)
            if need > run.max_series_bytes:
                raise preprocess.SeriesError(
                    "too_large", f"{task.size[0]}x{task.size[1]} pixels, {task.size[2]} slices "
                    f"in {len(abs_paths)} file(s) need about {need / 2**20:.0f} MiB, more than "
                    f"max_series_memory_mb={run.max_series_bytes / 2**20:.0f}")
        built = preprocess.build_volume(abs_paths, options, orientation=task.orientation,
                                         workspace=state["workspace"])
    except preprocess.SeriesError as err:
        outcome.update(status="excluded", reason=err.reason,
                       message=_scrub(err.message, abs_paths, root), transient=err.transient,
                       **err.info)
    except Exception as err:  # any other failure of one series must not stop the build
        outcome.update(status="excluded", reason="decode_failed",
                       message=_scrub(f"{type(err).__name__}: {err}", abs_paths, root))
    # One write in flight per worker: the previous series' chunk must be complete (and
    # get its marker) before this one's write starts.
    flush_worker()
    chunk = None
    if outcome["status"] == "included":
        chunk = state["volume"][task.index].write(built.volume)
        outcome.update(n_slices=built.n_slices, rows=built.rows, columns=built.columns,
                       slice_spacing_mm=built.slice_spacing_mm,
                       effective_spacing_mm=built.effective_spacing_mm)
    state["pending"] = (chunk, outcome)
    return outcome


# ------------------------------------------------------------------------------ build


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def missing_inputs(tasks: list[Task], dicom_root: str) -> list[tuple[int, str]]:
    """(series index, path) of every file the tasks name that is not there."""
    missing = []
    for task in tasks:
        for p in task.paths:
            if not os.path.exists(os.path.join(dicom_root, *p.split("/"))):
                missing.append((task.index, p))
    return missing


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
    volume_shape = schema.read_attributes(out)["volume_shape"]
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
        if built:
            values["voxel_spacing_mm"][i] = schema.voxel_spacing_mm(
                row.get("pixel_spacing_mm", ""), outcome["rows"], outcome["columns"],
                outcome["effective_spacing_mm"], volume_shape)
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
               # excluded for a reason that may pass (worker_died, an I/O error): a re-run
               # of the build tries them again
               "to_retry": sum(bool(done[i].get("transient")) for i in range(n)),
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
    # completes it.
    schema.create(out, n, volume_shape=tuple(config.volume_shape), codec=config.codec,
                  attributes={"build": build_attrs}, overwrite=overwrite)


_ROUNDS = 3  # task rounds per run; a later round redoes series that ended without a marker


def build(index_dir: str, dicom_root: str, out: str, config, workers: int = 0,
          overwrite: bool = False, progress: bool = True,
          scheduler: str | None = None,
          connect_timeout_s: float = cluster.CONNECT_TIMEOUT_S) -> dict:
    """Builds (or resumes) the dataset on Dask, then finalizes it.

    Series are Dask tasks on the cluster at ``scheduler`` (or DASK_SCHEDULER_ADDRESS),
    else on a LocalCluster of ``workers`` processes, else (0) in this process. Returns a
    summary: this run's counts and timing, ``finalized`` and the dataset summary.
    """
    series, files, fingerprint = load_index(index_dir)
    if not series:
        raise ValueError(f"{index_dir}/series.csv has no included series")
    all_tasks = [Task(i, row["series_key"], tuple(files[row["series_key"]]),
                      parse_orientation(row.get("orientation")), parse_size(row))
                 for i, row in enumerate(series)]
    # Absolute, so that workers started elsewhere (another cwd) find the same files.
    local = "://" not in out
    limit_mb = float(config.get("max_series_memory_mb", 0) or 0)
    run = Run(uuid.uuid4().hex, os.path.abspath(out) if local else out,
              os.path.abspath(dicom_root), options_from_config(config), bool(config.fsync),
              int(limit_mb * 2**20) if limit_mb > 0 else None)
    outcomes: dict[int, dict] = {}
    # The cluster first: an unreachable scheduler fails before anything is written.
    with cluster.engine(scheduler, workers, connect_timeout_s=connect_timeout_s) as eng:
        start = time.perf_counter()
        _prepare_dataset(out, len(series), config, fingerprint, overwrite)
        # A transient failure of an earlier run (worker_died, an I/O error) is not done.
        done = {i: o for i, o in read_markers(out).items() if not o.get("transient")}
        logging.info("%d series in the index; %d left to build (%d already done)",
                     len(series), len(series) - len(done), len(done))
        _check_inputs([t for t in all_tasks if t.index not in done], run.dicom_root, index_dir)
        for round_ in range(_ROUNDS):
            tasks = [t for t in all_tasks if t.index not in done]
            if not tasks:
                break
            if round_:
                logging.warning("%d series ended without their done marker (a worker was "
                                "lost with the write in flight): building them again", len(tasks))
            _run_tasks(eng, tasks, run, outcomes, progress)
            eng.on_each_worker(flush_worker)  # every worker's last write and marker
            done = read_markers(out)
    seconds = time.perf_counter() - start
    finished = list(outcomes.values())
    summary = {"series_this_run": len(finished),
               "built_this_run": sum(o["status"] == "included" for o in finished),
               "seconds": round(seconds, 3),
               "series_per_s": round(len(finished) / seconds, 3) if finished and seconds > 0 else None,
               "mb_read_per_s": round(sum(o["bytes_read"] for o in finished) / 1e6 / seconds, 3)
               if finished and seconds > 0 else None}
    retry = sorted(i for i, o in done.items() if o.get("transient"))
    summary["to_retry"] = len(retry)
    if len(done) == len(series):
        try:
            summary["dataset"] = finalize(out, series, done)
            summary["finalized"] = True
        except Exception as err:  # noqa: BLE001 -- e.g. the disk filled up: said, not a traceback
            summary["finalized"] = False
            logging.error("the dataset's labels and manifest could not be written: %s; run "
                          "the same command again", str(err).splitlines()[0][:300])
        if retry:
            logging.error("%d series failed for a reason that may pass (%s); they are recorded "
                          "in errors.csv and the same command builds them again: %s", len(retry),
                          ", ".join(sorted({done[i]["reason"] for i in retry})), _names(retry, series))
    else:
        summary["finalized"] = False
        left = sorted(set(range(len(series))) - set(done))
        logging.error("%d of %d series are unfinished (no done marker after %d rounds: their "
                      "volume could not be written, or their worker was lost): %s; run the same "
                      "command again to build them", len(left), len(series), _ROUNDS,
                      _names(left, series))
    logging.debug("summary: %s", json.dumps(summary, sort_keys=True))  # the CLI prints it
    return summary


def _names(indices: list[int], series: list[dict], at_most: int = 10) -> str:
    """'index (key prefix)' of the first few series: dataset rows a person can look up."""
    shown = ", ".join(f"{i} ({series[i]['series_key'][:12]})" for i in indices[:at_most])
    return shown + (f" and {len(indices) - at_most} more" if len(indices) > at_most else "")


def _check_inputs(tasks: list[Task], dicom_root: str, index_dir: str) -> None:
    """Stops the build before any series when files the index lists are absent: a wrong or
    unmounted --dicom_root must not turn every series into a permanent decode_failed."""
    missing = missing_inputs(tasks, dicom_root)
    if not missing:
        return
    total = sum(len(t.paths) for t in tasks)
    # Row numbers of files.csv (header: row 1), not paths: a path can carry a patient's name.
    lines = _files_csv_lines(index_dir, {p for _, p in missing[:3]})
    raise FileNotFoundError(
        f"{len(missing)} of the {total} files the index lists for the series left to build are "
        f"missing under --dicom_root={dicom_root} (files.csv rows {', '.join(map(str, lines))}"
        f"{', …' if len(missing) > 3 else ''}): is the archive mounted, and is this the root "
        "the index was made from? Nothing was built.")


def _files_csv_lines(index_dir: str, paths: set[str]) -> list[int]:
    with open(os.path.join(index_dir, "files.csv"), newline="", encoding="utf-8",
              errors="surrogateescape") as f:
        return sorted(n for n, row in enumerate(csv.DictReader(f), start=2) if row["path"] in paths)


def _run_tasks(eng: cluster.Engine, tasks: list[Task], run: Run, outcomes: dict[int, dict],
               progress: bool) -> None:
    from tqdm import tqdm

    markers = None
    bar = tqdm(total=len(tasks), unit="series", disable=not progress, desc="volumes")
    try:
        for i, outcome in eng.map(build_series, tasks, key="series", run=run):
            if isinstance(outcome, cluster.WorkerDied):
                # Building it killed every worker it ran on: recorded (by this process,
                # the marker's only writer then), so the run ends and a re-run agrees.
                outcome = _outcome(tasks[i]) | {"status": "excluded", "reason": "worker_died",
                                                "message": outcome.message, "transient": True}
                markers = markers or _kvstore(run.out, BUILD_PREFIX, _context(run.fsync))
                markers.write(_marker_key(outcome["index"]),
                              json.dumps(outcome, sort_keys=True).encode()).result()
            outcomes[outcome["index"]] = outcome
            if outcome["status"] != "included":
                logging.warning("series %d (%s): %s: %s", outcome["index"],
                                outcome["series_key"][:12], outcome["reason"], outcome["message"])
            bar.update(1)
    finally:
        bar.close()
