"""Segmentation on the trainer skeleton: resumes after kill -9 to the same end, and runs on
2 processes × 2 CPU devices like on 1 process × 4.

Real parts throughout: phantom LiTS cases through data_prep.lits, a tiny pretraining-layout
Orbax checkpoint, the real entrypoint (python -m radnet.main) in subprocesses, the real
multi-process launcher (launch/local_multiprocess.sh, jax.distributed with gloo).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from radnet.train import checkpoint as ckpt_lib
from radnet.train import logging_utils
from tests.radnet.test_segment_run import make_liver_setup

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


@pytest.fixture(scope="module")
def liver(tmp_path_factory):
    root = tmp_path_factory.mktemp("liver_platform")
    make_liver_setup(root)
    return root


def _args(root: Path, workdir: Path, *extra: str) -> list[str]:
    return [f"--config={ROOT}/configs/liver.py:tiny,freeze=block2,dataset={root / 'ds'},"
            f"pretrained={root / 'pre'}",
            f"--config.train.num_steps={STEPS}", "--config.checkpoint.async_save=False",
            f"--workdir={workdir}", *extra]


def _env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _train_losses(workdir: Path) -> dict[int, float]:
    """Step → loss; a step logged twice (before a kill and after the restart) keeps the last."""
    return {m["step"]: m["loss"] for m in logging_utils.read_metrics(str(workdir))
            if m["split"] == "train"}


def _final_params(workdir: Path) -> dict:
    _, variables, step = ckpt_lib.load_variables(str(workdir), STEPS)
    assert step == STEPS
    return ckpt_lib.flatten(variables)


def _start(args: list[str], devices: int, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "radnet.main", *args], cwd=ROOT,
                                env=_env(devices), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=f)


def _finish(procs: list[subprocess.Popen], timeout: float = 600) -> None:
    """Waits for every process; any still running at the end (a failure) is killed."""
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_kill_minus_9_then_same_command_ends_like_an_uninterrupted_run(liver, tmp_path):
    # A long run of the same schedule (constant rate: the first steps do not depend on the
    # length), killed with SIGKILL once its step-2 checkpoint is on disk.
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "radnet.main",
                             *_args(liver, killed, "--config.train.num_steps=1000")],
                            cwd=ROOT, env=_env(1), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 480
    while not (killed / "checkpoints" / "2").is_dir():
        assert proc.poll() is None, proc.stderr.read()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint after 480 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "results.json").exists()

    # The uninterrupted run and the restart (the same command again) are independent
    # processes: they run side by side, both on the programs the killed run compiled.
    straight = tmp_path / "straight"
    runs = [_start(_args(liver, straight), 1, tmp_path / "straight.log"),
            _start(_args(liver, killed), 1, tmp_path / "again.log")]
    _finish(runs)
    assert runs[0].returncode == 0, (tmp_path / "straight.log").read_text()[-4000:]
    again = (tmp_path / "again.log").read_text()
    assert runs[1].returncode == 0, again[-4000:]
    assert "resumed from" in again

    want, got = _final_params(straight), _final_params(killed)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=str(k))
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert a == b
    la, lb = _train_losses(straight), _train_losses(killed)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    np.testing.assert_array_equal([lb[s] for s in la], [la[s] for s in la])


def test_two_processes_train_and_evaluate_like_one(liver, tmp_path):
    extra = ("--config.train.batch_size=4", "--config.eval.batch_size=4",
             "--config.optimizer.lr=0.0001")
    # The 1-process × 4-device reference runs alongside the 2-process launch (own workdir,
    # other compiled programs): their start-ups and compilations overlap.
    reference = tmp_path / "reference"
    ref = _start(_args(liver, reference, *extra), 4, tmp_path / "reference.log")
    shared = tmp_path / "shared"
    try:
        proc = subprocess.run(
            ["bash", "launch/local_multiprocess.sh", "-n", "2", "-d", "2", "--",
             *_args(liver, shared, *extra)],
            cwd=ROOT, env=dict(_env(2), PYTHON=sys.executable), capture_output=True, text=True,
            timeout=900)
    finally:
        _finish([ref])
    assert ref.returncode == 0, (tmp_path / "reference.log").read_text()[-4000:]
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((shared / "logs").glob("*.log")))
    assert proc.returncode == 0, logs
    assert "process 0 of 2, 2 local / 4 global devices" in (
        shared / "logs" / "process_0.log").read_text()

    want, got = _train_losses(reference), _train_losses(shared)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=1e-4)
    a = json.loads((reference / "results.json").read_text())
    b = json.loads((shared / "results.json").read_text())
    for split in ("val", "test"):
        assert b[split]["n"] == a[split]["n"] == 1
        assert b[split]["mean_dice"] == pytest.approx(a[split]["mean_dice"], abs=1e-3)
    # Proposals scored on 4 devices of 2 processes = on 4 devices of one.
    pa = (reference / "proposals.csv").read_text().splitlines()
    pb = (shared / "proposals.csv").read_text().splitlines()
    assert [r.split(",")[:2] + r.split(",")[4:] for r in pa] == \
           [r.split(",")[:2] + r.split(",")[4:] for r in pb]
