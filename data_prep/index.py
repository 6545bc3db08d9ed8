"""Index a DICOM archive: read every header once, group slices into series, mine labels.

    python -m data_prep.index --dicom_root=DIR --out=OUT [--workers=N] \\
        [--collections=collections.csv] [--overrides=overrides.csv] \\
        [--config=configs/index.py] [--salt_file=~/.config/radnet/salt]

Writes OUT/files.csv, OUT/series.csv, OUT/review.csv and OUT/summary.json
(formats: docs/interfaces.md; rules: data_prep/rules.py; how to run it on a
PACS export: docs/index.md).

Headers are read in ``--workers`` processes (pixel data never), each record is
appended to OUT/cache/headers.jsonl as it arrives, and a re-run reads again only
files whose (path, size, mtime) changed, so a killed run continues where it
stopped and a re-run on an unchanged tree parses nothing. The cache holds keyed
hashes, never raw identifiers, and is discarded when the salt or the reader changes.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import logging as std_logging
import math
import multiprocessing
import os
import secrets
import statistics
import sys
import time
from typing import Any, Iterable, Iterator

from absl import app, flags, logging
from ml_collections import config_flags
import tqdm

from radnet import labels, rules
from radnet.dicom import geometry
from radnet.dicom import headers as dicom_headers

FILES_COLUMNS = ("path", "series_key", "status", "reason")
SERIES_COLUMNS = ("series_key", "patient_key", "study_key", "modality", "n_files", "n_slices",
                  "sequence", "view", "contrast", "coverage", "slice_spacing_mm",
                  "effective_spacing_mm", "status", "reasons", "split", "provenance",
                  "rows", "columns", "pixel_spacing_mm", "orientation", "extent_mm")
REVIEW_COLUMNS = ("series_key", "column", "issue", "series_description", "study_description",
                  "current_value", "provenance")
OVERRIDABLE = ("sequence", "view", "contrast", "coverage", "status", "reasons", "split")
DEFAULT_SALT_FILE = "~/.config/radnet/salt"


# ----------------------------------------------------------------------------
# Salt and keys
# ----------------------------------------------------------------------------


def load_salt(path: str) -> bytes:
    """The site secret for keyed hashes; created (random, mode 600) when missing."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        logging.info("created a new salt file %s (keep it: keys depend on it)", path)
    with open(path, "rb") as f:
        secret = f.read().strip()
    if len(secret) < 16:
        raise ValueError(f"salt file {path} holds {len(secret)} bytes; need at least 16")
    return secret


def salt_fingerprint(secret: bytes) -> str:
    """Identifies the salt in the cache header without revealing it."""
    return dicom_headers.keyed_hash(secret, "fingerprint", "radnet-index", digest_size=8)


# ----------------------------------------------------------------------------
# Walking and reading (parallel, cached)
# ----------------------------------------------------------------------------


def walk(dicom_root: str, skip: Iterable[str] = ()) -> list[str]:
    """Every file under ``dicom_root`` as a sorted '/'-separated relative path."""
    root = os.path.abspath(dicom_root)
    skip_abs = {os.path.abspath(s) for s in skip}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if os.path.join(dirpath, d) not in skip_abs)
        for name in filenames:
            full = os.path.join(dirpath, name)
            found.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return sorted(found)


_WORKER_SECRET: bytes = b""
_MAX_CHUNK = 256
_WORKER_ROOT: str = ""


def _init_worker(secret: bytes, root: str) -> None:
    global _WORKER_SECRET, _WORKER_ROOT
    # Invalid values are handled per value (and make a file unreadable only
    # when they matter); pydicom's per-value warnings would flood the log.
    std_logging.getLogger("pydicom").setLevel(std_logging.ERROR)
    _WORKER_SECRET, _WORKER_ROOT = secret, root


def _cache_line(rel: str, size: int, mtime: int, record: dict) -> str:
    return json.dumps({"p": rel, "s": size, "m": mtime, "r": record}, separators=(",", ":")) + "\n"


