"""Header-reading throughput of data_prep.index on Dask against a bare pydicom loop.

    python bench/index.py [--dicom_root=DIR] [--copies=2500] [--bench_workers=0,1,2] [--repeats=3]

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
  0 workers runs in-process (no Dask); N >= 1 is a LocalCluster of N worker processes
  (what the command line starts), started once per N before the rounds, with this
  process as client and scheduler (it receives every record and writes the cache).
- Rounds are interleaved (bare, index 0, index 1, index 2, bare, ...) so that a change
  of load on a shared machine hits every reader alike; each reader's best round
  counts. ``cluster_start_s`` is the LocalCluster's start (processes, imports);
  ``first_run_s`` is the first run on it (workers import the reader then); a tree of
  10^4 files or more amortises both, as a real archive (10^4-10^6 files) does.

Targets (issue 15): per worker >= 0.8 of the bare loop; 2 workers ~2 x one.
The 2-worker figure needs 2 idle cores for the workers plus some for the client.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pydicom  # noqa: E402
from absl import app, flags  # noqa: E402

from data_prep import cluster  # noqa: E402
from data_prep.index import reading  # noqa: E402
from radnet.dicom import headers as dicom_headers  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("dicom_root", None, "Tree to read; default: copies of pydicom's test files.")
flags.DEFINE_integer("copies", 2500, "Copies of each of the 4 bundled files when building the tree.")
flags.DEFINE_string("bench_workers", "0,1,2", "Worker counts to measure (0: in-process, no Dask).")
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
    # force=True: archives (the phantom one among them) hold files without the 128-byte
    # preamble, which dcmread refuses otherwise; it costs nothing on files that have one.
    t0 = time.perf_counter()
    for p in full:
        pydicom.dcmread(p, stop_before_pixels=True, force=True, **kwargs)
    return time.perf_counter() - t0


def _bare_cpu(full: list[str]) -> float:
    t0 = _process_cpu()
    for p in full:
        pydicom.dcmread(p, stop_before_pixels=True, force=True)
    return _process_cpu() - t0


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _workers_cpu(eng: cluster.Engine) -> float:
    return sum(eng.client.run(_process_cpu).values()) if eng.client else 0.0


def _indexed(root: str, paths: list[str], eng: cluster.Engine,
             secret: bytes) -> tuple[float, float, float]:
    """(wall, workers' CPU, this process's CPU) seconds of one index read."""
    with tempfile.TemporaryDirectory() as out:
        cache = reading.HeaderCache(os.path.join(out, "cache", "h.jsonl"), "bench")
        workers = _workers_cpu(eng)
        t0, cpu = time.perf_counter(), _process_cpu()
        reading.read_all(root, paths, secret, cache, eng, chunksize=FLAGS.chunksize,
                         progress=False)
        wall, cpu = time.perf_counter() - t0, _process_cpu() - cpu
        return wall, _workers_cpu(eng) - workers, cpu


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
    workers = [int(x) for x in FLAGS.bench_workers.split(",")]
    with contextlib.ExitStack() as stack:
        if tmp:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        paths = reading.walk(root)
        full = [os.path.join(root, p) for p in paths]
        n = len(paths)
        secret = b"bench-secret-0123456789abcdef"
        for p in full:  # page cache
            with open(p, "rb") as f:
                f.read()
        engines, cluster_start = {}, {}
        for w in workers:
            t0 = time.perf_counter()
            engines[w] = stack.enter_context(cluster.engine(None, w, dashboard_address=None))
            cluster_start[w] = time.perf_counter() - t0
        times: dict[str, list[float]] = {"bare": [], "bare_specific_tags": [], "bare_cpu": []}
        cpus: dict[int, list[tuple[float, float]]] = {w: [] for w in workers}
        times.update({f"index_{w}": [] for w in workers})
        first_run: dict[int, float] = {}
        for _ in range(FLAGS.repeats):
            times["bare"].append(_bare(full))
            times["bare_cpu"].append(_bare_cpu(full))
            times["bare_specific_tags"].append(
                _bare(full, specific_tags=dicom_headers.SPECIFIC_TAGS))
            for w in workers:
                t, workers_cpu, client_cpu = _indexed(root, paths, engines[w], secret)
                first_run.setdefault(w, t)
                times[f"index_{w}"].append(t)
                cpus[w].append((workers_cpu, client_cpu))
        bare = n / min(times["bare"])
        _emit(reader="bare_dcmread", workers=1, files=n, files_per_s=round(bare, 1),
              cpus=os.cpu_count(), load_avg_1m=round(os.getloadavg()[0], 2))
        _emit(reader="bare_dcmread_specific_tags", workers=1, files=n,
              files_per_s=round(n / min(times["bare_specific_tags"]), 1))
        rates = {}
        for w in workers:
            best = min(times[f"index_{w}"])
            rates[w] = n / best
            line = dict(reader="data_prep.index", engine="in-process" if w == 0 else "dask",
                        workers=w, files=n, files_per_s=round(rates[w], 1),
                        per_worker_vs_bare=round(rates[w] / max(w, 1) / bare, 3),
                        all_seconds=[round(t, 3) for t in times[f"index_{w}"]])
            if w > 0:
                # CPU seconds of the workers (all threads) and of this process (client
                # and scheduler) against the bare loop's: files per CPU-second, less
                # disturbed by other jobs on a shared machine than wall time.
                bare_cpu = min(times["bare_cpu"])
                line.update(cluster_start_s=round(cluster_start[w], 3),
                            first_run_s=round(first_run[w], 3),
                            workers_cpu_vs_bare=round(bare_cpu / min(c[0] for c in cpus[w]), 3),
                            client_cpu_per_file_us=round(min(c[1] for c in cpus[w]) / n * 1e6, 1))
            _emit(**line)
        if 1 in rates and 2 in rates:
            _emit(dask_speedup_2_vs_1=round(rates[2] / rates[1], 3))


if __name__ == "__main__":
    app.run(main)
