"""A Grain random-access source over the TensorStore (zarr v3) dataset.

The source holds the *positions* of one split: position ``p`` is dataset row
``rows[p]``. Labels are small (a few bytes per volume), so they are read once
when the source is built and travel with it in memory; the volume array is
large, so it is opened lazily, once per process, on the first read. Pickling
drops the open handle, which is what lets Grain's ``mp_prefetch`` ship the
source to spawned worker processes: each worker opens its own TensorStore with
its own concurrency limits.

Elements are dicts of NumPy arrays (see ``read``), volumes stay uint8: the
conversion to float happens on the device, so a quarter of the bytes cross
the host-to-device link.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from radnet import labels
from radnet.data import schema

# Per-sample label fields of a batch, their output dtype and the trailing shape.
LABEL_FIELDS: dict[str, tuple[type, tuple[int, ...]]] = {
    "sequence": (np.int32, ()),
    "view": (np.int32, ()),
    "contrast": (np.int32, ()),
    "coverage": (np.int32, (len(labels.COVERAGE),)),
    "effective_spacing_mm": (np.float32, ()),
}


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def concurrency_limits(num_processes: int) -> tuple[int, int]:
    """(data_copy_concurrency, file_io_concurrency) for each of ``num_processes`` readers.

    TensorStore sizes its decode pool to the machine's cores by default, per
    process: with W Grain workers that is W × cores decode threads fighting for
    the same cores. Dividing the cores between the readers keeps the total at
    the core count. File I/O waits more than it computes, so it gets a few
    more threads than cores.
    """
    cores = available_cores()
    data_copy = max(1, cores // max(1, num_processes))
    return data_copy, max(2, 2 * data_copy)


def split_rows(dataset_path: str, split: str, context: ts.Context | None = None):
    """(rows, labels): dataset rows whose split is ``split`` (ascending) and all labels.

    Rows with split -1 (not buildable) or another split are skipped.
    """
    if split not in labels.SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {labels.SPLITS}")
    all_labels = schema.read_labels(dataset_path, context=context)
    rows = np.flatnonzero(all_labels["split"] == labels.split_index(split)).astype(np.int64)
    return rows, all_labels


class ZarrVolumeSource:
    """Random-access source of one split: ``source[p]`` → one sample (a dict).

    Implements Grain's ``RandomAccessDataSource`` (``__len__``, ``__getitem__``)
    and its batched-read extension ``_getitems``, which issues the reads of a
    whole batch at once so TensorStore decodes the chunks in parallel.

    Args:
      dataset_path: a dataset written by ``radnet.data.schema`` (path or kvstore URL).
      split: 'train', 'val' or 'test'.
      data_copy_concurrency, file_io_concurrency: TensorStore thread limits of
        each process that reads (None: ``concurrency_limits(1)``); pipelines
        with W workers pass ``concurrency_limits(W)``.
    """

    def __init__(self, dataset_path: str, split: str, *,
                 data_copy_concurrency: int | None = None,
                 file_io_concurrency: int | None = None):
        self.dataset_path = dataset_path
        self.split = split
        default_copy, default_io = concurrency_limits(1)
        self.data_copy_concurrency = int(data_copy_concurrency or default_copy)
        self.file_io_concurrency = int(file_io_concurrency or default_io)
        self.rows, all_labels = split_rows(dataset_path, split)
        if len(self.rows) == 0:
            raise ValueError(f"{dataset_path} has no rows in split {split!r} "
                             f"(split array values: {np.unique(all_labels['split']).tolist()})")
        self.labels = {name: all_labels[name][self.rows].astype(dtype)
                       for name, (dtype, _) in LABEL_FIELDS.items()}
        self.volume_shape = tuple(int(s) for s in schema.read_attributes(dataset_path)["volume_shape"])
        self._volume = None
        self._lock = threading.Lock()

    # -- pickling: no open handles cross process boundaries ----------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_volume"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _volume_store(self) -> ts.TensorStore:
        if self._volume is None:
            with self._lock:  # Grain reads from several threads; open once.
                if self._volume is None:
                    context = ts.Context({
                        "data_copy_concurrency": {"limit": self.data_copy_concurrency},
                        "file_io_concurrency": {"limit": self.file_io_concurrency},
                        # Every volume is read once per epoch: a chunk cache would
                        # only hold bytes that are never asked for again.
                        "cache_pool": {"total_bytes_limit": 0},
                    })
                    self._volume = schema.open_arrays(
                        self.dataset_path, names=("volume",), context=context)["volume"]
        return self._volume

    # -- RandomAccessDataSource ---------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:  # Grain logs the source's repr; keep it short and PHI-free.
        return f"ZarrVolumeSource({self.dataset_path!r}, split={self.split!r}, n={len(self)})"

    def __getitem__(self, position: int) -> dict[str, np.ndarray]:
        batch = self.read(np.asarray([position]))
        return {k: v[0] for k, v in batch.items()}

    def _getitems(self, positions: Sequence[int]) -> list[dict[str, np.ndarray]]:
        batch = self.read(np.asarray(positions))
        return [{k: v[i] for k, v in batch.items()} for i in range(len(positions))]

    def read(self, positions: np.ndarray, volume_out: np.ndarray | None = None
             ) -> dict[str, np.ndarray]:
        """Positions [b] → a batch: volume uint8 [b, D, H, W], labels [b, ...], index int32 [b].

        The b chunks are read by one TensorStore call, so they are fetched and
        decoded concurrently (within the process's limits), straight into
        ``volume_out`` when given (e.g. a shared-memory array a Grain worker
        hands to the main process without another copy).
        """
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"positions out of range [0, {len(self)}): {positions.tolist()}")
        rows = self.rows[positions]
        store = self._volume_store()
        shape = (len(rows), *self.volume_shape)
        if volume_out is None:
            volume_out = np.empty(shape, dtype=np.uint8)
        elif volume_out.shape != shape or volume_out.dtype != np.uint8:
            raise ValueError(f"volume_out must be uint8 {shape}, got {volume_out.dtype} "
                             f"{volume_out.shape}")
        if len(rows):
            # One copy over an index array into a view of the caller's buffer:
            # the b chunks are decoded concurrently and land in place.
            ts.array(volume_out, copy=False).write(store[rows.tolist()]).result()
        volume = volume_out
        out = {"volume": volume}
        for name in LABEL_FIELDS:
            out[name] = self.labels[name][positions]
        out["index"] = rows.astype(np.int32)
        return out
