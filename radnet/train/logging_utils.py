"""Metrics of a run: JSONL file, TensorBoard events, console lines. Process 0 writes."""

from __future__ import annotations

import json
import math
import os
import time

import jax
from absl import logging

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Appends ``{"step": s, "split": ..., name: value}`` lines to WORKDIR/metrics.jsonl and
    the same scalars to TensorBoard (tensorboardX) under ``split/name``."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self._file = None
        self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(os.path.join(workdir, METRICS_FILE), "a")
        if tensorboard:
            from tensorboardX import SummaryWriter  # heavy import, only when writing
            self._tb = SummaryWriter(logdir=workdir)

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": int(step), "split": split, **clean},
                                    sort_keys=True, allow_nan=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in clean.items():
                if math.isfinite(value):
                    self._tb.add_scalar(f"{split}/{name}", value, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str) -> list[dict]:
    """All lines of WORKDIR/metrics.jsonl (for tests, notebooks and reports)."""
    path = os.path.join(workdir, METRICS_FILE)
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Throughput:
    """Steps/s and volumes/s over the interval since the previous report; the ETA from the
    steady-state step time: the mean over every interval after the first, which holds the
    compilation (counting it made the first ETA twice the real time on CPU). Until a second
    report there is no steady state to go by, and the ETA is unknown ("?")."""

    def __init__(self, global_batch_size: int, total_steps: int, start_step: int):
        self.global_batch_size = global_batch_size
        self.total_steps = total_steps
        self._last_step = start_step
        self._last_time = time.perf_counter()
        self._steady_since: tuple[int, float] | None = None  # (step, time) after warm-up

    def report(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps = step - self._last_step
        elapsed = max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        steps_per_s = steps / elapsed
        eta_s = float("inf")
        if self._steady_since is None:
            self._steady_since = (step, now)
        elif step > self._steady_since[0]:
            steady_rate = (step - self._steady_since[0]) / max(now - self._steady_since[1], 1e-9)
            eta_s = (self.total_steps - step) / steady_rate
        return {"steps_per_s": steps_per_s,
                "volumes_per_s": steps_per_s * self.global_batch_size,
                "eta_s": eta_s}


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def console(step: int, total: int, loss: float, rates: dict[str, float]) -> None:
    if jax.process_index() != 0:
        return
    logging.info("step %d/%d  loss %.4f  %.2f steps/s  %.1f volumes/s  ETA %s",
                 step, total, loss, rates["steps_per_s"], rates["volumes_per_s"],
                 format_eta(rates["eta_s"]))


class _DropOrbaxInfo:
    """absl log filter: drops INFO records of Orbax (dozens per save and restore)."""

    def filter(self, record) -> bool:
        import logging as py_logging  # noqa: PLC0415

        return record.levelno > py_logging.INFO or "/orbax/" not in record.pathname


def quiet_orbax() -> None:
    """Keeps Orbax's INFO lines out of the run's log (once per process)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _DropOrbaxInfo) for f in handler.filters):
        handler.addFilter(_DropOrbaxInfo())
