"""Task ``predict``: look at an unlabelled DICOM archive with a pretrained model.

    python -m radnet.main --config=configs/predict.py --config.checkpoint=RUN \\
        --config.dicom_root=DIR --workdir=OUT [--config.neighbours=5]

Headers are read in parallel (worker processes) and grouped into series exactly as
``data_prep.index`` does (radnet.dicom.series, the same keyed ``series_key`` under the same
salt, the same header-mined labels); every series the index would include, or exclude only
for a reason in ``config.also_predict`` (default: ``missing_description`` — the image needs
no description), is made into a volume in memory (radnet.preprocess, with the run's own
preprocessing; nothing is written to a dataset) and run through the model on all devices
(radnet.evaluators.predict). Writes to OUT:

- ``predictions.csv``  one row per series found (columns: docs/predict.md)
- ``embeddings.npy``   float32 [N, C], row i ↔ row i of predictions.csv (NaN: not predicted)
- ``qc.md``            the QC rule and thresholds; per head: how often header and image
                       agree; the strongest disagreements (series keys only)
- ``qc_calibration.json``  the per-head QC thresholds, calibrated on series with trusted
                       labels (the run's val and test splits by default; docs/predict.md)
- ``neighbours.csv``   with ``config.neighbours=k``: each series' k nearest by cosine
- ``suggested_overrides.csv``  confident predictions for missing header labels, in the
                       index's overrides.csv format
- ``summary.json``     counts per status and where the time went

Resumable: the predictions of each chunk of series land in ``OUT/_work/`` when the chunk
is done; a re-run reads the headers again (nothing with free text is cached) and runs the
model only on series without a finished chunk. No patient identifier, description or path
reaches any output or log line: series are named by keyed hashes only.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import logging as std_logging
import math
import multiprocessing
import os
import time
from typing import Any, Sequence

import numpy as np
from absl import logging

from radnet import labels
from radnet import preprocess as preprocess_lib
from radnet import rules
from radnet.dicom import headers as dicom_headers
from radnet.dicom import salt as salt_lib
from radnet.dicom import series as series_lib

PREDICTIONS_CSV = "predictions.csv"
EMBEDDINGS = "embeddings.npy"
QC_MD = "qc.md"
QC_CALIBRATION_JSON = "qc_calibration.json"
NEIGHBOURS_CSV = "neighbours.csv"
OVERRIDES_CSV = "suggested_overrides.csv"
SUMMARY_JSON = "summary.json"
WORK_DIR = "_work"
PREDICTED = "predicted"

CLASS_HEADS = tuple(labels.CLASS_HEADS)
QC_HEADS = (*CLASS_HEADS, "coverage", "slice_spacing")
OVERRIDE_COLUMNS = ("series_key", "column", "value", "probability")


def columns() -> list[str]:
    """The columns of predictions.csv, in order (docs/predict.md)."""
    cols = ["series_key", "patient_key", "study_key", "modality", "n_slices", "status",
            "index_status", "index_reasons"]
    for head in CLASS_HEADS:
        cols += [head, f"{head}_probability"]
    cols += ["coverage"] + [f"coverage_{r}" for r in labels.COVERAGE]
    cols += ["slice_spacing_mm"]
    cols += [f"header_{h}" for h in (*CLASS_HEADS, "coverage")] + ["header_effective_spacing_mm"]
    cols += ["qc"]
    return cols


# --------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _quiet() -> None:
    # Per-value warnings of odd headers would flood the log (the index does the same).
    std_logging.getLogger("pydicom").setLevel(std_logging.ERROR)


def read_headers_chunk(root: str, rels: Sequence[str], secret: bytes) -> list[dict]:
    """Header records of some files (a worker task): radnet.dicom.headers.read_header."""
    return [dicom_headers.read_header(os.path.join(root, rel), secret) for rel in rels]


def build_series_volume(paths: Sequence[str], options: preprocess_lib.VolumeOptions,
                        orientation) -> tuple[np.ndarray | None, str, str, float]:
    """One series → (uint8 volume or None, reason, message, seconds) (a worker task).

    The reason is an exclusion reason when the series cannot become a volume; the message
    names files only as "file k of n".
    """
    start = time.perf_counter()
    workspace = _WORKER.get("workspace")
    if workspace is None or not workspace.fits(options):
        workspace = _WORKER["workspace"] = preprocess_lib.Workspace(options)
    try:
        if not paths:
            raise preprocess_lib.SeriesError("decode_failed", "the series has no readable file")
        volume = preprocess_lib.build_volume(paths, options, orientation=orientation,
                                             workspace=workspace).volume
        return volume, "", "", time.perf_counter() - start
    except preprocess_lib.SeriesError as err:
        return None, err.reason, err.message, time.perf_counter() - start
    except Exception as err:  # noqa: BLE001  (one bad series must not stop the archive)
        return None, "decode_failed", type(err).__name__, time.perf_counter() - start


class _Pool:
    """Worker processes (spawned: the parent holds JAX's threads), or this process (0)."""

    def __init__(self, workers: int):
        self.workers = int(workers)
        self._ex = None
        if self.workers > 0:
            self._ex = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_quiet)
        else:
            _quiet()

    def submit(self, fn, *args) -> concurrent.futures.Future:
        if self._ex is not None:
            return self._ex.submit(fn, *args)
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(fn(*args))
        return future

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(cancel_futures=True)


# --------------------------------------------------------------------------- headers


def walk(root: str, skip: Sequence[str] = ()) -> tuple[list[str], int]:
    """(every regular file under ``root`` as a sorted '/'-separated relative path, the
    number of other entries skipped: FIFOs, sockets, devices are never opened)."""
    root = os.path.abspath(root)
    skip_abs = {os.path.abspath(s) for s in skip}
    found, skipped = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if os.path.join(dirpath, d) not in skip_abs)
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.isfile(full):
                found.append(os.path.relpath(full, root).replace(os.sep, "/"))
            else:
                skipped += 1
    return sorted(found), skipped


def read_headers(root: str, rels: list[str], secret: bytes, pool: _Pool,
                 chunk: int = 64) -> dict[str, dict]:
    """Header record of every file, read on ``pool`` in chunks."""
    futures = [(rels[i:i + chunk], pool.submit(read_headers_chunk, root, rels[i:i + chunk],
                                               secret))
               for i in range(0, len(rels), chunk)]
    records = {}
    for part, future in futures:
        records.update(zip(part, future.result()))
    return records


