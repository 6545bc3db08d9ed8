"""The one way radnet runs a model over a split: pad, mask, shard, jit, all-gather.

Validation during training, the Table 1 report, segmentation evaluation and proposal
scoring all stream their inputs through ``predict``. Its input is this process's batches,
each with a ``mask`` (False on padding rows) — from the Grain evaluation pipeline
(``radnet.data.pipeline.eval_batches``) or from ``padded_batches`` over any list of items —
and every process must yield the same number of batches. Each batch becomes one global
array over the mesh's batch axes, the jitted step runs on it, and its per-row outputs (with
the batch keys asked for) are gathered to every process with the padding rows dropped.

Global batch k holds items ``k·P·B … (k+1)·P·B − 1`` (P processes, B rows each); process
p reads rows ``p·B … (p+1)·B − 1`` of it. So every item is predicted exactly once whatever
the number of processes and devices, and the gathered rows come back in item order.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

MASK = "mask"
POSITION = "position"   # padded_batches: the item's index in the list (-1 on padding)


def local_batch_size(global_batch: int, process_count: int, local_devices: int) -> int:
    """This process's share of a global batch, rounded up to a multiple of its devices
    (the data axis must divide it; the extra rows are padding and masked)."""
    share = -(-max(1, int(global_batch)) // process_count)
    return -(-share // local_devices) * local_devices


def padded_batches(items: Sequence[Any], read: Callable[[Any], dict[str, np.ndarray]],
                   batch_size: int, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """This process's padded batches over ``items`` (the same list on every process).

    ``read(item)`` → dict of arrays for one row. Padding rows repeat the shapes of a real
    row with zeros; ``mask`` marks real rows and ``position`` holds each row's index in
    ``items`` (-1 on padding). Every process yields ``ceil(N / (P·B))`` batches.
    """
    if not items:
        return
    per_global = batch_size * process_count
    template = None
    for first in range(0, len(items), per_global):
        start = first + process_index * batch_size
        rows, positions = [], []
        for i in range(start, start + batch_size):
            if i < len(items):
                rows.append(read(items[i]))
                positions.append(i)
        if template is None:
            template = {k: np.zeros_like(v) for k, v in (rows[0] if rows else read(items[0])).items()}
        pad = batch_size - len(rows)
        batch = {k: np.stack([r[k] for r in rows] + [template[k]] * pad) for k in template}
        batch[MASK] = np.arange(batch_size) < len(rows)
        batch[POSITION] = np.asarray(positions + [-1] * pad, np.int32)
        yield batch


def predict(step: Callable, variables, batches: Iterable[dict[str, np.ndarray]],
            batch_sharding, *, device_keys: Sequence[str],
            gather_keys: Sequence[str] = ()
            ) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray], Any]]:
    """Runs ``step`` over every batch; yields ``(outputs, gathered, sums)`` per global batch.

    Args:
      step: jitted ``step(variables, device_batch) -> (per_row_outputs, sums)``; the per-row
        outputs have the batch as leading dimension, ``sums`` (any pytree, may be ``{}``)
        are statistics the step already reduced over the batch (masking padding itself).
      batches: this process's batches, each with ``mask``.
      batch_sharding: the batch-axis sharding of the mesh the step is compiled for.
      device_keys: batch keys the step receives (``mask`` is always added).
      gather_keys: batch keys (labels, positions) to return alongside the outputs.

    Yields:
      ``outputs`` and ``gathered`` (the ``gather_keys`` of the batch): NumPy arrays of the
      real rows of the global batch, the same on every process; ``sums``: the step's
      reduced statistics (device arrays).
    """
    import jax  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    def to_global(local):
        return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local[k]))
                for k in {*device_keys, *gather_keys, MASK}}

    def fetch(pending):
        outputs, kept = pending
        # Every process gathers the global batch's outputs and labels.
        host_outputs, host_kept = multihost_utils.process_allgather((outputs, kept), tiled=True)
        real = np.asarray(host_kept[MASK], bool)
        return ({k: np.asarray(v)[real] for k, v in host_outputs.items()},
                {k: np.asarray(v)[real] for k, v in host_kept.items() if k != MASK})

    pending = None
    for local in batches:
        batch = to_global(local)
        outputs, sums = step(variables, {k: batch[k] for k in (*device_keys, MASK)})
        kept = {k: batch[k] for k in (*gather_keys, MASK)}
        # Fetch the previous batch while this one computes: the device never waits on the
        # host copy.
        if pending is not None:
            yield *fetch(pending[:2]), pending[2]
        pending = (outputs, kept, sums)
    if pending is not None:
        yield *fetch(pending[:2]), pending[2]
