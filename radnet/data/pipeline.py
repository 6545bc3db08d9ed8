"""Grain input pipelines: the sharded, shuffled training stream and padded evaluation batches.

Both yield dicts of NumPy arrays (B = the per-process batch size)::

    volume               uint8   [B, D, H, W]   as stored; float conversion and
                                                augmentation happen on the device
    sequence view contrast int32 [B]            class index, -1 unknown
    coverage             int32   [B, 9]         0/1, -1 unknown
    effective_spacing_mm float32 [B]            NaN unknown
    index                int32   [B]            dataset row (manifest.csv row)
    mask                 bool    [B]            eval_batches only: False on padding

How a training epoch is shared out (see docs/input_pipeline.md):
the positions 0..N-1 of the split are permuted with a per-epoch seed (the same on
every process), epochs are concatenated into one global stream, and process p
takes stream elements p, p+P, p+2P, ...; each of its batches is B consecutive
elements of its share. Every element of every epoch therefore goes to exactly one
process, none twice, none skipped. A batch may hold the end of one epoch and the
start of the next: with an unbounded stream (``num_epochs=None``) nothing is
dropped ever. With ``num_epochs=E`` the stream is cut to a whole number of
global batches (P × B) when ``drop_remainder`` is set, so every process yields
the same number of batches (collectives would hang otherwise); at most P×B−1
samples of the last epoch are left out, and the log says how many.
"""

from __future__ import annotations

from typing import Iterator

import grain
import numpy as np
from absl import flags, logging

from radnet.data import source as source_lib

# Spreads user seeds over 32 bits: Grain seeds epoch e's permutation with
# seed + e, so raw seeds 0 and 1 would share all but one epoch's order.
_SEED_SALT = 0x7AD7E7


