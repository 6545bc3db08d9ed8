"""Host memory a process has freed stays with it for reuse (glibc's malloc tunables).

Why: XLA:CPU allocates each run of a compiled program's temporary buffer — every activation
and gradient of a train step, 434 MB for the VNet at 16×64×64 — as one block, and frees it
at the end of the run. glibc's malloc serves a block that large with a fresh ``mmap`` and
gives it back with ``munmap``, so at every step the kernel hands out and zeroes the same
434 MB again, 4 KiB page by page: 110,000 page faults per VNet step (measured; figures in
docs/performance.md, "Host memory"). With the tunables below the block comes from malloc's
heap, stays there when freed, and the next step reuses it: no page faults after the first
step, and the heap is backed by transparent huge pages where the kernel offers them.

The tunables (glibc's manual, "Memory Allocation Tunables"):

- ``glibc.malloc.mmap_max=0``: large blocks come from the heap, not from a fresh ``mmap``;
- ``glibc.malloc.arena_max=1``: every thread allocates from the one main heap. glibc's other
  arenas hold at most 64 MiB and hand larger blocks to ``mmap`` whatever ``mmap_max`` says,
  and XLA allocates from its own worker threads;
- ``glibc.malloc.trim_threshold`` (1 PiB): freed memory at the top of the heap is not
  returned to the system;
- ``glibc.malloc.hugetlb=1``: the heap is marked for transparent huge pages (glibc ≥ 2.35;
  older glibc ignores it).

They act only from a process's start (glibc reads them once; ``mallopt`` later does not
reach threads that already have their own arena — tried, it held in some import orders and
not in others). So the command lines that run models (``radnet.main``, ``radnet.train.segment``,
``bench/torch_reference.py``) start themselves once more with the tunables added to
``GLIBC_TUNABLES`` (:func:`restart_with_tunables`, called by ``radnet.cli.run`` before any
work; about as long as the imports, ~1 s). Tunables the user set are kept as they are.
Library users who want the same start their own program with them, e.g.
``GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:… python train.py``
(:func:`tunables` gives the string).

The same restart sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it: the OpenMP
threads of oneDNN's convolutions (radnet/native) then sleep when a convolution ends instead
of spinning on both cores while XLA's own threads run the fusions between convolutions
(another setting read only at process start). Measured on the VNet step at 16×64×64, three
alternating process pairs: 0.292 / 0.282 / 0.272 s against 0.306 / 0.306 / 0.291 s, less
CPU time per step (docs/performance.md).

The cost, said plainly: a process keeps the host memory of its peak until it exits (a
training or predict process reaches that peak again at every step anyway), and one arena
means that threads allocating at the same moment share a lock (small blocks still come from
each thread's cache). Child processes inherit the environment, so Grain's workers run with
the same settings. Only Linux with glibc; elsewhere nothing changes.
``RADNET_HOST_MEMORY=system`` leaves glibc's defaults (and OpenMP's) alone.
"""

from __future__ import annotations

import json
import os
import platform
import sys

ENV_VAR = "RADNET_HOST_MEMORY"
_VALUES = ("keep", "system")
TUNABLES_VAR = "GLIBC_TUNABLES"

# Environment variables read once at start by the OpenMP runtime under oneDNN; the user's
# own value wins.
START_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}

# name → value; the trim threshold is 2**50 bytes (1 PiB): "never" in practice.
TUNABLES = {
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.trim_threshold": str(2**50),
    "glibc.malloc.hugetlb": "1",
}


def wanted() -> bool:
    """True unless ``RADNET_HOST_MEMORY=system``; another value is a mistake (ValueError)."""
    value = os.environ.get(ENV_VAR, "keep").strip().lower() or "keep"
    if value not in _VALUES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {'|'.join(_VALUES)} "
                         f"(unset it, or {ENV_VAR}=system for glibc's own malloc settings)")
    return value == "keep"


def on_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _set_names(value: str) -> set[str]:
    return {item.split("=", 1)[0] for item in value.split(":") if "=" in item}


def tunables(existing: str = "") -> str:
    """``existing`` (a GLIBC_TUNABLES value) with radnet's tunables added where it does not
    name them; the user's own values win."""
    have = _set_names(existing)
    added = [f"{name}={value}" for name, value in TUNABLES.items() if name not in have]
    return ":".join(([existing] if existing else []) + added)


def in_force() -> bool:
    """True when this process started with every tunable named in GLIBC_TUNABLES and the
    variables of :data:`START_ENV` set (radnet's values or the user's own)."""
    return (on_glibc() and set(TUNABLES) <= _set_names(os.environ.get(TUNABLES_VAR, ""))
            and all(name in os.environ for name in START_ENV))


ORIGINAL_VAR = "RADNET_START_ENV_ORIGINAL"


def original_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default: this process's) with the variables the restart added or
    changed put back as the user had them: for starting a program that is not radnet's
    (bench/torch_reference.py's PyTorch side) under its own defaults."""
    env = dict(os.environ if env is None else env)
    saved = env.pop(ORIGINAL_VAR, None)
    if saved is None:
        return env
    for name, value in json.loads(saved).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def restart_with_tunables() -> None:
    """Starts this program again (``os.execv``: same process id, arguments, working folder
    and open files) with the tunables added, unless they are in force already, the user
    said ``RADNET_HOST_MEMORY=system``, or this is not Linux/glibc. Call it first thing in a
    command line's ``main``-runner, never from library code (it replaces the process)."""
    if not wanted() or not on_glibc() or in_force():
        return
    argv = getattr(sys, "orig_argv", None)  # the interpreter's own argv (Python ≥ 3.10)
    if not argv or sys.flags.interactive or not sys.executable:
        return
    env = dict(os.environ)
    env[ORIGINAL_VAR] = json.dumps({name: env.get(name) for name in (TUNABLES_VAR, *START_ENV)})
    env[TUNABLES_VAR] = tunables(env.get(TUNABLES_VAR, ""))
    for name, value in START_ENV.items():
        env.setdefault(name, value)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)
