"""Multi-process start-up: one call before any other JAX call.

radnet runs unchanged from one CPU to a TPU pod slice or a multi-node GPU
cluster on JAX's own distributed runtime. ``maybe_initialize`` decides from
explicit arguments or the environment whether this is a multi-process run and,
if so, calls ``jax.distributed.initialize``; on one process it does nothing.
"""

from __future__ import annotations

import os

from absl import logging


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else None


def detect_environment() -> str | None:
    """Names the multi-process launcher this process runs under, or None.

    - ``explicit-env``: JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES > 1 (our
      launch/local_multiprocess.sh, or any hand-rolled launcher);
    - ``slurm``: inside ``srun`` with more than one task;
    - ``openmpi``: mpirun with more than one rank;
    - ``tpu-pod``: a Cloud TPU VM that is one worker of several.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and (_int_env("JAX_NUM_PROCESSES") or 1) > 1:
        return "explicit-env"
    if "SLURM_STEP_ID" in os.environ and (_int_env("SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "openmpi"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        return "tpu-pod"
    return None


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Initialises jax.distributed when the run is multi-process; returns whether it did.

    Explicit arguments win (all three are needed); otherwise the environment
    decides (see ``detect_environment``). CPU runs use gloo collectives.
    """
    import jax  # imported here: importing radnet must not touch JAX

    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--coordinator_address, --num_processes and --process_id "
                             "must be given together")
        if num_processes <= 1:
            return False
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
        where = "flags"
    else:
        where = detect_environment()
        if where is None:
            return False
        if where == "explicit-env":
            kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                          num_processes=_int_env("JAX_NUM_PROCESSES"),
                          process_id=_int_env("JAX_PROCESS_ID"))
        else:
            kwargs = {}  # JAX's own cluster detection (Slurm, Open MPI, Cloud TPU)
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed initialised from %s: process %d of %d, %d local / %d global "
                 "devices", where, jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True