def _process_index_and_count(process_index: int | None,
                             process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # deferred: importing the data package must not start JAX.
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return int(process_index), int(process_count)


def _shuffle_seed(seed: int) -> int:
    return int(np.random.SeedSequence([int(seed), _SEED_SALT]).generate_state(1)[0])


class _ReadBatch(grain.transforms.Map):
    """Positions [b] → batch dict, through the source's concurrent batched read.

    In a Grain worker (``shared_memory``) the volumes are decoded straight into
    shared memory: Grain passes a SharedMemoryArray to the main process by name,
    where a plain array would be copied into shared memory once more (that copy
    halved the per-worker throughput in bench/loader.py).
    """

    def __init__(self, source: source_lib.ZarrVolumeSource, shared_memory: bool):
        self._source = source
        self._shared_memory = shared_memory

    def map(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        out = None
        if self._shared_memory and len(positions):
            out = grain.multiprocessing.SharedMemoryArray(
                (len(positions), *self._source.volume_shape), np.uint8)
        return self._source.read(positions, volume_out=out)


def train_iterator(dataset_path: str, *, split: str = "train", batch_size: int, seed: int,
                   shuffle: bool = True, num_epochs: int | None = None, worker_count: int = 0,
                   prefetch_buffer: int = 2, process_index: int | None = None,
                   process_count: int | None = None,
                   drop_remainder: bool = True) -> grain.DatasetIterator:
    """The training stream of this process: a checkpointable Grain iterator of batches.

    Args:
      dataset_path: dataset written by ``radnet.data.schema`` / ``data_prep.build_volumes``.
      split: rows whose split array equals this split are used; all others skipped.
      batch_size: per-process batch size B (the global batch is P × B).
      seed: shuffling seed; the same on every process (each epoch gets its own order).
      shuffle: False streams the split in row order (for debugging and tests).
      num_epochs: None repeats forever; E stops after E epochs.
      worker_count: Grain worker processes (``mp_prefetch``); 0 reads in this process.
      prefetch_buffer: batches read ahead, per reading process.
      process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
      drop_remainder: with finite epochs, cut the stream to whole global batches
        (every process yields the same count); False keeps a smaller last batch
        on each process (single-process use only: counts may then differ).

    Returns:
      A ``grain.DatasetIterator``; its ``get_state``/``set_state`` and
      ``grain.checkpoint.CheckpointSave``/``CheckpointRestore`` resume the same order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None or positive, got {num_epochs}")
    if worker_count < 0 or prefetch_buffer < 1:
        raise ValueError(f"need worker_count >= 0 and prefetch_buffer >= 1, got "
                         f"{worker_count}, {prefetch_buffer}")
    process_index, process_count = _process_index_and_count(process_index, process_count)
    data_copy, file_io = source_lib.concurrency_limits(max(1, worker_count))
    src = source_lib.ZarrVolumeSource(dataset_path, split, data_copy_concurrency=data_copy,
                                      file_io_concurrency=file_io)
    num_rows = len(src)

    positions = grain.MapDataset.range(num_rows)
    if shuffle:
        positions = positions.shuffle(seed=_shuffle_seed(seed))
    # repeat() after shuffle: each epoch is permuted with its own seed.
    positions = positions.repeat(num_epochs)
    global_batch = process_count * batch_size
    if num_epochs is not None:
        total = len(positions)
        if drop_remainder:
            kept = total // global_batch * global_batch
            if kept == 0:
                raise ValueError(
                    f"{num_epochs} epoch(s) of {num_rows} {split} rows do not fill one global "
                    f"batch of {global_batch} ({process_count} processes × {batch_size})")
            if kept < total:
                logging.info("train_iterator: %d of %d samples of the last epoch dropped "
                             "(not a whole global batch of %d)", total - kept, total, global_batch)
            positions = positions[:kept]
    positions = positions[process_index::process_count]
    batches = positions.batch(batch_size, drop_remainder=drop_remainder).map(
        _ReadBatch(src, shared_memory=worker_count > 0))
    logging.info("train_iterator: %s split=%s rows=%d process %d/%d batch %d workers %d",
                 dataset_path, split, num_rows, process_index, process_count, batch_size,
                 worker_count)

    stream = batches.to_iter_dataset(grain.ReadOptions(num_threads=prefetch_buffer,
                                                       prefetch_buffer_size=prefetch_buffer))
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():
            # Grain's worker start reads its absl flags; outside an absl app
            # (notebooks, pytest, bench scripts) nothing has parsed them, so take
            # their defaults rather than fail. Inside radnet.main they are parsed.
            flags.FLAGS.mark_as_parsed()
        stream = stream.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=prefetch_buffer))
    return iter(stream)


def num_eval_batches(num_rows: int, batch_size: int, process_count: int) -> int:
    """Batches each process yields to cover ``num_rows`` once: ceil(N / (P × B))."""
    return -(-num_rows // (batch_size * process_count))


class _ReadPaddedBatch(grain.transforms.Map):
    """Global-batch number k → this process's padded batch of it."""

    def __init__(self, source: source_lib.ZarrVolumeSource, batch_size: int,
                 process_index: int, process_count: int):
        self._source = source
        self._batch_size = batch_size
        self._process_index = process_index
        self._process_count = process_count

    def map(self, k: int) -> dict[str, np.ndarray]:
        b = self._batch_size
        start = (int(k) * self._process_count + self._process_index) * b
        wanted = np.arange(start, start + b)
        mask = wanted < len(self._source)
        real = self._source.read(wanted[mask])
        # Padding carries the dataset's "unknown" values (label -1, spacing NaN)
        # as well as mask False, so a loss that masks unknown labels ignores it too.
        out = {}
        for name, values in real.items():
            fill = np.nan if values.dtype.kind == "f" else (0 if name == "volume" else -1)
            padded = np.full((b, *values.shape[1:]), fill, dtype=values.dtype)
            padded[mask] = values
            out[name] = padded
        out["mask"] = mask
        return out


def eval_batches(dataset_path: str, *, split: str, batch_size: int,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Every row of ``split`` exactly once across processes, in row order, padded.

    Global batch k holds positions k·P·B … (k+1)·P·B − 1; process p gets its
    slice p·B … (p+1)·B − 1 of it. Positions past the split's end are padding
    (``mask`` False, volume zeros, labels -1, spacing NaN, index -1). Every
    process yields ``num_eval_batches(N, B, P)`` batches, the same count, so
    collectives in the evaluation step line up.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    process_index, process_count = _process_index_and_count(process_index, process_count)
    src = source_lib.ZarrVolumeSource(dataset_path, split)
    count = num_eval_batches(len(src), batch_size, process_count)
    batches = grain.MapDataset.range(count).map(
        _ReadPaddedBatch(src, batch_size, process_index, process_count))
    return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))