@dataclasses.dataclass
class Series:
    """One series found in the archive: its index row and the files of its volume."""
    row: dict
    files: list[str]
    orientation: tuple[float, ...] | None


def group(records: dict[str, dict], secret: bytes, index_config,
          collections_table: dict | None = None) -> list[Series]:
    """The index's series (radnet.dicom.series.build_series), sorted by series_key, each
    with the files data_prep.build_volumes would read for it (files.csv's rule: every file
    keyed to the series whose own record is readable and an image)."""
    rows, file_key, _ = series_lib.build_series(records, secret, index_config,
                                                collections_table or {})
    files: dict[str, list[str]] = {}
    for rel in sorted(records):
        key = file_key.get(rel, "")
        if key and records[rel]["status"] not in ("unreadable", "not_image"):
            files.setdefault(key, []).append(rel)
    out = []
    for row in sorted(rows, key=lambda r: r["series_key"]):
        orientation = None
        try:
            values = tuple(float(v) for v in (row.get("orientation") or "").split(";"))
            if len(values) == 6 and all(math.isfinite(v) for v in values):
                orientation = values
        except ValueError:
            pass
        out.append(Series(row, files.get(row["series_key"], []), orientation))
    return out


def model_spacing(rows: Sequence[dict], depth: int) -> None:
    """Sets each row's ``effective_spacing_mm`` to the spacing between the ``depth`` slices
    of the model's volume (radnet.rules.effective_spacing_mm, the builder's formula): the
    index's is for its own ``target_slices``, and the spacing head predicts the model's."""
    for row in rows:
        spacing, n = _float(row.get("slice_spacing_mm")), _float(row.get("n_slices"))
        effective = (rules.effective_spacing_mm(spacing, int(n), depth)
                     if spacing is not None and n is not None else None)
        row["effective_spacing_mm"] = "" if effective is None else f"{effective:.6g}"


def predictable(row: dict, also_predict: Sequence[str]) -> bool:
    """Included by the index, or excluded only for reasons the image does not need."""
    reasons = [r for r in (row.get("reasons") or "").split(";") if r]
    return row["status"] == "included" or (bool(reasons) and set(reasons) <= set(also_predict))


# --------------------------------------------------------------------------- inference


def _fingerprint(p, options, secret: bytes) -> dict:
    return {"checkpoint": os.path.abspath(p.source), "step": int(p.step),
            "model_name": p.config.model_name,
            "options": json.loads(json.dumps(dataclasses.asdict(options))),
            "salt": salt_lib.salt_fingerprint(secret)}


def _load_parts(work: str) -> dict[str, dict]:
    """Finished chunks: series_key → {"status", probabilities…, "embedding"}."""
    done: dict[str, dict] = {}
    for name in sorted(os.listdir(work)):
        if not (name.startswith("part-") and name.endswith(".npz")):
            continue
        with np.load(os.path.join(work, name)) as part:
            arrays = {k: part[k] for k in part.files}
        for i, key in enumerate(arrays["series_key"]):
            done[str(key)] = {k: v[i] for k, v in arrays.items() if k != "series_key"}
    return done


def _write_part(work: str, index: int, results: list[tuple[str, dict]]) -> None:
    arrays = {"series_key": np.asarray([k for k, _ in results])}
    for field in results[0][1]:
        arrays[field] = np.stack([np.asarray(r[field]) for _, r in results])
    path = os.path.join(work, f"part-{index:06d}.npz")
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # a chunk is either whole or absent


def output_fields(p) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Name → (per-series shape, dtype) of the model's outputs (evaluated abstractly)."""
    import jax  # noqa: PLC0415

    shape = tuple(p.volume_options.volume_shape)
    abstract = jax.eval_shape(p.inference_fn(), p.variables,
                              jax.ShapeDtypeStruct((1, *shape), np.uint8))
    return {k: (tuple(v.shape[1:]), v.dtype) for k, v in abstract.items()}


class Inference:
    """The model on all devices: radnet.evaluators.predict over padded, masked batches."""

    def __init__(self, p, batch_size: int):
        import jax  # noqa: PLC0415

        from radnet.evaluators import predict as predict_lib  # noqa: PLC0415

        self.jax, self.predict_lib = jax, predict_lib
        mesh = jax.make_mesh((jax.device_count(),), ("data",))
        self.sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
        replicated = jax.sharding.NamedSharding(mesh, jax.P())
        # Through the host: loaded variables may sit on this process's devices only.
        self.variables = jax.device_put(jax.device_get(p.variables), replicated)
        fn = p.inference_fn()
        self.step = jax.jit(lambda v, b: (fn(v, b["volume"]), {}),
                            out_shardings=(self.sharding, replicated))
        self.local_batch = predict_lib.local_batch_size(batch_size, jax.process_count(),
                                                        jax.local_device_count())
        self.fields = output_fields(p)
        self.shape = tuple(p.volume_options.volume_shape)

    def my_positions(self, n: int) -> list[int]:
        """The item positions this process reads (padded_batches' own layout)."""
        probe = self.predict_lib.padded_batches(
            list(range(n)), lambda i: {"i": np.zeros((), np.int8)}, self.local_batch,
            self.jax.process_index(), self.jax.process_count())
        return [int(i) for b in probe for i in b[self.predict_lib.POSITION] if i >= 0]

    def run(self, n: int, read) -> dict[int, dict]:
        """Items 0..n-1 through the model; ``read(i)`` → uint8 volume or None (failed).
        Returns position → outputs of every item whose volume was made (all processes)."""
        zeros = np.zeros(self.shape, np.uint8)

        def row(i):
            volume = read(i)
            return {"volume": zeros if volume is None else volume,
                    "made": np.asarray(volume is not None)}

        batches = self.predict_lib.padded_batches(
            list(range(n)), row, self.local_batch, self.jax.process_index(),
            self.jax.process_count())
        out: dict[int, dict] = {}
        for outputs, kept, _ in self.predict_lib.predict(
                self.step, self.variables, batches, self.sharding, device_keys=("volume",),
                gather_keys=(self.predict_lib.POSITION, "made")):
            for j, position in enumerate(kept[self.predict_lib.POSITION]):
                if kept["made"][j]:
                    out[int(position)] = {k: v[j] for k, v in outputs.items()}
        return out


