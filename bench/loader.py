"""How fast the Grain pipeline streams volumes out of the Zarr dataset, for W workers.

    python bench/loader.py                               # zstd, W = 0, 1, 2
    python bench/loader.py --codecs=zstd,blosc-lz4,raw --workers=0,1,2,4

Writes a synthetic dataset of full-size 48×192×192 uint8 volumes with CT-like,
realistically compressible content (air at 0, a body ellipse with organ
ellipsoids, smooth shading and acquisition noise) to --out_dir, then runs
``radnet.data.pipeline.train_iterator`` over it and prints one JSON line per
(codec, W): volumes/s and MB/s delivered (uncompressed uint8, what the
training step receives) and MB/s read (compressed, from storage).

The dataset was just written, so it is read from the page cache: the figures are
the decode + copy + IPC cost of the pipeline, the part that needs CPU cores;
storage bandwidth (network file systems, gs://) is a separate limit.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from radnet import labels  # noqa: E402
from radnet.data import pipeline, schema, source  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", "/tmp/radnet_bench_loader", "where the synthetic datasets go")
flags.DEFINE_integer("num_volumes", 96, "volumes in the synthetic dataset (1.77 MB each raw)")
flags.DEFINE_list("codecs", ["zstd"], f"chunk codecs to measure ({', '.join(schema.CODECS)})")
flags.DEFINE_list("workers", ["0", "1", "2"], "Grain worker counts to measure")
flags.DEFINE_integer("batch_size", 8, "per-process batch size")
flags.DEFINE_integer("num_batches", 36, "batches timed per setting (after the first)")
flags.DEFINE_bool("rebuild", False, "rewrite the datasets even when present")
flags.DEFINE_integer("repeats", 3, "runs per setting; the median and best are printed "
                     "(shared machines are noisy)")


def synthetic_volume(rng: np.random.Generator, shape=schema.VOLUME_SHAPE) -> np.ndarray:
    """One CT-like uint8 volume [D, H, W]: air 0, body ~soft tissue, organs, bone, noise."""
    d, h, w = shape
    z, y, x = np.meshgrid(np.linspace(-1, 1, d), np.linspace(-1, 1, h), np.linspace(-1, 1, w),
                          indexing="ij")
    body_r = rng.uniform(0.7, 0.95, 2)
    body = (y / body_r[0]) ** 2 + (x / body_r[1]) ** 2 < 1.0
    vol = np.where(body, 110.0 + 10 * y, 0.0)  # soft tissue with a smooth gradient
    for _ in range(rng.integers(3, 7)):  # organs: ellipsoids of other densities
        c = rng.uniform(-0.5, 0.5, 3)
        r = rng.uniform(0.15, 0.4, 3)
        organ = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 < 1
        vol = np.where(organ & body, rng.uniform(60, 160), vol)
    spine = ((y - 0.55 * body_r[0]) / 0.12) ** 2 + (x / 0.1) ** 2 < 1  # bright bone column
    vol = np.where(spine & body, 230.0, vol)
    vol = vol + np.where(body, rng.normal(0.0, 4.0, shape), 0.0)  # quantum noise in tissue
    return np.clip(np.rint(vol), 0, 255).astype(np.uint8)


def build(path: Path, codec: str, num_volumes: int) -> None:
    arrays = schema.create(str(path), num_volumes, codec=codec)
    rng = np.random.default_rng(0)
    for i in range(num_volumes):
        arrays["volume"][i].write(synthetic_volume(rng)).result()
    arrays["split"].write(np.full(num_volumes, labels.split_index("train"), np.int8)).result()
    arrays["sequence"].write(np.zeros(num_volumes, np.int8)).result()


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in (Path(schema.zarr_root(str(path))) / "volume").rglob("*")
               if f.is_file())


def measure(path: str, workers: int) -> dict:
    start = time.perf_counter()
    it = pipeline.train_iterator(path, batch_size=FLAGS.batch_size, seed=0,
                                 worker_count=workers, prefetch_buffer=2,
                                 process_index=0, process_count=1)
    first = next(it)
    first_batch_s = time.perf_counter() - start
    start = time.perf_counter()
    volumes = 0
    for _ in range(FLAGS.num_batches):
        volumes += len(next(it)["index"])
    seconds = time.perf_counter() - start
    it.close()
    return {"volumes": volumes, "seconds": seconds, "first_batch_s": first_batch_s,
            "volume_bytes": first["volume"][0].nbytes}


def main(argv):
    del argv
    out_dir = Path(FLAGS.out_dir)
    for codec in FLAGS.codecs:
        path = out_dir / codec
        if FLAGS.rebuild or not (Path(schema.zarr_root(str(path))) / "zarr.json").exists() or \
                schema.read_attributes(str(path)).get("codec") != codec:
            build(path, codec, FLAGS.num_volumes)
        on_disk = disk_bytes(path)
        raw = FLAGS.num_volumes * int(np.prod(schema.VOLUME_SHAPE))
        for w in (int(x) for x in FLAGS.workers):
            runs = [measure(str(path), w) for _ in range(FLAGS.repeats)]
            rates = sorted(r["volumes"] / r["seconds"] for r in runs)
            rate, best = float(np.median(rates)), rates[-1]
            volume_mb = runs[0]["volume_bytes"] / 1e6
            print(json.dumps({
                "bench": "loader", "codec": codec, "workers": w, "batch_size": FLAGS.batch_size,
                "volume_shape": list(schema.VOLUME_SHAPE),
                "volumes_per_s": round(rate, 2), "volumes_per_s_best": round(best, 2),
                "mb_per_s_delivered": round(rate * volume_mb, 1),
                "mb_per_s_delivered_best": round(best * volume_mb, 1),
                "mb_per_s_read": round(rate * on_disk / FLAGS.num_volumes / 1e6, 1),
                "compression_ratio": round(raw / on_disk, 2),
                "first_batch_s": round(float(np.median([r["first_batch_s"] for r in runs])), 2),
                "tensorstore_data_copy_concurrency": source.concurrency_limits(max(1, w))[0],
                "cores": source.available_cores(),
                "load_average_1min": round(os.getloadavg()[0], 2),
                "timed_volumes_per_run": runs[0]["volumes"], "repeats": FLAGS.repeats,
            }), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    app.run(main)
