"""Header-reading throughput of data_prep.index against a bare pydicom loop.

    python bench/index.py [--dicom_root=DIR] [--copies=150] [--bench_workers=1,2]

Without --dicom_root, builds a tree of copies of pydicom's bundled CT/MR files
(tiny headers: the worst case for per-file overhead). Prints one JSON line per
measurement: files/s of a bare ``pydicom.dcmread(stop_before_pixels=True)``
loop, and of the index's reader with 1 and 2 workers (cache disabled: a fresh
OUT each time), plus the ratios the issue targets (per worker >= 0.8 of bare;
2 workers >= 1.7 x one).
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

from data_prep import index  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("dicom_root", None, "Tree to read; default: copies of pydicom's test files.")
flags.DEFINE_integer("copies", 150, "Copies of each bundled file when building the tree.")
flags.DEFINE_string("bench_workers", "1,2", "Worker counts to measure.")
flags.DEFINE_integer("repeats", 3, "Best of this many runs.")


def _make_tree(root: str, copies: int) -> None:
    names = ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"]
    for c in range(copies):
        d = os.path.join(root, f"d{c:04d}")
        os.makedirs(d)
        for n in names:
            shutil.copy(pydicom.data.get_testdata_file(n), os.path.join(d, n.replace(".dcm", "")))


def _bare(root: str, paths: list[str]) -> float:
    t0 = time.perf_counter()
    for p in paths:
        pydicom.dcmread(os.path.join(root, p), stop_before_pixels=True)
    return len(paths) / (time.perf_counter() - t0)


def _indexed(root: str, paths: list[str], workers: int, secret: bytes) -> float:
    with tempfile.TemporaryDirectory() as out:
        cache = index.HeaderCache(os.path.join(out, "cache", "h.jsonl"), "bench")
        t0 = time.perf_counter()
        index.read_all(root, paths, secret, cache, workers, progress=False)
        return len(paths) / (time.perf_counter() - t0)


def main(argv):
    del argv
    tmp = None
    root = FLAGS.dicom_root
    if root is None:
        tmp = tempfile.mkdtemp(prefix="radnet_bench_index_")
        root = os.path.join(tmp, "dicom")
        _make_tree(root, FLAGS.copies)
    try:
        paths = index.walk(root)
        secret = b"bench-secret-0123456789abcdef"
        _bare(root, paths[:50])  # warm the page cache
        bare = max(_bare(root, paths) for _ in range(FLAGS.repeats))
        print(json.dumps({"bench": "index_headers", "reader": "bare_dcmread", "workers": 1,
                          "files": len(paths), "files_per_s": round(bare, 1),
                          "cpus": os.cpu_count()}), flush=True)
        rates = {}
        for w in [int(x) for x in FLAGS.bench_workers.split(",")]:
            rates[w] = max(_indexed(root, paths, w, secret) for _ in range(FLAGS.repeats))
            print(json.dumps({"bench": "index_headers", "reader": "data_prep.index", "workers": w,
                              "files": len(paths), "files_per_s": round(rates[w], 1),
                              "per_worker_vs_bare": round(rates[w] / w / bare, 3)}), flush=True)
        if 1 in rates and 2 in rates:
            print(json.dumps({"bench": "index_headers", "speedup_2_vs_1":
                              round(rates[2] / rates[1], 3)}), flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