# --------------------------------------------------------------------------- outputs


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{float(value):.{digits}f}"


def _float(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- QC

# Two inference paths (a stored volume through radnet.evaluate, the same volume made here)
# agree to ~5e-7 (docs/predict.md): a series this close to its head's threshold is not
# flagged on either side, so the calibration's own series keep their verdict here.
QC_EPS = 1e-6
# Fewer trusted series than this many times 1/target: the calibration warns (see above).
QC_MIN_TAIL = 4


def header_labels(row: dict) -> dict:
    """An index row's header labels in array form: class heads as an index (-1 unknown),
    ``coverage`` a 9-vector of 0/1 (None unknown), ``slice_spacing`` mm (None unknown)."""
    out: dict[str, Any] = {}
    for head, names in labels.CLASS_HEADS.items():
        value = row.get(head) or ""
        out[head] = names.index(value) if value in names else labels.UNKNOWN
    cov = row.get("coverage") or ""
    out["coverage"] = np.asarray(labels.coverage_to_multihot(cov), np.float64) if cov else None
    out["slice_spacing"] = _float(row.get("effective_spacing_mm"))
    return out


def qc_scores(result: dict, header: dict) -> dict[str, float]:
    """Per head the header gives a label for: how strongly the image disbelieves it.

    Class heads: 1 − p(the header's class). Coverage: the largest 1 − p(the header's
    answer) over the nine regions. Slice spacing: |predicted − header| / header.
    ``header``: :func:`header_labels`."""
    scores: dict[str, float] = {}
    for head in labels.CLASS_HEADS:
        j = int(header[head])
        if j >= 0:
            scores[head] = 1.0 - float(np.asarray(result[head], np.float64)[j])
    if header["coverage"] is not None:
        probs = np.asarray(result["coverage"], np.float64)
        scores["coverage"] = float(np.max(np.abs(header["coverage"] - probs)))
    mm = header["slice_spacing"]
    if mm is not None and mm > 0:
        scores["slice_spacing"] = abs(float(result["slice_spacing"]) - mm) / mm
    return scores


# Calibration strata: a head can be far more reliable on one modality than on the other
# (the demo model's contrast head: ROC AUC ~0.96 on MR, ~0.6 on CT), and one threshold
# per head would then be set by the weak modality's confident errors and blind the strong
# one. With config.qc_by_modality the thresholds are "head@CT" / "head@MR" (the header's
# sequence label: CT, or one of the MR sequences); the plain "head" key (the larger of the
# two) serves series whose header gives no sequence.
QC_GROUPS = ("CT", "MR")


def qc_group(header: dict) -> str | None:
    """The calibration stratum of a series from its header labels: "CT", "MR" or None."""
    j = int(header.get("sequence", labels.UNKNOWN))
    if j < 0:
        return None
    return "CT" if labels.SEQUENCE[j] == "CT" else "MR"


def threshold_of(thresholds: dict[str, float], head: str, header: dict) -> float:
    """The threshold for ``head`` of a series: its modality's when calibrated per modality."""
    group = qc_group(header)
    return float(thresholds.get(f"{head}@{group}", thresholds[head]) if group
                 else thresholds[head])


def qc_flags_from(scores: dict[str, float], header: dict, thresholds: dict[str, float],
                  config) -> dict[str, float]:
    """The flagged heads of one series → their disbelief score: score > the head's
    threshold (:func:`threshold_of`; slice spacing: also off by more than
    ``config.qc_spacing_abs_mm``)."""
    flags = {}
    for head in QC_HEADS:
        if head not in scores or scores[head] <= threshold_of(thresholds, head, header) + QC_EPS:
            continue
        if head == "slice_spacing" and \
                scores[head] * header["slice_spacing"] <= float(config.qc_spacing_abs_mm):
            continue
        flags[head] = scores[head]
    return flags


def _per_head(value: float, config) -> dict[str, float]:
    """``value`` for every class head and coverage; spacing's relative tolerance."""
    return {**{h: float(value) for h in (*CLASS_HEADS, "coverage")},
            "slice_spacing": float(config.qc_spacing_rel)}


def fixed_thresholds(config) -> dict[str, float]:
    """The uncalibrated rule: p(header label) < 1 − ``qc_threshold`` (coverage: for some
    region), spacing off by more than ``qc_spacing_rel``."""
    return _per_head(config.qc_threshold, config)


def qc_floors(config) -> dict[str, float]:
    """The least threshold calibration may choose: the model must at least disagree
    (disbelief ≥ ``qc_min_disbelief``: p(header label) ≤ 0.5 by default), and spacing be
    off by ``qc_spacing_rel``."""
    return _per_head(config.qc_min_disbelief, config)


def calibrate_thresholds(scores: Sequence[dict[str, float]], headers: Sequence[dict],
                         config) -> dict:
    """Per-head thresholds from series whose labels are trusted (e.g. a validation split).

    Every head gets the same share ``q`` of its trusted series above its threshold (the
    head's (1 − q) quantile of disbelief, never below :func:`qc_floors`); ``q`` is the
    largest for which at most ``config.qc_target_flag_rate`` of the trusted series are
    flagged on any head. Equal shares keep one weak head from taking the whole budget
    (its threshold rises to where its errors stop) while the reliable heads keep low ones.
    Returns {"thresholds", "per_head", "series", "flagged", "flag_rate", "share"}.
    """
    target = float(config.qc_target_flag_rate)
    floors = qc_floors(config)
    n = len(scores)
    by_modality = bool(config.get("qc_by_modality", False))
    groups = [qc_group(hd) if by_modality else None for hd in headers]
    # Columns: a head, or a head within one modality ("contrast@CT").
    cols = [(h, g) for h in QC_HEADS for g in ((*QC_GROUPS, None) if by_modality else (None,))]
    names = [f"{h}@{g}" if g else h for h, g in cols]
    # [n, columns] disbelief, NaN where the header gives no label (or another modality);
    # spacing counts only where it is also off by more than the absolute tolerance (as
    # qc_flags_from).
    table = np.full((n, len(cols)), np.nan)
    for i, (s, hd, g) in enumerate(zip(scores, headers, groups)):
        for j, (h, cg) in enumerate(cols):
            if cg == g and h in s and (h != "slice_spacing" or s[h] * hd["slice_spacing"]
                                       > float(config.qc_spacing_abs_mm)):
                table[i, j] = s[h]
    values = {name: np.sort([s[h] for s, g in zip(scores, groups) if h in s and g == cg])
              for name, (h, cg) in zip(names, cols)}

    def at(q: float) -> dict[str, float]:
        out = {name: max(floors[h], float(np.quantile(values[name], 1.0 - q, method="higher"))
                         if values[name].size else floors[h])
               for name, (h, _) in zip(names, cols)}
        if by_modality:  # "head" serves series without a sequence: the strictest of all
            for h in QC_HEADS:
                out[h] = max(out[f"{h}@{g}" if g else h] for g in (*QC_GROUPS, None))
        return out

    def count(thresholds) -> int:
        limit = np.asarray([thresholds[name] for name in names]) + QC_EPS
        with np.errstate(invalid="ignore"):
            return int((table > limit).any(axis=1).sum())

    # Candidate shares: where some head's quantile changes (k / n_h). The count only grows
    # with q (every threshold falls), so the largest admissible share is found by bisection.
    shares = np.unique(np.concatenate(
        [[0.0]] + [np.arange(1, v.size + 1) / v.size for v in values.values() if v.size]))
    lo, hi = 0, len(shares) - 1   # shares[lo] admissible (q = 0 flags nothing on these)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(at(float(shares[mid]))) <= target * n:
            lo = mid
        else:
            hi = mid - 1
    best = float(shares[lo])
    thresholds = at(best)
    flags = [qc_flags_from(s, hd, thresholds, config) for s, hd in zip(scores, headers)]
    per_head = {name: {"compared": int(values[name].size), "threshold": thresholds[name],
                       "flagged": sum(h in f for f, g in zip(flags, groups) if g == cg)}
                for name, (h, cg) in zip(names, cols)}
    n_flagged = sum(bool(f) for f in flags)
    out = {"thresholds": thresholds, "per_head": per_head, "series": n,
           "flagged": n_flagged, "flag_rate": n_flagged / n if n else 0.0, "share": best}
    if target > 0 and n * target < QC_MIN_TAIL:
        # Each threshold then rests on the few largest scores of its head: a new correct
        # series passes the largest of n about once in n + 1, per head.
        out["warning"] = (f"only {n} trusted series: each threshold rests on a few scores, so "
                          f"new series may be flagged more often than the "
                          f"{100 * target:g} % target (≥ {math.ceil(QC_MIN_TAIL / target)} "
                          "series make it firmer; docs/predict.md)")
    return out


def qc_flags(result: dict, row: dict, thresholds: dict[str, float], config) -> dict[str, float]:
    """Heads where the header label and the image disagree beyond the threshold → the
    disbelief score (docs/predict.md, "The QC rule")."""
    header = header_labels(row)
    return qc_flags_from(qc_scores(result, header), header, thresholds, config)


def _calibration_source(p, config) -> tuple[str, list[str], bool]:
    """(dataset, splits, asked): where to calibrate the QC thresholds; "" for nowhere."""
    dataset = str(config.qc_calibration_dataset or "")
    asked = dataset not in ("", "auto")
    if dataset == "auto":
        dataset = str(p.config.get("dataset", "") or "")
    splits = [s.strip() for s in str(config.qc_calibration_split).split(",") if s.strip()]
    return dataset, splits, asked


def calibration_scores(p, config, dataset: str, splits: Sequence[str]
                       ) -> tuple[list[dict], list[dict]]:
    """The model on ``splits`` of ``dataset`` (stored volumes with trusted labels, through
    radnet.evaluate's own path) → (disbelief scores, header labels) per series."""
    from radnet import evaluate  # noqa: PLC0415
    from radnet.evaluators import heads as heads_lib  # noqa: PLC0415

    from radnet.data import source as source_lib  # noqa: PLC0415

    scores, headers = [], []
    for split in splits:
        if not len(source_lib.split_rows(dataset, split)[0]):
            continue
        outputs, targets = evaluate.predict(p.config, p.variables, dataset, split,
                                            int(config.batch_size),
                                            progress=bool(config.progress))
        probs = {h: heads_lib.softmax(outputs[h]) for h in labels.CLASS_HEADS}
        probs["coverage"] = heads_lib.sigmoid(outputs["coverage"])
        spacing = np.asarray(outputs["slice_spacing"], np.float64).reshape(-1)
        for i in range(len(targets["index"])):
            result = {h: v[i] for h, v in probs.items()}
            result["slice_spacing"] = float(spacing[i])
            cov = np.asarray(targets["coverage"][i], np.float64)
            mm = float(targets[labels.SLICE_SPACING_TARGET][i])
            header = {h: int(targets[h][i]) for h in labels.CLASS_HEADS}
            header["coverage"] = cov if (cov >= 0).all() else None
            header["slice_spacing"] = mm if math.isfinite(mm) else None
            scores.append(qc_scores(result, header))
            headers.append(header)
    return scores, headers


def calibrate(p, config, dataset: str, splits: Sequence[str]) -> dict:
    """:func:`calibrate_thresholds` on :func:`calibration_scores`, with its source."""
    from radnet.data import schema  # noqa: PLC0415

    out = calibrate_thresholds(*calibration_scores(p, config, dataset, splits), config)
    out["source"] = {"dataset": dataset if "://" in dataset else os.path.abspath(dataset),
                     "splits": list(splits),
                     "build": schema.read_attributes(dataset).get("build", {}).get("config", {})}
    return out


def _calibration_key(p, config) -> dict:
    return {"checkpoint": os.path.abspath(p.source), "step": int(p.step),
            "target_flag_rate": float(config.qc_target_flag_rate),
            "min_disbelief": float(config.qc_min_disbelief),
            "spacing_rel": float(config.qc_spacing_rel),
            "spacing_abs_mm": float(config.qc_spacing_abs_mm),
            "by_modality": bool(config.get("qc_by_modality", False))}


def qc_thresholds(p, config, workdir: str) -> tuple[dict[str, float], dict]:
    """The thresholds of this run's QC and where they came from (written to
    OUT/qc_calibration.json): a calibration file given, one made earlier in ``workdir``
    for the same model and settings, a new calibration on trusted labels, or the fixed
    rule when there is nothing to calibrate on."""
    import jax  # noqa: PLC0415

    from radnet.train import loop  # noqa: PLC0415

    key = _calibration_key(p, config)
    path = os.path.join(workdir, QC_CALIBRATION_JSON)
    given = str(config.qc_calibration or "")
    if given:  # its existence is checked by _check_config, before any work
        with open(given) as f:
            info = json.load(f)
        if {k: info.get("key", {}).get(k) for k in ("checkpoint", "step")} != \
                {k: key[k] for k in ("checkpoint", "step")}:
            raise loop.ConfigError(f"--config.qc_calibration {given} was made for another "
                                   "checkpoint or step; its thresholds belong to that model")
        if os.path.abspath(given) != os.path.abspath(path) and jax.process_index() == 0:
            with open(path, "w") as f:
                json.dump(info, f, indent=1, sort_keys=True)
        return dict(info["thresholds"]), info
    dataset, splits, asked = _calibration_source(p, config)
    if os.path.isfile(path):
        with open(path) as f:
            info = json.load(f)
        if info.get("key") == key and info.get("source", {}).get("splits") == splits and \
                info.get("source", {}).get("dataset") in (dataset, os.path.abspath(dataset or ".")):
            return dict(info["thresholds"]), info
    reason = ""
    if not dataset:
        reason = ("the run names no dataset" if config.qc_calibration_dataset == "auto"
                  else "turned off (qc_calibration_dataset is empty)")
    elif "://" not in dataset and not os.path.isdir(dataset):
        if asked:
            raise FileNotFoundError(f"--config.qc_calibration_dataset {dataset!r} does not "
                                    "exist (a dataset of data_prep.build_volumes)")
        reason = f"the run's dataset {dataset} is not here"
    else:
        from radnet.data import schema  # noqa: PLC0415
        from radnet.data import source as source_lib  # noqa: PLC0415

        shape = tuple(int(s) for s in schema.read_attributes(dataset)["volume_shape"])
        want = tuple(int(s) for s in p.volume_options.volume_shape)
        bad = [s for s in splits if s not in labels.SPLITS]
        if shape != want or bad:
            why = (f"splits {bad} are not among {labels.SPLITS}" if bad else
                   f"{dataset} holds volumes of {shape}, the model takes {want}")
            if asked or bad:
                raise loop.ConfigError(f"--config.qc_calibration_*: {why}")
            reason = why
        elif not sum(len(source_lib.split_rows(dataset, s)[0]) for s in splits):
            if asked:
                raise loop.ConfigError(f"--config.qc_calibration_split={','.join(splits)} of "
                                       f"{dataset} has no series to calibrate on")
            reason = f"split {','.join(splits)} of {dataset} is empty"
    if reason:
        logging.warning("qc: %s; the fixed rule p(header label) < %g is used (docs/predict.md)",
                        reason, 1.0 - float(config.qc_threshold))
        info = {"key": key, "calibrated": False, "reason": reason,
                "thresholds": fixed_thresholds(config)}
    else:
        t0 = time.perf_counter()
        info = calibrate(p, config, dataset, splits)
        info.update(key=key, calibrated=True, seconds=round(time.perf_counter() - t0, 3))
        logging.info("qc: calibrated on %d series of %s (%s): %d flagged (%.1f %%), "
                     "thresholds %s", info["series"], dataset, ",".join(splits),
                     info["flagged"], 100 * info["flag_rate"],
                     {h: round(t, 4) for h, t in info["thresholds"].items()})
        if info.get("warning"):
            logging.warning("qc: %s", info["warning"])
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)
            f.write("\n")
    return dict(info["thresholds"]), info


