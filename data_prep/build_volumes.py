"""Included series of an index → resampled uint8 volumes in one TensorStore zarr v3 dataset.

    python -m data_prep.build_volumes --index=OUT --dicom_root=DIR --out=DATASET \\
        [--workers=N] [--shard=i/n] [--config=configs/build_volumes.py:size=64] [--overwrite]

Row i of the dataset is the i-th included row of OUT/series.csv (sorted by series_key).
Per series: pixels decoded with pydicom, rescaled per slice (per frame for enhanced
multi-frame), ordered along the slice normal, linearly resized to the configured shape
(48×192×192 by default; fewer slices → centred and padded, never stretched), min-max
normalised to uint8. A series that fails is recorded (decode_failed, spacing_too_large,
…) with split -1 and the build goes on.

Killed at any moment, the same command resumes and ends with the dataset an
uninterrupted run would have written. ``--shard=i/n`` builds every n-th series starting
at i, so n machines can build one dataset on shared storage (``--out`` may be any
TensorStore kvstore URL, e.g. gs://bucket/dataset). Layout: docs/dataset.md.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

_INDEX = flags.DEFINE_string("index", None, "Index folder written by data_prep.index (files.csv, series.csv).")
_DICOM_ROOT = flags.DEFINE_string("dicom_root", None, "Root the index's file paths are relative to.")
_OUT = flags.DEFINE_string("out", None, "Dataset path or kvstore URL (gs://…, s3://…).")
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1,
                                "Worker processes (0: build in this process).")
_SHARD = flags.DEFINE_string("shard", "0/1", "i/n: build every n-th series starting at i.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Replace a dataset built from another index or config.")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "Hide the progress bar.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, default configs/build_volumes.py; e.g. "
    "configs/build_volumes.py:size=64. Fields can be overridden: --config.min_slices=8.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    for flag in (_INDEX, _DICOM_ROOT, _OUT):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required")
    # Imported here, as a module, so worker processes unpickle the functions by name.
    from configs import build_volumes as default_config
    from data_prep import volume_builder

    config = _CONFIG.value if _CONFIG.value is not None else default_config.get_config()
    summary = volume_builder.build(
        _INDEX.value, _DICOM_ROOT.value, _OUT.value, config, workers=_WORKERS.value,
        shard=volume_builder.parse_shard(_SHARD.value), overwrite=_OVERWRITE.value,
        progress=not _NO_PROGRESS.value)
    print(json.dumps(summary, sort_keys=True))
    logging.info("done")


if __name__ == "__main__":
    app.run(main)
