"""Multi-process detection: explicit flags, launcher environments, and the one-process no-op."""

import pytest

from radnet import distributed

_LAUNCHER_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                  "SLURM_STEP_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def clean_env(monkeypatch):
    for var in _LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_single_process_is_a_noop(clean_env):
    assert distributed.detect_environment() is None
    assert distributed.maybe_initialize() is False
    assert distributed.maybe_initialize("localhost:1234", 1, 0) is False


@pytest.mark.parametrize("env, expected", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:9999", "JAX_NUM_PROCESSES": "2"}, "explicit-env"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:9999", "JAX_NUM_PROCESSES": "1"}, None),
    ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "8"}, "slurm"),
    ({"SLURM_NTASKS": "8"}, None),  # sbatch script itself, not inside srun
    ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "openmpi"),
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}, "tpu-pod"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # single-host TPU VM
])
def test_environment_detection(clean_env, env, expected):
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert distributed.detect_environment() == expected


def test_partial_explicit_arguments_are_an_error(clean_env):
    with pytest.raises(ValueError, match="must be given together"):
        distributed.maybe_initialize("localhost:1234", None, 0)