def prediction_row(s: Series, status: str, result: dict | None, config,
                   thresholds: dict[str, float] | None = None) -> dict:
    row = s.row
    reasons = [r for r in (row.get("reasons") or "").split(";") if r]
    out = {"series_key": row["series_key"], "patient_key": row.get("patient_key", ""),
           "study_key": row.get("study_key", ""), "modality": row.get("modality", ""),
           "n_slices": row.get("n_slices", ""), "status": status,
           "index_status": row.get("status", ""), "index_reasons": ";".join(reasons)}
    for head in (*CLASS_HEADS, "coverage"):
        out[f"header_{head}"] = row.get(head, "")
    out["header_effective_spacing_mm"] = row.get("effective_spacing_mm", "")
    if result is None:
        return out
    for head, names in labels.CLASS_HEADS.items():
        probs = np.asarray(result[head])
        j = int(np.argmax(probs))
        out[head], out[f"{head}_probability"] = names[j], _fmt(probs[j], 6)
    cov = np.asarray(result["coverage"])
    out["coverage"] = ";".join(n for n, p in zip(labels.COVERAGE, cov)
                               if p >= float(config.coverage_threshold))
    for name, p in zip(labels.COVERAGE, cov):
        out[f"coverage_{name}"] = _fmt(p, 6)
    out["slice_spacing_mm"] = _fmt(result["slice_spacing"], 3)
    out["qc"] = ";".join(qc_flags(result, row, thresholds or fixed_thresholds(config), config))
    return out


