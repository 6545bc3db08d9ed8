"""Header-reading throughput of data_prep.index against a bare pydicom loop.

    python bench/index.py [--dicom_root=DIR] [--copies=2500] [--bench_workers=1,2] [--repeats=3]

Without --dicom_root, builds a tree of copies of pydicom's bundled CT/MR files
(explicit and implicit VR, little and big endian; 10-40 KiB each, so per-file
overhead weighs the most). Prints one JSON line per measurement.

How it compares, so the ratios mean something:
- The same files in the same order for every reader, after one untimed pass
  that puts them all in the page cache (no reader pays for the disk).
- The baseline is the issue's: ``pydicom.dcmread(path, stop_before_pixels=True)``
  in a plain loop. A second baseline line, with the index's ``specific_tags``,
  is printed for reference only.
- The index is timed through ``data_prep.index.reading.read_all`` with an empty cache
  (a fresh OUT each time): parse, checks, keyed hashes, records, cache lines.
  1 worker runs in-process; N > 1 is a forkserver pool plus the writing parent.
- Rounds are interleaved (bare, index 1, index 2, bare, ...) so that a change of
  load on a shared machine hits every reader alike; each reader's best round
  counts. ``first_run_s`` is the first pool run, which also starts the fork
  server (imports in a fresh process); ``startup_s`` is the best time of a pool
  run over one file per worker (fork, worker set-up, first task). A tree of
  10^4 files or more amortises it, as a real archive (10^4-10^6 files) does.

Targets (issue 4): per worker >= 0.8 of the bare loop; 2 workers >= 1.7 x one.
The 2-worker figure needs 2 idle cores for the workers plus some for the parent.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pydicom  # noqa: E402
from absl import app, flags  # noqa: E402

from data_prep.index import reading  # noqa: E402
from radnet.dicom import headers as dicom_headers  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("dicom_root", None, "Tree to read; default: copies of pydicom's test files.")
flags.DEFINE_integer("copies", 2500, "Copies of each of the 4 bundled files when building the tree.")
flags.DEFINE_string("bench_workers", "1,2", "Worker counts to measure.")
flags.DEFINE_integer("repeats", 3, "Interleaved rounds; the best round of each reader counts.")
flags.DEFINE_integer("chunksize", 16, "Files per task sent to a worker (configs/index.py default).")


def _make_tree(root: str, copies: int) -> None:
    names = ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"]
    for c in range(copies):
        d = os.path.join(root, f"d{c:04d}")
        os.makedirs(d)
        for n in names:
            shutil.copy(pydicom.data.get_testdata_file(n), os.path.join(d, n.replace(".dcm", "")))


def _bare(full: list[str], **kwargs) -> float:
    t0 = time.perf_counter()
    for p in full:
        pydicom.dcmread(p, stop_before_pixels=True, **kwargs)
    return time.perf_counter() - t0


def _indexed(root: str, paths: list[str], workers: int, secret: bytes) -> float:
    with tempfile.TemporaryDirectory() as out:
        cache = reading.HeaderCache(os.path.join(out, "cache", "h.jsonl"), "bench")
        t0 = time.perf_counter()
        reading.read_all(root, paths, secret, cache, workers, chunksize=FLAGS.chunksize,
                       progress=False)
        return time.perf_counter() - t0


def _emit(**kw) -> None:
    print(json.dumps({"bench": "index_headers", **kw}), flush=True)


def main(argv):
    del argv
    tmp = None
    root = FLAGS.dicom_root
    if root is None:
        tmp = tempfile.mkdtemp(prefix="radnet_bench_index_")
        root = os.path.join(tmp, "dicom")
        _make_tree(root, FLAGS.copies)
    try:
        paths = reading.walk(root)
        full = [os.path.join(root, p) for p in paths]
        n = len(paths)
        secret = b"bench-secret-0123456789abcdef"
        workers = [int(x) for x in FLAGS.bench_workers.split(",")]
        for p in full:  # page cache
            with open(p, "rb") as f:
                f.read()
        times: dict[str, list[float]] = {"bare": [], "bare_specific_tags": []}
        times.update({f"index_{w}": [] for w in workers})
        startup: dict[int, list[float]] = {w: [] for w in workers if w > 1}
        first_run: dict[int, float] = {}
        for _ in range(FLAGS.repeats):
            times["bare"].append(_bare(full))
            times["bare_specific_tags"].append(
                _bare(full, specific_tags=dicom_headers.SPECIFIC_TAGS))
            for w in workers:
                t = _indexed(root, paths, w, secret)
                first_run.setdefault(w, t)
                times[f"index_{w}"].append(t)
                if w > 1:
                    startup[w].append(_indexed(root, paths[:w], w, secret))
        bare = n / min(times["bare"])
        _emit(reader="bare_dcmread", workers=1, files=n, files_per_s=round(bare, 1),
              cpus=os.cpu_count(), load_avg_1m=round(os.getloadavg()[0], 2))
        _emit(reader="bare_dcmread_specific_tags", workers=1, files=n,
              files_per_s=round(n / min(times["bare_specific_tags"]), 1))
        rates = {}
        for w in workers:
            best = min(times[f"index_{w}"])
            rates[w] = n / best
            line = dict(reader="data_prep.index", workers=w, files=n,
                        files_per_s=round(rates[w], 1),
                        per_worker_vs_bare=round(rates[w] / w / bare, 3))
            if w > 1:
                s = min(startup[w])
                line.update(startup_s=round(s, 3), first_run_s=round(first_run[w], 3),
                            files_per_s_after_startup=round(n / max(best - s, 1e-9), 1))
            _emit(**line)
        if 1 in rates and 2 in rates:
            _emit(speedup_2_vs_1=round(rates[2] / rates[1], 3))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
