"""Dask distributed, the one execution engine of the offline tools (data_prep.index,
data_prep.build_volumes).

    with cluster.engine(scheduler=None, workers=4) as eng:      # a LocalCluster of 4 processes
        for i, result in eng.map(fn, items, key="headers", secret=...):
            ...                                               # in completion order

- ``scheduler`` (``--scheduler=tcp://HOST:PORT``, else the ``DASK_SCHEDULER_ADDRESS``
  convention of dask.config): join that cluster; its workers must import radnet and
  see the archive and the output path under the same names (docs/scale.md).
- Otherwise a ``LocalCluster`` of ``workers`` processes, one thread each, started for
  the run and closed when it ends (also on error or Ctrl-C).
- ``workers=0`` and no scheduler: the same task functions in this process, one after
  another (debugging, the benchmarks' in-process reference). No Dask is imported.

A lost worker is Dask's business: the scheduler re-runs its tasks elsewhere (the
nanny of a LocalCluster restarts the process). A task that took down more workers
than the scheduler's ``distributed.scheduler.allowed-failures`` comes back as a
``WorkerDied`` value, which the caller records as a reason; nothing waits forever:
connecting has a timeout, and a cluster left without workers while no task finished for
``NO_WORKERS_TIMEOUT_S`` ends the run with a ``ClusterError``. The LocalCluster runs one
task per worker at a time and leaves glibc's malloc settings alone (see ``engine``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import uuid
from typing import Any, Callable, Iterator, Sequence

from absl import logging

CONNECT_TIMEOUT_S = 10.0       # joining a scheduler; an unreachable address fails after this
NO_WORKERS_TIMEOUT_S = 120.0   # work pending and not a single worker for this long → error
RESULT_TIMEOUT_S = 300.0       # fetching one finished task's result from its worker
CLOSE_TIMEOUT_S = 30.0
_POLL_S = 0.02                 # the client's wait between looks for finished tasks


class ClusterError(RuntimeError):
    """The cluster cannot be reached, started or kept: a one-line message for the user."""


@dataclasses.dataclass(frozen=True)
class WorkerDied:
    """The outcome of a task whose runs killed their worker process too often."""
    message: str


def exit_with_error(message: str) -> None:
    """A user's mistake (e.g. an unreachable --scheduler): one line on stderr, status 2."""
    print(f"radnet: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def define_flags(flags_module, default_workers: int, workers_help: str) -> None:
    """--workers and --scheduler, the same for every offline tool."""
    flags_module.DEFINE_integer(
        "workers", default_workers,
        f"{workers_help} processes of a LocalCluster started for the run (0: in this "
        "process, no Dask). Ignored with --scheduler.")
    flags_module.DEFINE_string(
        "scheduler", None,
        "tcp://HOST:PORT of a running Dask scheduler to run on instead (default: "
        "$DASK_SCHEDULER_ADDRESS if set); see docs/scale.md.")
    flags_module.DEFINE_float("connect_timeout_s", CONNECT_TIMEOUT_S,
                              "Seconds to reach --scheduler before giving up.")


def scheduler_address(flag: str | None = None) -> str | None:
    """``flag`` if given, else dask.config's ``scheduler-address`` (DASK_SCHEDULER_ADDRESS)."""
    if flag:
        return flag
    import dask.config
    return dask.config.get("scheduler-address", None) or None


class Engine:
    """Runs a function over items on the cluster (or in this process: ``client`` None)."""

    def __init__(self, client=None, description: str = "in this process"):
        self.client = client
        self.description = description

    @property
    def n_workers(self) -> int:
        if self.client is None:
            return 1
        return max(1, sum(self.client.nthreads().values()))

    def map(self, fn: Callable, items: Sequence, key: str = "task",
            **shared: Any) -> Iterator[tuple[int, Any]]:
        """``(i, fn(items[i], **shared))`` as tasks finish; ``WorkerDied`` for a task whose
        runs kept killing workers. Any other exception of a task is raised here (task
        functions catch what belongs to one item themselves)."""
        if self.client is None:
            for i, item in enumerate(items):
                yield i, fn(item, **shared)
            return
        yield from self._map_dask(fn, items, key, shared)

    def _map_dask(self, fn, items, key, shared):
        import distributed

        if not items:
            return
        run = uuid.uuid4().hex[:10]  # keys unique on a cluster shared by several runs
        futures = self.client.map(fn, items, key=[f"{key}-{run}-{i}" for i in range(len(items))],
                                  pure=False, **shared)
        index = {f.key: i for i, f in enumerate(futures)}
        done = distributed.as_completed(futures, loop=self.client.loop)
        del futures  # a finished task's result is released as soon as it has been read
        last_progress = next_check = time.monotonic()
        while not done.is_empty():
            batch = done.next_batch(block=False)
            if not batch:
                now = time.monotonic()
                if now > next_check:  # quiet for a while: is there still a cluster?
                    self._check_workers(last_progress)
                    next_check = now + 5.0
                time.sleep(_POLL_S)
                continue
            last_progress = next_check = time.monotonic()
            for future in batch:
                if future.status == "lost":
                    # Its result was on a worker that died before it was read: the
                    # scheduler computes it again (this client still wants it).
                    done.add(future)
                    continue
                i = index.pop(future.key)
                if future.status == "finished":
                    yield i, future.result(timeout=RESULT_TIMEOUT_S)
                elif future.status == "error":
                    err = future.exception(timeout=RESULT_TIMEOUT_S)
                    if isinstance(err, distributed.KilledWorker):
                        yield i, WorkerDied(
                            f"worker_died: the worker process died each of the "
                            f"{_allowed_failures() + 1} times this task ran")
                    else:
                        raise err
                else:  # cancelled: the scheduler went away or forgot this client
                    raise ClusterError(f"task {future.key} was {future.status}: lost the "
                                       f"Dask scheduler ({self.description})")

    def _check_workers(self, since: float) -> None:
        if self.client.status not in ("running", "connecting"):
            raise ClusterError(f"lost the Dask scheduler ({self.description})")
        if not self.client.nthreads() and time.monotonic() - since > NO_WORKERS_TIMEOUT_S:
            raise ClusterError(f"no Dask worker for {NO_WORKERS_TIMEOUT_S:g} s with work "
                               f"pending ({self.description})")

    def on_each_worker(self, fn: Callable, timeout_s: float = 120.0) -> None:
        """Runs ``fn()`` once on every current worker, as a task (the worker's task thread,
        like the work itself). Best effort: a worker lost meanwhile is skipped."""
        if self.client is None:
            fn()
            return
        import distributed

        run = uuid.uuid4().hex[:10]
        futures = [self.client.submit(fn, key=f"on-worker-{run}-{n}", workers=[addr],
                                      allow_other_workers=False, pure=False)
                   for n, addr in enumerate(self.client.nthreads())]
        try:
            for f in distributed.as_completed(futures, loop=self.client.loop, timeout=timeout_s):
                if f.status == "error":
                    logging.warning("on a worker: %s", f.exception(timeout=RESULT_TIMEOUT_S))
        except TimeoutError:
            logging.warning("not every worker answered within %g s", timeout_s)
        self.client.cancel(futures)


def _allowed_failures() -> int:
    import dask.config
    return int(dask.config.get("distributed.scheduler.allowed-failures", 3))


@contextlib.contextmanager
def engine(scheduler: str | None = None, workers: int = 0, *,
           dashboard_address: str | None = ":8787",
           connect_timeout_s: float = CONNECT_TIMEOUT_S) -> Iterator[Engine]:
    """The run's engine: joins ``scheduler`` (or DASK_SCHEDULER_ADDRESS), else starts a
    LocalCluster of ``workers`` processes, else (workers=0) runs in this process."""
    address = scheduler_address(scheduler)
    if address is None and workers <= 0:
        yield Engine()
        return
    import dask.config
    import distributed

    cluster = client = None
    try:
        if address:
            try:
                client = distributed.Client(address, timeout=connect_timeout_s,
                                            set_as_default=False)
            except (OSError, TimeoutError, ValueError) as err:
                raise ClusterError(f"cannot reach the Dask scheduler {address!r} within "
                                   f"{connect_timeout_s:g} s ({err})") from None
            description = f"scheduler {address}"
        else:
            # Processes, one thread each: header parsing and pixel decoding hold the GIL.
            # Without Dask's MALLOC_TRIM_THRESHOLD_=65536 for its workers: setting it turns
            # off glibc's adaptive mmap threshold, so every frame-sized buffer is a fresh
            # mmap and its pages fault in again (measured: 6 CT series of 96 × 512² took
            # 0.67-0.74 s of task time with it, 0.41-0.50 s without; in one process 0.42-0.52 s).
            # One task per worker at a time (no task queued on a worker): when a worker
            # dies, only the task it was running counts as suspect, so a task that kills
            # workers does not take the one queued behind it down with it (measured: with
            # the default 1.1 an innocent task was reported worker_died too).
            with dask.config.set({"distributed.nanny.pre-spawn-environ."
                                  "MALLOC_TRIM_THRESHOLD_": None,
                                  "distributed.scheduler.worker-saturation": 1.0}):
                cluster = distributed.LocalCluster(
                    n_workers=workers, processes=True, threads_per_worker=1,
                    dashboard_address=dashboard_address)
            client = distributed.Client(cluster, timeout=connect_timeout_s,
                                        set_as_default=False)
            description = f"LocalCluster of {workers} processes"
        services = client.scheduler_info().get("services", {})
        logging.info("Dask: %s, %d worker(s); dashboard: %s", description,
                     len(client.nthreads()),
                     client.dashboard_link if "dashboard" in services else "none")
        yield Engine(client, description)
    finally:
        if client is not None:
            client.close(timeout=CLOSE_TIMEOUT_S)
        if cluster is not None:
            cluster.close(timeout=CLOSE_TIMEOUT_S)