def suggested_overrides(series: list[Series], results: dict[str, dict], config) -> list[dict]:
    """Confident predictions for the labels a series' headers did not give, in the
    index's overrides.csv format (series_key, column, value; ``probability`` to review by).

    A series the index excluded only for ``missing_description`` also gets a ``reasons``
    row with an empty value (= include it) once every class head and the coverage are
    known or suggested."""
    thr = float(config.suggest_threshold)
    out = []
    for s in series:
        result = results.get(s.row["series_key"])
        if result is None or result.get("status") != PREDICTED:
            continue
        key, rows = s.row["series_key"], []
        known = 0
        for head, names in labels.CLASS_HEADS.items():
            if s.row.get(head):
                known += 1
                continue
            probs = np.asarray(result[head])
            j = int(np.argmax(probs))
            if probs[j] >= thr:
                rows.append({"series_key": key, "column": head, "value": names[j],
                             "probability": _fmt(probs[j])})
                known += 1
        if s.row.get("coverage"):
            known += 1
        else:
            cov = np.asarray(result["coverage"], np.float64)
            sure = np.maximum(cov, 1.0 - cov)
            present = [n for n, p in zip(labels.COVERAGE, cov) if p >= 0.5]
            if present and (sure >= thr).all():
                rows.append({"series_key": key, "column": "coverage",
                             "value": ";".join(present), "probability": _fmt(sure.min())})
                known += 1
        if rows and s.row.get("reasons") == "missing_description" \
                and known == len(labels.CLASS_HEADS) + 1:
            rows.append({"series_key": key, "column": "reasons", "value": "",
                         "probability": ""})
        out.extend(rows)
    return out


