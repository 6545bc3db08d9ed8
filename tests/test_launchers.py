"""Each launcher's dry run shows the command it would run."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sh(*args, env=None):
    return subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_local_multiprocess_dry_run():
    out = _sh("launch/local_multiprocess.sh", "--dry_run", "-n", "3", "-d", "2", "-p", "4321", "--",
              "--config=configs/pretrain.py:tiny", "--workdir=/tmp/w")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert f"JAX_PROCESS_ID={i}" in line and "JAX_NUM_PROCESSES=3" in line
        assert "JAX_COORDINATOR_ADDRESS=127.0.0.1:4321" in line
        assert "--xla_force_host_platform_device_count=2" in line
        assert "-m radnet.main --config=configs/pretrain.py:tiny --workdir=/tmp/w" in line
        assert line.endswith(f"/tmp/w/logs/process_{i}.log")


def test_slurm_dry_run():
    out = _sh("launch/gpu_slurm.sbatch", "--config=configs/pretrain.py", "--workdir=/shared/w",
              env={"DRY_RUN": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("srun ")
    assert "--gpus-per-task=1" in out.stdout
    assert "-m radnet.main --config=configs/pretrain.py --workdir=/shared/w" in out.stdout


def test_tpu_pod_dry_run():
    out = _sh("launch/tpu_pod.sh", "--dry_run", "--config=configs/pretrain.py", "--workdir=gs://b/w",
              env={"TPU_NAME": "pod-a", "ZONE": "zone-b"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("gcloud compute tpus tpu-vm ssh pod-a --zone=zone-b --worker=all")
    assert "radnet.main" in out.stdout and "gs://b/w" in out.stdout
