"""radnet's entrypoint: flags → config → task function.

    python -m radnet.main --config=configs/pretrain.py --workdir=DIR [--config.x=y ...]

``config.task`` picks the task; each task is a function ``run(config, workdir)``
in a module imported only when needed.
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from radnet import compile_cache, distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Config file, optionally with an argument: configs/x.py:key=value,... Any field of the "
    "config can then be overridden with --config.<field>=value (e.g. --config.train.batch_size=4).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for a multi-process run outside Slurm/TPU pods/Open MPI "
    "(those are detected from the environment).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with "
                                      "--coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0..num_processes-1 "
                                   "(with --coordinator_address).")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of a user error (a missing "
                           "path, a config the run cannot honour) instead of one line.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False,
    "Print the resolved config (after --config.<field>=value overrides) and the task it "
    "dispatches to, then exit without running it.")

# task name → "module:function"
TASKS = {
    "pretrain": "radnet.train.pretrain:run",
    "evaluate": "radnet.evaluate:run",
    "segment": "radnet.train.segment:run",
}


class TaskUnavailable(RuntimeError):
    """The task's code is not part of this checkout."""


def resolve_task(task: str):
    """Returns the task function, or raises TaskUnavailable naming what is missing."""
    if task not in TASKS:
        raise TaskUnavailable(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    module_name, _, function_name = TASKS[task].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise TaskUnavailable(
                f"task {task!r} is not implemented yet ({module_name} is missing)") from None
        raise
    if not hasattr(module, function_name):
        raise TaskUnavailable(
            f"task {task!r} is not implemented yet ({module_name}.{function_name} is missing)")
    return getattr(module, function_name)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    if _PRINT_CONFIG.value:
        print(config.to_json_best_effort(indent=2, sort_keys=True))
        print(f"dispatch: task {config.task!r} -> {TASKS.get(config.task, '?')}")
        return 0
    # Before any other JAX call (task modules may touch JAX at import): a no-op on one process.
    distributed.maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    compile_cache.enable_from_flags()  # before the first compilation (docs/performance.md)
    try:
        task_fn = resolve_task(config.task)
    except TaskUnavailable as e:
        print(f"radnet: {e}", file=sys.stderr)
        return 2
    logging.info("task %s, workdir %s", config.task, _WORKDIR.value)
    from radnet.train import checkpoint, loop  # noqa: PLC0415  (after distributed start-up)

    try:
        return task_fn(config, _WORKDIR.value)
    except (FileNotFoundError, NotADirectoryError, checkpoint.MismatchError,
            loop.ConfigError) as e:
        # A missing input, weights that do not fit, a config the run cannot honour: the
        # user's to fix, said in one line (the traceback with --debug).
        if _DEBUG.value:
            raise
        print(f"radnet: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    app.run(main)
