"""Where should augmentation run: on the device inside the step, or in Grain workers?

    python bench/augment.py                    # batch 8 of 48×192×192, W = 1, 2
    python bench/augment.py --batch_size=4 --workers=1

Both modes stream the same uint8 batches through a Grain pipeline with W
worker processes (``mp_prefetch``) and end with an augmented float32
[B, D, H, W, 1] batch on the JAX device:

* ``device``: workers send uint8; the consumer runs the jitted
  ``to_unit_float`` + ``radnet.data.augment.augment`` on the device.
* ``workers``: workers run ``to_unit_float`` + ``augment_numpy`` and send
  float32 (4× the bytes); the consumer only copies it to the device.

Also prints the per-batch cost of each augmentation alone (one NumPy core vs
the jitted function on this machine's JAX device). One JSON line per measurement.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from radnet.data import augment as aug  # noqa: E402
from radnet.data import schema, source  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 8, "volumes per batch")
flags.DEFINE_list("workers", ["1", "2"], "Grain worker counts")
flags.DEFINE_integer("num_batches", 12, "batches timed per setting (after the first)")


def _base_batch(batch_size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (batch_size, *schema.VOLUME_SHAPE), dtype=np.uint8)


class _MakeBatch(grain.transforms.Map):
    """Stands in for the Zarr read, so only the augmentation cost differs between modes."""

    def __init__(self, batch_size: int):
        self._batch_size = batch_size
        self._base = None

    def map(self, i):
        if self._base is None:
            self._base = _base_batch(self._batch_size)
        return {"volume": np.roll(self._base, int(i), axis=0)}


class _AugmentInWorker(grain.transforms.RandomMap):
    def __init__(self, config):
        self._config = config

    def random_map(self, batch, rng):
        volume = aug.to_unit_float(batch["volume"], xp=np)
        return {"volume": aug.augment_numpy(rng, volume, self._config)}


def _stream(mode: str, workers: int, config):
    ds = grain.MapDataset.range(1_000_000).map(_MakeBatch(FLAGS.batch_size))
    if mode == "workers":
        ds = ds.random_map(_AugmentInWorker(config), seed=0)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    it_ds = it_ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=2))
    return iter(it_ds)


def _time(fn, n):
    fn()  # compile / warm up
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main(argv):
    del argv
    config = aug.default_augment_config()
    b = FLAGS.batch_size
    on_device = jax.jit(lambda rng, v: aug.augment(rng, aug.to_unit_float(v), config))
    batch = _base_batch(b)
    device_batch = jax.device_put(batch)
    keys = iter(jax.random.split(jax.random.key(0), 10_000))
    numpy_rng = np.random.default_rng(0)
    common = {"bench": "augment", "batch_size": b, "volume_shape": list(schema.VOLUME_SHAPE),
              "device": str(jax.devices()[0].platform), "cores": source.available_cores()}

    s_dev = _time(lambda: on_device(next(keys), device_batch).block_until_ready(), 5)
    s_np = _time(lambda: aug.augment_numpy(numpy_rng, aug.to_unit_float(batch, xp=np), config), 3)
    print(json.dumps({**common, "mode": "alone", "device_s_per_batch": round(s_dev, 4),
                      "numpy_one_core_s_per_batch": round(s_np, 4),
                      "numpy_over_device": round(s_np / s_dev, 2)}), flush=True)

    for workers in (int(w) for w in FLAGS.workers):
        for mode in ("device", "workers"):
            it = _stream(mode, workers, config)

            def step():
                volume = next(it)["volume"]
                if mode == "device":
                    return on_device(next(keys), volume).block_until_ready()
                return jax.device_put(volume).block_until_ready()

            seconds = _time(step, FLAGS.num_batches)
            it.close()
            print(json.dumps({**common, "mode": mode, "workers": workers,
                              "s_per_batch": round(seconds, 4),
                              "volumes_per_s": round(b / seconds, 2),
                              "bytes_per_voxel_to_device": 4 if mode == "workers" else 1}),
                  flush=True)


if __name__ == "__main__":
    app.run(main)
