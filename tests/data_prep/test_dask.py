"""The offline tools on a running Dask cluster (a real scheduler and two worker processes
on localhost, joined with --scheduler=): the same bytes as the default run (a LocalCluster
the tool starts itself) and as a build in one process; a worker killed with SIGKILL in the
middle of a build changes nothing; an unreachable scheduler is one line and exit status 2.
"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask.config
import distributed
import numpy as np
import pytest

from configs import build_volumes as build_config
from data_prep.phantoms import volume_synth as synth
from data_prep.volumes import builder
from radnet import labels
from radnet.data import schema

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config=configs/build_volumes.py:tiny"]


@pytest.fixture(scope="module")
def dask_cluster():
    """A scheduler and two single-threaded worker processes (each under its nanny)."""
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        client.wait_for_workers(2, timeout=60)
        yield cluster.scheduler_address, client


def tool(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, "--noprogress", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return proc


def dataset_files(path: Path) -> dict[str, bytes]:
    """Every file of a dataset but the done markers (whose JSON holds bytes_read, the same,
    and nothing else that differs): volume chunks, label chunks, zarr.json, CSV files."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and "_build" not in p.parts}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from data_prep.phantoms import pacs
    out = tmp_path_factory.mktemp("phantom_dask")
    pacs.generate(str(out), patients=2, seed=4, lits_cases=0, workers=1)
    (out / "salt").write_text("dask-test-salt-0123456789abcdef\n")
    return out


def test_index_and_build_on_a_cluster_equal_the_default_run(phantom, dask_cluster, tmp_path):
    address, _ = dask_cluster
    dicom = phantom / "dicom"
    common = [f"--dicom_root={dicom}", f"--salt_file={phantom / 'salt'}",
              f"--collections={phantom / 'collections.csv'}"]
    runs = {"default": ["--workers=2"], "cluster": [f"--scheduler={address}"]}
    for name, how in runs.items():
        proc = tool("data_prep.index", *common, f"--out={tmp_path / name / 'index'}", *how)
        assert proc.returncode == 0, proc.stderr[-3000:]
        proc = tool("data_prep.build_volumes", f"--index={tmp_path / name / 'index'}",
                    f"--dicom_root={dicom}", f"--out={tmp_path / name / 'ds'}", *TINY, *how)
        assert proc.returncode == 0, proc.stderr[-3000:]
    default, on_cluster = tmp_path / "default", tmp_path / "cluster"
    for name in ("files.csv", "series.csv", "review.csv", "summary.json"):
        assert (default / "index" / name).read_bytes() == (on_cluster / "index" / name).read_bytes(), name
    series = list(csv.DictReader(open(default / "index" / "series.csv")))
    assert sum(r["status"] == "included" for r in series) >= 5
    # The build in this process (no Dask at all), from the same index: the same bytes.
    in_process = tmp_path / "in_process"
    builder.build(str(default / "index"), str(dicom), str(in_process),
                  build_config.get_config("tiny"), workers=0, progress=False)
    reference = dataset_files(in_process)
    assert "manifest.csv" in reference and any(k.startswith(f"{schema.ZARR_GROUP}/volume/c/") for k in reference)
    for name in runs:
        assert dataset_files(tmp_path / name / "ds") == reference, name
    volumes = schema.open_arrays(str(on_cluster / "ds"), names=("volume",))["volume"].read().result()
    assert volumes.any()


def test_unreachable_scheduler_is_one_line_and_status_2(tmp_path):
    (tmp_path / "dicom").mkdir()
    start = time.monotonic()
    proc = tool("data_prep.index", f"--dicom_root={tmp_path / 'dicom'}", f"--out={tmp_path / 'o'}",
                "--scheduler=tcp://127.0.0.1:9", "--connect_timeout_s=2", timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tcp://127.0.0.1:9" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and time.monotonic() - start < 40
    assert not (tmp_path / "o").exists()  # nothing written before the cluster answered


def _dies_on_three(item: int) -> int:
    if item == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # whatever worker runs it dies, every time
    return item * 2


def test_a_task_that_keeps_killing_workers_ends_as_worker_died():
    """The engine under both tools: after the scheduler's allowed failures the task comes
    back as WorkerDied (recorded by the tools as a reason), the others finish, no hang."""
    from data_prep import cluster
    start = time.monotonic()
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        with cluster.engine(None, 2, dashboard_address=None) as eng:
            results = dict(eng.map(_dies_on_three, list(range(6)), key="poison"))
    assert {i: r for i, r in results.items() if i != 3} == {0: 0, 1: 2, 2: 4, 4: 8, 5: 10}
    assert isinstance(results[3], cluster.WorkerDied)
    assert results[3].message.startswith("worker_died:") and "2 times" in results[3].message
    assert time.monotonic() - start < 90


def test_worker_killed_mid_build_changes_nothing(dask_cluster, tmp_path):
    address, client = dask_cluster
    rng = np.random.default_rng(1)
    series = []
    for k in range(30):
        paths, _ = synth.write_body_series(str(tmp_path / "dicom" / f"s{k}"), 16, 64, 64,
                                           slice_spacing_mm=2.5, slopes=[1.0] * 16, rng=rng)
        series.append(dict(series_key=f"{k:032x}", paths=paths, patient_key=f"p{k % 3}",
                           split=labels.SPLITS[k % 3]))
    synth.write_index(str(tmp_path / "index"), str(tmp_path / "dicom"), series)
    index, dicom = str(tmp_path / "index"), str(tmp_path / "dicom")
    config = build_config.get_config("tiny")
    builder.build(index, dicom, str(tmp_path / "reference"), config, progress=False)

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep.build_volumes", "--noprogress", f"--index={index}",
         f"--dicom_root={dicom}", f"--out={out}", f"--scheduler={address}", *TINY],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = client.run(os.getpid, wait=True)
        markers = out / "_build" / "done"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if markers.is_dir() and len(list(markers.glob("*.json"))) >= 3:
                break
            time.sleep(0.005)
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)  # one worker process, in the middle of its work
        done_at_kill = len(list(markers.glob("*.json")))
        assert proc.poll() is None and done_at_kill < 30, "the build ended before the kill"
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert dataset_files(out) == dataset_files(tmp_path / "reference")
    # The nanny restarted the killed process: the cluster has two workers again.
    client.wait_for_workers(2, timeout=60)
    assert victim not in client.run(os.getpid).values()