def _read_chunk(tasks: list[tuple[str, int, int]]) -> list[tuple[str, int, int, dict, str]]:
    """Records of a few files, each with its cache line already encoded.

    A whole chunk is one task and one result: the pool's per-item hand-over
    (locks, a thread wake-up) and the JSON encoding then cost the writing
    parent nothing per file, which leaves it free for the workers' results.
    """
    out = []
    for rel, size, mtime in tasks:
        record = dicom_headers.read_header(os.path.join(_WORKER_ROOT, rel), _WORKER_SECRET)
        out.append((rel, size, mtime, record, _cache_line(rel, size, mtime, record)))
    return out


class HeaderCache:
    """Append-only JSON lines keyed by (path, size, mtime_ns), safe to kill at any time."""

    def __init__(self, path: str, fingerprint: str):
        self.path = path
        self.header = {"reader": dicom_headers.READER_VERSION, "salt": fingerprint}
        self.entries: dict[str, tuple[int, int, dict]] = {}
        self._fh = None
        self.n_added = 0
        if os.path.exists(path):
            self._load()

    def _load(self) -> None:
        with open(self.path, "r", encoding="utf-8") as f:
            first = f.readline()
            try:
                header = json.loads(first)
            except json.JSONDecodeError:
                header = None
            if header != self.header:
                logging.info("header cache %s was made by another reader or salt; "
                             "starting afresh", self.path)
                return
            for line in f:
                try:
                    e = json.loads(line)
                    self.entries[e["p"]] = (e["s"], e["m"], e["r"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # the line a kill cut short: that file is read again
        self._valid = True

    def lookup(self, rel: str, size: int, mtime: int) -> dict | None:
        e = self.entries.get(rel)
        if e is not None and e[0] == size and e[1] == mtime:
            return e[2]
        return None

    def open_for_append(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if getattr(self, "_valid", False):
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                cut = f.tell() > 0 and (f.seek(-1, os.SEEK_END) or f.read(1) != b"\n")
            self._fh = open(self.path, "a", encoding="utf-8")
            if cut:  # a kill left half a line: end it so the next record stands alone
                self._fh.write("\n")
        else:
            self._fh = open(self.path, "w", encoding="utf-8")
            self._fh.write(json.dumps(self.header) + "\n")
            self._valid = True

    def add(self, rel: str, size: int, mtime: int, record: dict, line: str | None = None) -> None:
        """Remember a record and append its line (``_cache_line``, made here if not given)."""
        self.entries[rel] = (size, mtime, record)
        self.n_added += 1
        self._fh.write(line if line is not None else _cache_line(rel, size, mtime, record))

    def flush(self) -> None:
        if self._fh:
            self._fh.flush()

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None


def read_all(dicom_root: str, paths: list[str], secret: bytes, cache: HeaderCache,
             workers: int, chunksize: int = 16, flush_s: float = 2.0,
             progress: bool = True) -> dict[str, dict]:
    """Header record of every path (from the cache where unchanged).

    ``chunksize`` is the smallest number of files per worker task; larger trees
    use larger tasks (see below). Records reach the cache as each task ends.
    """
    root = os.path.abspath(dicom_root)
    records: dict[str, dict] = {}
    todo: list[tuple[str, int, int]] = []
    for rel in paths:
        try:
            st = os.stat(os.path.join(root, rel))
        except OSError as e:
            records[rel] = {"status": "unreadable", "detail": f"stat failed: {e.strerror}"}
            continue
        hit = cache.lookup(rel, st.st_size, st.st_mtime_ns)
        if hit is not None:
            records[rel] = hit
        else:
            todo.append((rel, st.st_size, st.st_mtime_ns))
    logging.info("%d files: %d from the cache, %d to read with %d worker(s)",
                 len(paths), len(paths) - len(todo), len(todo), workers)
    if not todo:
        return records
    cache.open_for_append()
    bar = tqdm.tqdm(total=len(todo), unit="file", desc="headers", disable=not progress,
                    file=sys.stderr)
    last_flush = time.monotonic()
    try:
        # Every task costs the parent a hand-over (a pipe message, thread wake-ups:
        # ~1-3 ms of its CPU on a busy VM), so a big tree gets bigger tasks, up
        # to 256 files, while each worker still gets ~32 tasks (an even finish).
        step = max(1, chunksize, min(_MAX_CHUNK, len(todo) // (32 * max(1, workers))))
        chunks = [todo[i:i + step] for i in range(0, len(todo), step)]
        if workers <= 1:
            _init_worker(secret, root)
            results: Iterator = map(_read_chunk, chunks)
            pool = None
        else:
            # Not plain fork: the caller may hold threads (JAX, TensorStore), and a forked
            # child can inherit a held lock. The fork server is a clean single-threaded parent.
            method = "forkserver" if sys.platform == "linux" else "spawn"
            ctx = multiprocessing.get_context(method)
            if method == "forkserver":
                # Import this module (pydicom, numpy, absl: ~0.5 s) once in the fork
                # server, so that each worker starts with it loaded instead of
                # importing it itself (the default '__main__' preload never takes
                # effect on Python <= 3.12). Only acts if the server is not running
                # yet; it imports no threads.
                ctx.set_forkserver_preload(["__main__", __name__ if __name__ != "__main__"
                                            else "data_prep.index"])
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(secret, root))
            results = pool.imap_unordered(_read_chunk, chunks)
        for chunk in results:
            for rel, size, mtime, record, line in chunk:
                records[rel] = record
                cache.add(rel, size, mtime, record, line)
            bar.update(len(chunk))
            now = time.monotonic()
            if now - last_flush > flush_s:
                cache.flush()
                last_flush = now
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        cache.close()
        bar.close()
    return records


# ----------------------------------------------------------------------------
# Grouping slices into series
# ----------------------------------------------------------------------------


class Slice:
    """One frame of one file, with the geometry the index groups and stacks by."""

    __slots__ = ("path", "frame", "position_mm", "orientation", "pixel_spacing_mm",
                 "temporal_index", "acquisition", "sop_key", "readable")

    def __init__(self, path, frame, geometry_record, acquisition, sop_key, readable):
        def values(key, count):
            v = geometry_record.get(key)
            return v if v and len(v) == count else None

        self.path, self.frame = path, frame
        self.position_mm = values("position_mm", 3)
        self.orientation = values("orientation", 6)
        self.pixel_spacing_mm = values("pixel_spacing_mm", 2)  # between rows, between columns
        self.temporal_index = geometry_record.get("temporal_index")
        self.acquisition, self.sop_key, self.readable = acquisition, sop_key, readable


def _positions_along_normal(slices: list[Slice], orientation) -> list[float] | None:
    """Every slice's position along the normal of ``orientation``; None if any is unknown."""
    if any(s.position_mm is None for s in slices):
        return None
    try:
        return geometry.positions_along_normal([s.position_mm for s in slices], orientation)
    except ValueError:
        return None


def _split_acquisitions(slices: list[Slice], orientation, cfg) -> list[list[Slice]]:
    """Split a group by AcquisitionNumber only when its acquisitions are separate scans.

    Acquisitions sharing positions are a time series (kept together, excluded
    later); disjoint acquisitions forming one even stack are one volume
    (step-and-shoot CT, concatenations); disjoint acquisitions that do not fit
    together are separate scans and are split.
    """
    by_acq: dict[str, list[Slice]] = collections.defaultdict(list)
    for s in slices:
        by_acq[s.acquisition].append(s)
    if len(by_acq) < 2:
        return [slices]
    proj = _positions_along_normal(slices, orientation)
    if proj is None:
        return [slices]
    pos = {id(s): round(p / max(cfg.same_position_mm, 1e-6)) for s, p in zip(slices, proj)}
    sets = [{pos[id(s)] for s in group} for group in by_acq.values()]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            if sets[i] & sets[j]:
                return [slices]
    def consistent(group):
        pairs = [(s, p) for s, p in zip(slices, proj) if s.readable and s in group]
        st = rules.stack_rule([p for _, p in pairs], [s.sop_key for s, _ in pairs],
                              [s.temporal_index for s, _ in pairs],
                              [s.acquisition for s, _ in pairs], None, cfg)
        return "inconsistent_geometry" not in st.reasons, st.n_slices

    if consistent(set(slices))[0]:
        return [slices]
    # Only acquisitions that are each a stack of their own (>= 3 even positions)
    # are separate scans; otherwise the holes are missing slices of one scan.
    parts = [by_acq[a] for a in sorted(by_acq)]
    if all(ok and n >= 3 for ok, n in (consistent(set(g)) for g in parts)):
        return parts
    return [slices]


def _mode(values: Iterable, default=""):
    counts = collections.Counter(v for v in values if v not in (None, "", [], ()))
    return counts.most_common(1)[0][0] if counts else default


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _first(values):
    return values[0] if values else None


def _facts(records: list[dict]) -> dict:
    """Series-level header facts from the records of its files."""
    def text(key):
        return _mode(r.get(key, "") for r in records)
    te_values = sorted({round(v, 3) for r in records for v in (r.get("te") or [])})
    return {
        "modality": text("modality"),
        "series_description": text("series_description"),
        "study_description": text("study_description"),
        "protocol_name": text("protocol_name"),
        "body_part": text("body_part"),
        "image_type": sorted({v for r in records for v in r.get("image_type", [])}),
        "frame_type": sorted({v for r in records for v in r.get("frame_type", [])}),
        "ss": list(_mode(tuple(r.get("ss") or ()) for r in records) or ()),
        "tr": _median(_first(r.get("tr")) for r in records),
        "te": te_values,
        "ti": _median(_first(r.get("ti")) for r in records),
        "bvalues": sorted({b for r in records for b in r.get("bvalues", [])}),
        "agent": text("agent"),
        "agent_seq": any(r.get("agent_seq") for r in records),
        "agent_administered": text("agent_administered"),
        "n_temporal": max((r.get("n_temporal") or 0 for r in records), default=0),
        "collection": text("collection"),
    }


def _fmt(x: float | None, digits: int = 6) -> str:
    if x is None:
        return ""
    return f"{x:.{digits}g}"


def load_collections(path: str | None) -> dict[str, list[str]]:
    """collections.csv: ``collection,regions`` (or ``body_locations``): ;-joined coverage names."""
    if not path:
        return {}
    table = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            name = (row.get("collection") or "").strip()
            cell = row.get("regions") or row.get("body_locations") or ""
            regions = [r.strip() for r in cell.split(";") if r.strip()]
            for r in regions:
                labels.to_index("coverage", r)  # a typo is an error naming the vocabulary
            if name:
                table[name.upper()] = regions
    return table


def build_series(records: dict[str, dict], secret: bytes, cfg,
                 collections_table: dict[str, list[str]]):
    """(series rows, file → (series_key, reason), review rows) from the header records."""
    file_key: dict[str, str] = {}
    by_uid: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for rel in sorted(records):
        r = records[rel]
        if r.get("uid_key"):
            by_uid[(r.get("study_key", ""), r["uid_key"])].append(rel)
    series_rows: list[dict] = []
    review_rows: list[dict] = []
    for (study_key, uid_key), rels in by_uid.items():
        # A UID is unique by the standard, but careless anonymisers reuse one
        # across studies: the study keeps such series apart.
        base = f"{study_key}|{uid_key}"
        recs = [records[p] for p in rels]
        if all(r["status"] == "not_image" for r in recs):
            key = dicom_headers.keyed_hash(secret, "series", base)
            for p in rels:
                file_key[p] = key
            series_rows.append(_bare_row(key, recs, rels, "not_image"))
            continue
        image_rels = [p for p in rels if records[p]["status"] != "not_image"]
        for p in rels:
            if records[p]["status"] == "not_image":  # an odd object inside an image series
                file_key[p] = ""
        if all(records[p].get("frames") is None for p in image_rels):
            key = dicom_headers.keyed_hash(secret, "series", base)
            for p in image_rels:
                file_key[p] = key
            series_rows.append(_bare_row(key, [records[p] for p in image_rels], image_rels,
                                         "unreadable"))
            continue
        # Slices: one per frame; orientation and size split the UID.
        slices: list[Slice] = []
        for p in image_rels:
            r = records[p]
            for i, f in enumerate(r.get("frames") or []):
                slices.append(Slice(p, i, f, r.get("acquisition", ""), r.get("sop_key", ""),
                                    r["status"] == "ok"))
        groups = []
        for og in geometry.orientation_groups(slices, lambda s: s.orientation,
                                              cfg.orientation_group_deg):
            by_size = collections.defaultdict(list)
            for s in og:
                r = records[s.path]
                by_size[(r.get("rows"), r.get("columns"))].append(s)
            for size in sorted(by_size, key=str):
                sg = by_size[size]
                orientation = sg[0].orientation
                for ag in (_split_acquisitions(sg, orientation, cfg) if orientation else [sg]):
                    groups.append((size, orientation, ag))
        for size, orientation, group in groups:
            if len(groups) == 1:
                key = dicom_headers.keyed_hash(secret, "series", base)
            else:
                acquisitions = ",".join(sorted({s.acquisition for s in group}))
                cosines = ";".join(f"{v:.2f}" for v in orientation) if orientation else "-"
                desc = f"{base}|{cosines}|{size}|{acquisitions if len(groups) > 1 else ''}"
                key = dicom_headers.keyed_hash(secret, "series", desc)
            row, review = _series_row(key, study_key, group, size, orientation, records, cfg,
                                      collections_table)
            for s in group:
                file_key[s.path] = key
            series_rows.append(row)
            review_rows.extend(review)
    return series_rows, file_key, review_rows


def _bare_row(key: str, recs: list[dict], rels: list[str], reason: str) -> dict:
    row = {c: "" for c in SERIES_COLUMNS}
    row.update(series_key=key, patient_key=_mode(r.get("patient_key") for r in recs),
               study_key=_mode(r.get("study_key") for r in recs),
               modality=_mode(r.get("modality") for r in recs), n_files=len(set(rels)),
               n_slices=0, status="excluded", reasons=reason,
               provenance=f"{reason}<-{_mode(r.get('detail') for r in recs)}")
    row["_collection"] = _mode(r.get("collection") for r in recs)
    row["_top"] = rels[0].split("/")[0] if "/" in rels[0] else ""
    return row


def _series_row(key, study_key, group: list[Slice], size, orientation, records, cfg,
                collections_table):
    paths = sorted({s.path for s in group})
    recs = [records[p] for p in paths]
    facts = _facts(recs)
    reasons: set[str] = set()
    prov: list[str] = []
    notes: list[str] = []
    readable = [s for s in group if s.readable]
    if not readable:
        reasons.add("unreadable")
    modality = facts["modality"]
    if modality not in rules.SUPPORTED_MODALITIES:
        reasons.add("unsupported_modality")

    # Geometry along the normal.
    stack = rules.Stack()
    proj = _positions_along_normal(readable, orientation) if (orientation and readable) else None
    if readable and proj is None:
        reasons.add("inconsistent_geometry")
        notes.append("missing ImagePositionPatient/ImageOrientationPatient")
    elif readable:
        stack = rules.stack_rule(proj, [s.sop_key for s in readable],
                                 [s.temporal_index for s in readable],
                                 [s.acquisition for s in readable], facts["n_temporal"], cfg)
        reasons.update(stack.reasons)
        notes.extend(stack.notes)
    spacings = [s.pixel_spacing_mm for s in readable if s.pixel_spacing_mm]
    pixel_spacing = spacings[0] if spacings else None
    if pixel_spacing and any(abs(a - b) > cfg.pixel_spacing_rel_tol * max(b, 1e-6)
                             for q in spacings for a, b in zip(q, pixel_spacing)):
        reasons.add("inconsistent_geometry")
        notes.append("PixelSpacing varies")
    n_slices = stack.n_slices if readable and proj is not None else len({(s.path, s.frame) for s in readable})
    if n_slices < cfg.min_slices:
        reasons.add("too_few_slices")
    if not facts["series_description"]:
        reasons.add("missing_description")

    seq = rules.sequence_rule(facts, cfg)
    view = rules.view_rule(orientation, cfg)
    contrast = rules.contrast_rule(facts) if modality in rules.SUPPORTED_MODALITIES else rules.Rule()
    reasons.update(seq.reasons)
    reasons.update(view.reasons)

    effective = rules.effective_spacing_mm(stack.slice_spacing_mm, n_slices, cfg.target_slices)
    if rules.spacing_too_large(effective, cfg.max_effective_spacing_mm):
        reasons.add("spacing_too_large")

    z_ext = None
    if orientation and pixel_spacing and stack.extent_mm is not None and size[0] and size[1]:
        first = readable[stack.order[0]]
        z_ext = geometry.z_extent_mm(orientation, first.position_mm, stack.extent_mm,
                                     stack.slice_spacing_mm or 0.0, size[0], size[1],
                                     pixel_spacing)
    collection = facts["collection"]
    top = paths[0].split("/")[0] if "/" in paths[0] else ""
    coll_regions = (collections_table.get(collection.upper()) if collection else None) \
        or collections_table.get(top.upper(), [])
    coverage = rules.coverage_rule(facts, z_ext, cfg, coll_regions)

    ordered = [r for r in labels.EXCLUSION_REASONS if r in reasons]
    prov = [seq.provenance, view.provenance, contrast.provenance, coverage.provenance]
    if notes:
        prov.append("geometry: " + ", ".join(notes))
    row = {
        "series_key": key,
        "patient_key": _mode(r.get("patient_key") for r in recs),
        "study_key": study_key,
        "modality": modality,
        "n_files": len(paths),
        "n_slices": n_slices,
        "sequence": seq.value,
        "view": view.value,
        "contrast": contrast.value,
        "coverage": coverage.value,
        "slice_spacing_mm": _fmt(stack.slice_spacing_mm),
        "effective_spacing_mm": _fmt(effective),
        "status": "excluded" if ordered else "included",
        "reasons": ";".join(ordered),
        "split": "",
        "provenance": " | ".join(p for p in prov if p),
        "rows": size[0] or "",
        "columns": size[1] or "",
        "pixel_spacing_mm": ";".join(_fmt(v) for v in pixel_spacing) if pixel_spacing else "",
        "orientation": ";".join(_fmt(v) for v in orientation) if orientation else "",
        "extent_mm": _fmt(stack.extent_mm),
        "_collection": collection or top,
        "_top": top,
    }
    # A person is asked only about series that the open question keeps out (or
    # would label wrongly): a localizer's unknown coverage needs no decision.
    review = []
    items = seq.review + contrast.review + coverage.review
    if set(ordered) - {"excluded_sequence"}:
        items = [i for i in items if "no rule matched" not in i]
    for item in items:
        column, _, issue = item.partition(": ")
        review.append({"series_key": key, "column": column, "issue": issue,
                       "series_description": facts["series_description"],
                       "study_description": facts["study_description"],
                       "current_value": row.get(column, ""), "provenance": row["provenance"]})
    return row, review


# ----------------------------------------------------------------------------
# Split, overrides, outputs
# ----------------------------------------------------------------------------


def assign_splits(series_rows: list[dict], cfg) -> None:
    """Patient-level split from the patient key; held-out collections go to test."""
    fr = cfg.split
    total = fr.train + fr.val + fr.test
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions sum to {total}, not 1: {dict(fr)}")
    heldout = {c.strip().upper() for c in (cfg.heldout_collections or "").split(",") if c.strip()}
    heldout_patients = {r["patient_key"] for r in series_rows
                        if heldout and (r.get("_collection", "").upper() in heldout
                                        or r.get("_top", "").upper() in heldout)}
    for r in series_rows:
        pk = r["patient_key"]
        if pk in heldout_patients:
            r["split"] = "test"
            continue
        u = int(pk[:13], 16) / 16 ** 13 if pk else 0.0
        r["split"] = "train" if u < fr.train else ("val" if u < fr.train + fr.val else "test")


def apply_overrides(series_rows: list[dict], path: str | None) -> int:
    """overrides.csv (series_key,column,value), applied last, noted in provenance."""
    if not path:
        return 0
    by_key = {r["series_key"]: r for r in series_rows}
    n = 0
    with open(path, newline="", encoding="utf-8") as f:
        for line, o in enumerate(csv.DictReader(f), start=2):
            key, column, value = (o.get("series_key") or "").strip(), \
                (o.get("column") or "").strip(), (o.get("value") or "").strip()
            where = f"{path}:{line}"
            if key not in by_key:
                raise ValueError(f"{where}: unknown series_key {key!r}")
            if column not in OVERRIDABLE:
                raise ValueError(f"{where}: column {column!r} cannot be overridden; "
                                 f"choose one of {OVERRIDABLE}")
            row = by_key[key]
            if column in ("sequence", "view", "contrast"):
                labels.to_index(column, value)
            elif column == "coverage":
                labels.coverage_to_multihot(value)
            elif column == "split":
                labels.split_index(value)
            elif column == "reasons":
                reasons = [r for r in value.split(";") if r]
                for r in reasons:
                    if r not in labels.EXCLUSION_REASONS:
                        raise ValueError(f"{where}: {r!r} is not an exclusion reason")
                value = ";".join(r for r in labels.EXCLUSION_REASONS if r in reasons)
                row["status"] = "excluded" if value else "included"
            elif column == "status":
                if value == "included":
                    row["reasons"] = ""
                elif value == "excluded":
                    if not row["reasons"]:
                        raise ValueError(f"{where}: status=excluded needs a reason; "
                                         "override the reasons column instead")
                else:
                    raise ValueError(f"{where}: status must be included or excluded")
            row[column] = value
            row["provenance"] += f" | override {column}={value}"
            n += 1
    return n


def _write_csv(path: str, columns, rows) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore",
                           lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    os.replace(tmp, path)


def summarize(files_rows, series_rows, review_rows) -> dict:
    """The exclusion funnel (each series once, by its first reason) and label counts."""
    file_status = collections.Counter(r["status"] for r in files_rows)
    file_reason = collections.Counter(r["reason"] for r in files_rows if r["reason"])
    funnel = collections.Counter(r["reasons"].split(";")[0] for r in series_rows if r["reasons"])
    any_reason = collections.Counter(x for r in series_rows for x in r["reasons"].split(";") if x)
    per_split: dict[str, Any] = {}
    for split in labels.SPLITS:
        rows = [r for r in series_rows if r["status"] == "included" and r["split"] == split]
        eff = [float(r["effective_spacing_mm"]) for r in rows if r["effective_spacing_mm"]]
        per_split[split] = {
            "series": len(rows),
            "patients": len({r["patient_key"] for r in rows}),
            "sequence": {k: sum(r["sequence"] == k for r in rows) for k in labels.SEQUENCE},
            "view": {k: sum(r["view"] == k for r in rows) for k in labels.VIEW},
            "contrast": {k: sum(r["contrast"] == k for r in rows) for k in labels.CONTRAST},
            "coverage": {k: sum(k in r["coverage"].split(";") for r in rows)
                         for k in labels.COVERAGE},
            "coverage_unknown": sum(r["coverage"] == "" for r in rows),
            "effective_spacing_mm": {"mean": round(statistics.fmean(eff), 3) if eff else None,
                                     "median": round(statistics.median(eff), 3) if eff else None},
        }
    return {
        "files": {"total": len(files_rows), "included": file_status.get("included", 0),
                  "excluded": file_status.get("excluded", 0),
                  "by_reason": {k: file_reason[k] for k in labels.EXCLUSION_REASONS
                                if file_reason[k]}},
        "series": {"total": len(series_rows),
                   "included": sum(r["status"] == "included" for r in series_rows),
                   "excluded": sum(r["status"] == "excluded" for r in series_rows)},
        "funnel": [{"reason": k, "series": funnel[k]} for k in labels.EXCLUSION_REASONS],
        "series_with_reason": {k: any_reason[k] for k in labels.EXCLUSION_REASONS},
        "splits": per_split,
        "review_rows": len(review_rows),
    }


def format_summary(summary: dict) -> str:
    out = io.StringIO()
    s = summary["series"]
    print(f"files: {summary['files']['total']}  series: {s['total']}  "
          f"included: {s['included']}  excluded: {s['excluded']}", file=out)
    print("exclusion funnel (first reason)        series", file=out)
    remaining = s["total"]
    for item in summary["funnel"]:
        remaining -= item["series"]
        print(f"  - {item['reason']:<34}{item['series']:>7}   -> {remaining}", file=out)
    print(f"{'':<12}" + "".join(f"{sp:>8}" for sp in labels.SPLITS), file=out)
    sp = summary["splits"]
    print(f"{'series':<12}" + "".join(f"{sp[k]['series']:>8}" for k in labels.SPLITS), file=out)
    print(f"{'patients':<12}" + "".join(f"{sp[k]['patients']:>8}" for k in labels.SPLITS), file=out)
    for head in ("sequence", "view", "contrast", "coverage"):
        for name in sp["train"][head]:
            print(f"{name[:11]:<12}" + "".join(f"{sp[k][head][name]:>8}" for k in labels.SPLITS),
                  file=out)
    print(f"review rows: {summary['review_rows']}", file=out)
    return out.getvalue()


def run_index(dicom_root: str, out: str, cfg, workers: int = 1, salt_file: str = DEFAULT_SALT_FILE,
              collections_csv: str | None = None, overrides_csv: str | None = None,
              progress: bool = True) -> dict:
    """The whole index; returns the summary (also written to OUT/summary.json)."""
    if not os.path.isdir(dicom_root):
        raise FileNotFoundError(f"--dicom_root {dicom_root!r} is not a directory")
    os.makedirs(out, exist_ok=True)
    secret = load_salt(salt_file)
    collections_table = load_collections(collections_csv)
    paths = walk(dicom_root, skip=[out])
    cache = HeaderCache(os.path.join(out, "cache", "headers.jsonl"), salt_fingerprint(secret))
    records = read_all(dicom_root, paths, secret, cache, workers, cfg.chunksize,
                       cfg.cache_flush_s, progress)
    parsed = cache.n_added
    series_rows, file_key, review_rows = build_series(records, secret, cfg, collections_table)
    assign_splits(series_rows, cfg)
    n_over = apply_overrides(series_rows, overrides_csv)
    if n_over:
        logging.info("applied %d overrides from %s", n_over, overrides_csv)
    by_key = {r["series_key"]: r for r in series_rows}
    files_rows = []
    for rel in paths:
        rec = records[rel]
        key = file_key.get(rel, "")
        series = by_key.get(key)
        if rec["status"] == "unreadable":
            status, reason = "excluded", "unreadable"
        elif rec["status"] == "not_image":
            status, reason = "excluded", "not_image"
        elif series is None:
            status, reason = "excluded", "unreadable"
        else:
            status = series["status"]
            reason = series["reasons"].split(";")[0] if series["reasons"] else ""
        files_rows.append({"path": rel, "series_key": key, "status": status, "reason": reason})
    series_rows.sort(key=lambda r: r["series_key"])
    review_rows.sort(key=lambda r: (r["series_key"], r["column"]))
    _write_csv(os.path.join(out, "files.csv"), FILES_COLUMNS, files_rows)
    _write_csv(os.path.join(out, "series.csv"), SERIES_COLUMNS, series_rows)
    _write_csv(os.path.join(out, "review.csv"), REVIEW_COLUMNS, review_rows)
    summary = summarize(files_rows, series_rows, review_rows)
    summary["headers_parsed"] = parsed
    tmp = os.path.join(out, "summary.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(out, "summary.json"))
    return summary


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags():
    """Command-line flags, defined only when run as a program so that importing this
    module next to the other data_prep tools never clashes on shared names (--out, --workers)."""
    flags.DEFINE_string("dicom_root", None, "Root of the DICOM tree (any layout, any file names).")
    flags.DEFINE_string("out", None, "Output folder (files.csv, series.csv, review.csv, summary.json).")
    flags.DEFINE_integer("workers", max(1, (os.cpu_count() or 2) - 1), "Header-reading processes.")
    flags.DEFINE_string("collections", None, "Optional collections.csv: collection,regions.")
    flags.DEFINE_string("overrides", None, "Optional overrides.csv: series_key,column,value.")
    flags.DEFINE_string("salt_file", DEFAULT_SALT_FILE, "Secret for the keyed hashes (created if missing).")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "configs", "index.py"), "Index config (thresholds).")


def main(argv):
    del argv
    if not FLAGS.dicom_root or not FLAGS.out:
        raise app.UsageError("--dicom_root and --out are required")
    summary = run_index(FLAGS.dicom_root, FLAGS.out, FLAGS.config, FLAGS.workers,
                        FLAGS.salt_file, FLAGS.collections, FLAGS.overrides, FLAGS.progress)
    print(format_summary(summary))
    logging.info("wrote %s", FLAGS.out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
