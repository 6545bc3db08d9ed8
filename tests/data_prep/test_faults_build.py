"""Faults and bad input at the volume build (issue 16, points 1, 2, 5, 8): a missing input
stops the build before it marks anything done; a transient failure (a file unreadable for a
moment, a worker killed with SIGKILL) is recorded, exits non-zero and is built by the next
run; a series too large for memory is excluded before decoding; bad pixels are excluded
with their own reasons; a failed chunk write exits non-zero naming the unfinished series.
"""

import csv
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask.config
import distributed
import numpy as np
import pydicom

from configs import build_volumes as config_lib
from data_prep.phantoms import volume_synth as synth
from data_prep.volumes import builder
from radnet import labels
from tests.data_prep.test_build_volumes import assert_same, read_dataset

ROOT = Path(__file__).resolve().parents[2]


def archive(root: Path, num_series: int = 4, n_slices: int = 12, size: int = 32,
            extra: dict | None = None, shapes: dict | None = None
            ) -> tuple[str, str, list[dict]]:
    """A small archive and its index; returns (index, dicom root, series dicts).
    ``shapes``: series number → (rows, columns) where not size × size."""
    rng = np.random.default_rng(5)
    series = []
    for k in range(num_series):
        rows, cols = (shapes or {}).get(k, (size, size))
        paths, _ = synth.write_body_series(str(root / "dicom" / f"s{k}"), n_slices, rows, cols,
                                           slice_spacing_mm=2.5, rng=rng)
        series.append(dict(series_key=f"{k:032x}", paths=paths, patient_key=f"p{k}",
                           split=labels.SPLITS[k % 3], **(extra or {}).get(k, {})))
    synth.write_index(str(root / "index"), str(root / "dicom"), series)
    return str(root / "index"), str(root / "dicom"), series


def config(**kw):
    c = config_lib.get_config("tiny")
    c.volume_shape = (8, 16, 16)
    c.update(kw)
    return c


def cli(index, dicom, out, *extra, shape="(8,16,16)", preexec_fn=None, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "data_prep.build_volumes", "--noprogress", f"--index={index}",
         f"--dicom_root={dicom}", f"--out={out}", "--config=configs/build_volumes.py:tiny",
         f"--config.volume_shape={shape}", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn,
        env=env)


def manifest(out) -> dict[str, dict]:
    return {r["series_key"]: r for r in csv.DictReader(io.StringIO((Path(out) / "manifest.csv").read_text()))}


def test_a_missing_input_stops_the_build_and_marks_nothing_done(tmp_path):
    index, dicom, _ = archive(tmp_path)
    empty = tmp_path / "not_mounted"
    empty.mkdir()
    proc = cli(index, empty, tmp_path / "ds", "--workers=0")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "48 of the 48 files" in last and "is the archive mounted" in last, last
    assert "files.csv rows 2, 3, 4" in last and str(tmp_path / "dicom") not in last
    assert not list((tmp_path / "ds").rglob("_build/done/*.json"))
    # The right root then builds everything (was: "0 left to build (4 already done)").
    summary = builder.build(index, dicom, str(tmp_path / "ds"), config(), progress=False)
    assert summary["finalized"] and summary["dataset"]["built"] == 4, summary


