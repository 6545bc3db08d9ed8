"""Walking the archive and reading every header once: a worker pool over file chunks,
and an append-only cache so that a killed or repeated run parses only what changed.

Headers are read in worker processes (pixel data never), each record is appended to
OUT/cache/headers.jsonl as it arrives, and a re-run reads again only files whose
(path, size, mtime) changed. The cache holds keyed hashes, never raw identifiers, and is
discarded when the salt or the reader changes.
"""

from __future__ import annotations

import json
import logging as std_logging
import multiprocessing
import os
import sys
import time
from typing import Iterable, Iterator

import tqdm
from absl import logging

from radnet.dicom import headers as dicom_headers


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
                ctx.set_forkserver_preload(["__main__", __name__])
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

