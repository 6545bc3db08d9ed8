"""radnet's entrypoint: flags → config → task function.

    python -m radnet.main --config=configs/pretrain.py --workdir=DIR [--config.x=y ...]
    python -m radnet.main --config=configs/pretrain.py:tiny --print_config   # no run, no workdir

``config.task`` picks the task; each task is a function ``run(config, workdir)``
in a module imported only when needed. Mistakes end in one line and exit status 2
(--debug: the traceback); -v 1 shows the libraries' INFO lines.
"""

from __future__ import annotations

import ast
import glob
import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from radnet import cli, compile_cache, distributed

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
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False,
    "Print the resolved config (after --config.<field>=value overrides) and the task it "
    "dispatches to, then exit without running it (no --workdir needed).")

# task name → "module:function"
TASKS = {
    "pretrain": "radnet.train.pretrain:run",
    "evaluate": "radnet.evaluate:run",
    "segment": "radnet.train.segment:run",
    "detect": "radnet.train.detect:run",
    "predict": "radnet.archive:run",
    "slicegroups": "radnet.train.slicegroups:run",
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


def _config_files() -> list[str]:
    """The config files a user can pass: configs/*.py of the working directory, else of the
    checkout this package lives in (radnet never imports them; it only lists them)."""
    for root in ("configs", os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")):
        found = sorted(p for p in glob.glob(os.path.join(root, "*.py"))
                       if not os.path.basename(p).startswith(("_", "common")))
        if found:
            return [os.path.relpath(p) if not os.path.relpath(p).startswith("..") else p
                    for p in found]
    return []


def _first_doc_line(path: str) -> str:
    try:
        with open(path) as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError):
        return ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def usage() -> str:
    """--help: how to call, the tasks and the config files."""
    tasks = "\n".join(f"  {name:<12} {TASKS[name]}" for name in sorted(TASKS))
    configs = "\n".join(f"  {p:<28} {_first_doc_line(p)}" for p in _config_files())
    return (f"{__doc__}\ntasks (config.task → module:function):\n{tasks}\n\n"
            f"config files (--config=FILE[:key=value,...]; 'tiny' shrinks any of them):\n"
            f"{configs or '  (none found under ./configs)'}\n")


# Config fields holding a local path that config.json should record absolutely (a relative
# path means nothing once the run directory is read from elsewhere).
PATH_FIELDS = ("dataset", "checkpoint", "pretrained.workdir", "proposal.path")


def absolute_paths(config) -> None:
    """Makes the existing local paths of ``PATH_FIELDS`` absolute, in place; URLs
    (gs://, s3://) and paths that do not exist (their error then says them as typed) stay."""
    for field in PATH_FIELDS:
        parent, _, key = field.rpartition(".")
        node = config
        for part in filter(None, parent.split(".")):
            node = node.get(part) if hasattr(node, "get") else None
        value = node.get(key) if hasattr(node, "get") else None
        if isinstance(value, str) and value and "://" not in value and os.path.exists(value):
            node[key] = os.path.abspath(value)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/pretrain.py "
                             "(python -m radnet.main --help lists the config files)")
    if _PRINT_CONFIG.value:
        print(config.to_json_best_effort(indent=2, sort_keys=True))
        print(f"dispatch: task {config.task!r} -> {TASKS.get(config.task, '?')}")
        return 0
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (the folder for checkpoints, logs and "
                             "reports)")
    if config.task not in TASKS:
        cli.fail(f"unknown task {config.task!r}; known tasks: {', '.join(sorted(TASKS))}",
                 f"config.task of --config={config_flags.get_config_filename(flags.FLAGS['config'])}")
    absolute_paths(config)
    # Before any other JAX call (task modules may touch JAX at import): a no-op on one process.
    distributed.maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    compile_cache.enable_from_flags()  # before the first compilation (docs/performance.md)
    try:
        task_fn = resolve_task(config.task)
    except TaskUnavailable as e:
        cli.fail(str(e))
    logging.debug("task %s, workdir %s", config.task, _WORKDIR.value)  # (-v 1)
    from radnet.train import checkpoint, loop  # noqa: PLC0415  (after distributed start-up)

    # A missing input, weights that do not fit, a config the run cannot honour: the user's to
    # fix, said in one line (the traceback with --debug).
    with cli.user_errors(checkpoint.MismatchError, loop.ConfigError):
        return task_fn(config, _WORKDIR.value)


if __name__ == "__main__":
    __doc__ = usage()  # absl's --help prints the main module's docstring
    cli.run(main, keep_host_memory=True)