def test_a_transient_read_failure_is_recorded_and_built_by_the_next_run(tmp_path):
    index, dicom, series = archive(tmp_path)
    reference = tmp_path / "reference"
    builder.build(index, dicom, str(reference), config(), progress=False)
    victim = Path(series[1]["paths"][3])
    saved = victim.read_bytes()
    victim.unlink()
    victim.mkdir()                      # there, but open() fails: IsADirectoryError
    proc = cli(index, dicom, tmp_path / "ds", "--workers=0")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "failed for a reason that may pass" in proc.stderr and "1 (" in proc.stderr
    summary = json.loads((tmp_path / "ds" / "summary.json").read_text())
    assert summary["excluded"] == {"unreadable": 1} and summary["to_retry"] == 1
    assert manifest(tmp_path / "ds")[series[1]["series_key"]]["reason"] == "unreadable"
    victim.rmdir()
    victim.write_bytes(saved)
    proc = cli(index, dicom, tmp_path / "ds", "--workers=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["series_this_run"] == 1
    assert_same(read_dataset(reference), read_dataset(tmp_path / "ds"))


def test_a_worker_killed_mid_series_is_recorded_then_rebuilt(tmp_path):
    """SIGKILL of the worker running a series (allowed-failures 0: the first death counts):
    the run ends, the series is recorded worker_died, the exit status is 1, and the same
    command builds it."""
    index, dicom, _ = archive(tmp_path, num_series=16, n_slices=24, size=128)
    reference = tmp_path / "reference"
    builder.build(index, dicom, str(reference), config(), progress=False)
    env = dict(os.environ, DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="0")
    # One task on the worker at a time, as the tools' own LocalCluster runs (cluster.engine).
    with dask.config.set({"distributed.scheduler.allowed-failures": 0,
                          "distributed.scheduler.worker-saturation": 1.0}), \
            distributed.LocalCluster(n_workers=1, processes=True, threads_per_worker=1,
                                     dashboard_address=None) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        client.wait_for_workers(1, timeout=60)
        out = tmp_path / "ds"
        cmd = [sys.executable, "-m", "data_prep.build_volumes", "--noprogress",
               f"--index={index}", f"--dicom_root={dicom}", f"--out={out}",
               f"--scheduler={cluster.scheduler_address}",
               "--config=configs/build_volumes.py:tiny", "--config.volume_shape=(8,16,16)"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            killed, deadline = False, time.monotonic() + 180
            while not killed and time.monotonic() < deadline and proc.poll() is None:
                busy = {w: keys for w, keys in client.processing().items()
                        if any(str(k).startswith("series-") for k in keys)}
                markers = list((out / "_build" / "done").glob("*.json")) if out.exists() else []
                if busy and len(markers) >= 2:
                    pid = client.run(os.getpid, workers=list(busy))[next(iter(busy))]
                    os.kill(pid, signal.SIGKILL)
                    killed = True
                time.sleep(0.002)
            stdout, stderr = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert killed, "the build ended before a worker could be killed"
        assert proc.returncode == 1, stderr[-3000:]
        summary = json.loads(stdout.strip().splitlines()[-1])
        assert summary["finalized"] and summary["to_retry"] == 1, summary
        assert summary["dataset"]["excluded"] == {"worker_died": 1}
        errors = (out / "errors.csv").read_text()
        assert "worker_died" in errors
        client.wait_for_workers(1, timeout=60)
        rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["series_this_run"] == 1
    assert_same(read_dataset(reference), read_dataset(out))


def _edit(paths, k, **attrs):
    ds = pydicom.dcmread(paths[k])
    for name, value in attrs.items():
        setattr(ds, name, value)
    ds.save_as(paths[k])


def test_bad_pixels_and_a_too_large_series_are_excluded_with_their_reasons(tmp_path):
    huge = {"rows": 46340, "columns": 46340, "n_slices": 12}   # what the index read
    index, dicom, series = archive(tmp_path, num_series=11, extra={8: huge},
                                   shapes={10: (32, 24)})
    p = [s["paths"] for s in series]
    _edit(p[0], 5, RescaleSlope="nan")                 # one slice, each of these
    _edit(p[1], 5, RescaleSlope="1e39")
    _edit(p[2], 5, RescaleIntercept="inf")
    _edit(p[3], 5, RescaleSlope=0)
    for path in p[4]:                                  # every pixel is padding
        ds = pydicom.dcmread(path)
        pad = int(np.frombuffer(ds.PixelData, "<i2")[0])
        ds.add_new("PixelPaddingValue", "SS", pad)
        ds.PixelData = np.full((ds.Rows, ds.Columns), pad, "<i2").tobytes()
        ds.save_as(path)
    _edit(p[5], 5, BitsAllocated=8, BitsStored=8, HighBit=7)   # 16-bit data declared 8
    ds = pydicom.dcmread(p[6][5])                      # rows and columns swapped (non-square)
    ds.Rows, ds.Columns = 16, 64
    ds.save_as(p[6][5])
    for path in p[10]:                                 # swapped on every slice: same length
        _edit([path], 0, Rows=24, Columns=32)
    os.unlink(p[9][2])
    os.mkfifo(p[9][2])                                 # a file became a FIFO: never opened
    out = tmp_path / "ds"
    summary = builder.build(index, dicom, str(out), config(), progress=False)
    rows = manifest(out)
    reasons = [rows[s["series_key"]]["reason"] for s in series]
    assert reasons == ["invalid_rescale", "invalid_rescale", "invalid_rescale", "invalid_rescale",
                       "constant_volume", "pixel_data_mismatch", "inconsistent_geometry", "",
                       "too_large", "unreadable", "swapped_dimensions"], reasons
    assert summary["dataset"]["excluded"] == {"invalid_rescale": 4, "constant_volume": 1,
                                              "pixel_data_mismatch": 1, "unreadable": 1,
                                              "inconsistent_geometry": 1, "too_large": 1,
                                              "swapped_dimensions": 1}
    assert json.loads((out / "summary.json").read_text())["excluded"]["too_large"] == 1
    assert summary["dataset"]["built"] == 1 and summary["to_retry"] == 0


def _no_files_over(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # write() fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failed_chunk_write_exits_non_zero_and_a_rerun_completes(tmp_path):
    index, dicom, series = archive(tmp_path, size=64)
    shape = "(16,128,128)"   # chunks of several KiB; metadata under 2 KiB
    reference = tmp_path / "reference"
    proc = cli(index, dicom, reference, "--workers=0", shape=shape)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "ds"
    proc = cli(index, dicom, out, "--workers=0", shape=shape, preexec_fn=_no_files_over(3000))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "could not be written" in proc.stderr and "are unfinished" in proc.stderr
    # The run ends on what to do, not on a success line.
    assert "Traceback" not in proc.stderr
    assert "run the same command again" in proc.stderr.splitlines()[-1]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not summary["finalized"]
    assert not (out / "manifest.csv").exists()
    proc = cli(index, dicom, out, "--workers=0", shape=shape)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same(read_dataset(reference), read_dataset(out))