def nearest_neighbours(keys: Sequence[str], embeddings: np.ndarray, k: int,
                       block: int = 1024) -> list[dict]:
    """Each row's ``k`` nearest other rows by cosine similarity of the embeddings,
    computed block by block (memory O(block × N))."""
    if k <= 0 or len(keys) < 2:
        return []
    x = np.asarray(embeddings, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = min(k, len(keys) - 1)
    out = []
    for start in range(0, len(keys), block):
        sim = x[start:start + block] @ x.T
        for i in range(sim.shape[0]):
            sim[i, start + i] = -np.inf  # not its own neighbour
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        for i in range(sim.shape[0]):
            # Ties broken by key, so the file does not depend on the block size.
            order = sorted(top[i], key=lambda j: (-sim[i, j], keys[j]))
            for rank, j in enumerate(order, start=1):
                out.append({"series_key": keys[start + i], "rank": rank,
                            "neighbour_key": keys[j], "cosine": f"{sim[i, j]:.6f}"})
    return out


def _short(path: str) -> str:
    """The last two parts of a path (a dataset's name, without the user's tree)."""
    return "/".join(path.rstrip("/").split("/")[-2:])


def _rule_lines(thresholds: dict[str, float], info: dict, config) -> list[str]:
    """qc.md's words for the rule in force and where its thresholds came from."""
    if info.get("calibrated"):
        src = info["source"]
        head = (f"Thresholds calibrated on {info['series']} series with trusted labels "
                f"(split {','.join(src['splits'])} of the dataset `{_short(src['dataset'])}`): "
                f"{info['flagged']} of them ({100 * info['flag_rate']:.1f} %) are flagged, for a "
                f"target of at most {100 * float(info['key']['target_flag_rate']):g} %."
                + (f" Note: {info['warning']}." if info.get("warning") else ""))
    elif info.get("reason"):
        head = f"Fixed thresholds (not calibrated: {info['reason']})."
    else:
        head = "Thresholds from the calibration file given."
    strata = any("@" in k for k in thresholds)
    lines = [head, "", "| head | flagged when disbelief > threshold: | threshold |",
             "|---|---|---|"]

    def shown(h: str) -> str:
        if not strata:
            return f"{float(thresholds[h]):.4g}"
        return " · ".join([f"{g} {float(thresholds[f'{h}@{g}']):.4g}" for g in QC_GROUPS
                           if f"{h}@{g}" in thresholds] +
                          [f"no sequence {float(thresholds[h]):.4g}"])

    for h in QC_HEADS:
        if h in labels.CLASS_HEADS:
            lines.append(f"| {h} | 1 − p(header's class) | {shown(h)} |")
        elif h == "coverage":
            lines.append(f"| {h} | 1 − p(header's answer), worst region | {shown(h)} |")
        else:
            lines.append(f"| {h} | relative difference (and > "
                         f"{float(config.qc_spacing_abs_mm):g} mm) | {shown(h)} |")
    if strata:
        lines += ["", "Thresholds per modality (the header's sequence label: CT or an MR "
                  "sequence): a head's reliability differs between them (docs/predict.md)."]
    return lines


def qc_report(series: list[Series], results: dict[str, dict], config,
              thresholds: dict[str, float] | None = None, info: dict | None = None) -> str:
    """qc.md: the rule and its thresholds, per head the agreement of header and image,
    and the most confident disagreements (series keys only)."""
    thresholds = thresholds or fixed_thresholds(config)
    lines = ["# Header against image", "",
             "A head is flagged when the header gives a label and the image disbelieves it: "
             "its disbelief score (1 − the model's probability of the header's label; "
             "coverage: the worst region; slice spacing: the relative difference) is above "
             "the head's threshold. Agreement: the model's answer (argmax; coverage at 0.5; "
             "spacing within the tolerance) equals the header's.", "",
             *_rule_lines(thresholds, info or {}, config), "",
             "| head | compared | agree | agreement | flagged |",
             "|---|---:|---:|---:|---:|"]
    flagged: dict[str, list] = {h: [] for h in QC_HEADS}
    counts = {h: [0, 0] for h in QC_HEADS}
    for s in series:
        r = results.get(s.row["series_key"])
        if r is None or r.get("status") != PREDICTED:
            continue
        row = s.row
        for head, names in labels.CLASS_HEADS.items():
            if row.get(head):
                counts[head][0] += 1
                counts[head][1] += names[int(np.argmax(r[head]))] == row[head]
        if row.get("coverage"):
            counts["coverage"][0] += 1
            hot = np.asarray(labels.coverage_to_multihot(row["coverage"]))
            counts["coverage"][1] += bool(((np.asarray(r["coverage"]) >= 0.5) == (hot == 1)).all())
        header_mm = _float(row.get("effective_spacing_mm"))
        flags = qc_flags(r, row, thresholds, config)
        if header_mm is not None:
            counts["slice_spacing"][0] += 1
            counts["slice_spacing"][1] += "slice_spacing" not in flags
        for head, confidence in flags.items():
            flagged[head].append((confidence, row["series_key"], row, r))
    for head in QC_HEADS:
        n, agree = counts[head]
        pct = f"{100.0 * agree / n:.1f} %" if n else "—"
        lines.append(f"| {head} | {n} | {agree} | {pct} | {len(flagged[head])} |")
    top = int(config.qc_top)
    for head in QC_HEADS:
        items = sorted(flagged[head], key=lambda t: (-t[0], t[1]))[:top]
        if not items:
            continue
        lines += ["", f"## {head}: most confident disagreements", ""]
        if head in labels.CLASS_HEADS:
            lines += ["| series_key | header | model | its probability | p(header) |",
                      "|---|---|---|---:|---:|"]
            for conf, key, row, r in items:
                j = int(np.argmax(r[head]))
                lines.append(f"| `{key}` | {row[head]} | {labels.CLASS_HEADS[head][j]} | "
                             f"{float(r[head][j]):.4f} | {1 - conf:.2g} |")
        elif head == "coverage":
            lines += ["| series_key | header | model (p ≥ 0.5) | disbelief |", "|---|---|---|---:|"]
            for conf, key, row, r in items:
                model = ";".join(n for n, p in zip(labels.COVERAGE, r["coverage"]) if p >= 0.5)
                lines.append(f"| `{key}` | {row['coverage']} | {model or '(none)'} | {conf:.4f} |")
        else:
            lines += ["| series_key | header (mm) | model (mm) | relative difference |",
                      "|---|---:|---:|---:|"]
            for conf, key, row, r in items:
                lines.append(f"| `{key}` | {row['effective_spacing_mm']} | "
                             f"{float(r['slice_spacing']):.2f} | {conf:.2f} |")
    lines.append("")
    return "\n".join(lines)


def _write_csv(path: str, cols, rows) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(cols), extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the task


def _check_config(config) -> None:
    from radnet.train import loop  # noqa: PLC0415

    if not config.checkpoint:
        raise loop.ConfigError("--config.checkpoint is required: a pretraining workdir or an "
                               "exported .safetensors file")
    if not config.dicom_root:
        raise loop.ConfigError("--config.dicom_root is required: the DICOM archive to look at")
    if not os.path.isdir(config.dicom_root):
        raise FileNotFoundError(f"--config.dicom_root {config.dicom_root!r} is not a "
                                "directory (is the archive mounted?)")
    given = str(config.qc_calibration or "")
    if given and not os.path.isfile(given):
        raise FileNotFoundError(f"--config.qc_calibration {given!r} does not exist (a "
                                f"{QC_CALIBRATION_JSON} of an earlier predict run)")
    for name in ("qc_threshold", "suggest_threshold", "coverage_threshold"):
        if not 0.0 < float(config[name]) <= 1.0:
            raise loop.ConfigError(f"--config.{name}={config[name]} must be in (0, 1]")
    for name in ("qc_target_flag_rate", "qc_min_disbelief"):
        if not 0.0 <= float(config[name]) < 1.0:
            raise loop.ConfigError(f"--config.{name}={config[name]} must be in [0, 1)")
    if int(config.batch_size) < 1 or int(config.chunk_series) < 1 or int(config.workers) < 0:
        raise loop.ConfigError("--config.batch_size and --config.chunk_series must be ≥ 1, "
                               "--config.workers ≥ 0")
    unknown = [r for r in _also_predict(config) if r not in labels.EXCLUSION_REASONS]
    if unknown:
        raise loop.ConfigError(f"--config.also_predict names {unknown}, not exclusion reasons; "
                               f"choose from {labels.EXCLUSION_REASONS}")


def _also_predict(config) -> list[str]:
    return [r.strip() for r in str(config.also_predict).split(",") if r.strip()]


def run(config, workdir: str) -> int:
    """Task ``predict``: every series of ``config.dicom_root`` → OUT (``workdir``)."""
    import jax  # noqa: PLC0415

    from radnet import pretrained  # noqa: PLC0415
    from radnet.train import loop  # noqa: PLC0415

    _check_config(config)
    total_start = time.perf_counter()
    p = pretrained.load(config.checkpoint, None if int(config.step) < 0 else int(config.step))
    seconds: dict[str, float] = {"load_model": time.perf_counter() - total_start}
    if p.config.model_name != "radnet":
        raise loop.ConfigError(f"{config.checkpoint} holds a {p.config.model_name!r} model; "
                               "the predict task needs the 3D-RADNet heads")
    options = p.volume_options
    secret = salt_lib.load_salt(config.salt_file)
    os.makedirs(workdir, exist_ok=True)
    work = os.path.join(workdir, WORK_DIR)
    os.makedirs(work, exist_ok=True)
    fingerprint = _fingerprint(p, options, secret)
    meta_path = os.path.join(work, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f) != fingerprint:
                raise loop.ConfigError(
                    f"{workdir} holds predictions of another checkpoint, step, preprocessing "
                    "or salt; choose another --workdir (or delete its _work folder)")
    else:
        with open(meta_path, "w") as f:
            json.dump(fingerprint, f, indent=1, sort_keys=True)
    collections_table = series_lib.load_collections(config.collections or None)
    pool = _Pool(config.workers)
    try:
        t0 = time.perf_counter()
        rels, skipped = walk(config.dicom_root, skip=[workdir])
        records = read_headers(os.path.abspath(config.dicom_root), rels, secret, pool,
                               int(config.header_chunk))
        seconds["headers"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        series = group(records, secret, config.index, collections_table)
        model_spacing([s.row for s in series], int(options.volume_shape[0]))
        seconds["grouping"] = time.perf_counter() - t0
        logging.info("%d files, %d series", len(rels), len(series))
        also = _also_predict(config)
        todo = [s for s in series if predictable(s.row, also)]
        done = _load_parts(work)
        remaining = [s for s in todo if s.row["series_key"] not in done]
        logging.info("%d series to predict: %d done before, %d left", len(todo),
                     len(todo) - len(remaining), len(remaining))
        timing = _predict_all(p, remaining, options, pool, config, work, done)
        seconds.update(timing)
        made_this_run = len(remaining)
    finally:
        pool.close()
    t0 = time.perf_counter()   # every process: calibrating runs the model on all devices
    thresholds, qc_info = qc_thresholds(p, config, workdir)
    seconds["qc_calibration"] = time.perf_counter() - t0
    if jax.process_index() != 0:
        return 0
    results = {k: dict(v, status=str(v["status"])) for k, v in _load_parts(work).items()}
    rows, embeddings = [], []
    dim = int(np.prod(output_fields(p)["embedding"][0]))
    for s in series:
        key = s.row["series_key"]
        r = results.get(key)
        if r is not None:
            status = r["status"]
        elif predictable(s.row, also):
            raise RuntimeError(f"series {key} has no result; run the same command again")
        else:  # the first reason that stopped the prediction
            reasons = [x for x in (s.row.get("reasons") or "").split(";")
                       if x and x not in also]
            status = reasons[0] if reasons else "excluded"
        ok = r is not None and status == PREDICTED
        rows.append(prediction_row(s, status, r if ok else None, config, thresholds))
        embeddings.append(np.asarray(r["embedding"], np.float32) if ok
                          else np.full((dim,), np.nan, np.float32))
    _write_csv(os.path.join(workdir, PREDICTIONS_CSV), columns(), rows)
    emb = np.stack(embeddings) if embeddings else np.zeros((0, dim), np.float32)
    np.save(os.path.join(workdir, EMBEDDINGS), emb)
    with open(os.path.join(workdir, QC_MD), "w", encoding="utf-8") as f:
        f.write(qc_report(series, results, config, thresholds, qc_info))
    _write_csv(os.path.join(workdir, OVERRIDES_CSV), OVERRIDE_COLUMNS,
               suggested_overrides(series, results, config))
    if int(config.neighbours) > 0:
        keep = [i for i, r in enumerate(rows) if r["status"] == PREDICTED]
        _write_csv(os.path.join(workdir, NEIGHBOURS_CSV),
                   ("series_key", "rank", "neighbour_key", "cosine"),
                   nearest_neighbours([rows[i]["series_key"] for i in keep], emb[keep],
                                      int(config.neighbours)))
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    seconds["total"] = time.perf_counter() - total_start
    summary = {"files": len(rels), "non_regular_skipped": skipped, "series": len(rows),
               "series_run_this_time": made_this_run,
               "status": dict(sorted(statuses.items())),
               "qc_flagged": sum(bool(r.get("qc")) for r in rows),
               "qc_calibrated": bool(qc_info.get("calibrated")),
               "qc_thresholds": {h: round(float(t), 6) for h, t in thresholds.items()},
               "checkpoint": {"step": int(p.step), "model_name": p.config.model_name},
               "seconds": {k: round(v, 3) for k, v in seconds.items()}}
    with open(os.path.join(workdir, SUMMARY_JSON), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"predict: {len(rows)} series, {statuses.get(PREDICTED, 0)} predicted, "
          f"{summary['qc_flagged']} flagged by qc → {workdir}")
    return 0


def _predict_all(p, remaining: list[Series], options, pool: _Pool, config, work: str,
                 done: dict) -> dict[str, float]:
    """Volumes built on the pool (the next chunk while the model runs on this one), the
    model on all devices, one part file per chunk. Returns the time split."""
    import jax  # noqa: PLC0415

    timing = {"pixels_worker_sum": 0.0, "waiting_for_pixels": 0.0, "inference": 0.0}
    if not remaining:
        return timing
    inference = Inference(p, int(config.batch_size))
    root = os.path.abspath(config.dicom_root)
    size = int(config.chunk_series)
    chunks = [remaining[i:i + size] for i in range(0, len(remaining), size)]
    # After the highest part on disk (parts lost from the middle are not overwritten).
    first_part = 1 + max((int(n[5:11]) for n in os.listdir(work)
                          if n.startswith("part-") and n.endswith(".npz")), default=-1)

    def submit(chunk):
        mine = inference.my_positions(len(chunk))
        return {i: pool.submit(build_series_volume,
                               [os.path.join(root, *f.split("/")) for f in chunk[i].files],
                               options, chunk[i].orientation) for i in mine}

    from tqdm import tqdm  # noqa: PLC0415

    bar = tqdm(total=len(remaining), unit="series", desc="predict",
               disable=not config.progress or jax.process_index() != 0)
    pending = submit(chunks[0])
    for c, chunk in enumerate(chunks):
        futures = pending
        reasons: dict[int, str] = {}

        def read(i, futures=futures, reasons=reasons):
            if i not in futures:  # padded_batches' template row of a process without rows
                return None
            t = time.perf_counter()
            volume, reason, _message, worker_s = futures[i].result()
            timing["waiting_for_pixels"] += time.perf_counter() - t
            timing["pixels_worker_sum"] += worker_s
            if volume is None:
                reasons[i] = reason
            return volume

        # The next chunk's volumes are made while the model runs on this one.
        pending = submit(chunks[c + 1]) if c + 1 < len(chunks) else None
        t = time.perf_counter()
        wait_before = timing["waiting_for_pixels"]
        outputs = inference.run(len(chunk), read)
        timing["inference"] += (time.perf_counter() - t) - (timing["waiting_for_pixels"]
                                                              - wait_before)
        reasons_all = _gather_reasons(reasons, len(chunk))
        results = []
        for i, s in enumerate(chunk):
            if i in outputs:
                r = {k: np.asarray(v) for k, v in outputs[i].items()}
                r["status"] = np.asarray(PREDICTED)
            else:
                r = {k: np.full(shape, np.nan, np.float32)
                     for k, (shape, _) in inference.fields.items()}
                r["status"] = np.asarray(reasons_all.get(i, "decode_failed"))
            results.append((s.row["series_key"], r))
        if jax.process_index() == 0:
            _write_part(work, first_part + c, results)
        done.update({k: r for k, r in results})
        bar.update(len(chunk))
        logging.info("chunk %d/%d: %d series (%d predicted)", c + 1, len(chunks), len(chunk),
                     len(outputs))
    bar.close()
    return timing


def _gather_reasons(reasons: dict[int, str], n: int) -> dict[int, str]:
    """Every process's failure reasons of a chunk, on every process."""
    import jax  # noqa: PLC0415

    if jax.process_count() == 1:
        return dict(reasons)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    codes = np.full((n,), -1, np.int32)
    for i, reason in reasons.items():
        codes[i] = labels.EXCLUSION_REASONS.index(reason) if reason in labels.EXCLUSION_REASONS \
            else labels.EXCLUSION_REASONS.index("decode_failed")
    every = np.asarray(multihost_utils.process_allgather(codes)).reshape(-1, n).max(axis=0)
    return {i: labels.EXCLUSION_REASONS[c] for i, c in enumerate(every) if c >= 0}
