"""The volume build (``python -m data_prep.build_volumes``): included series of an index → resampled uint8 volumes in one TensorStore zarr v3 dataset.

    python -m data_prep.build_volumes --index=OUT --dicom_root=DIR --out=DATASET \\
        [--workers=N | --scheduler=tcp://HOST:PORT] [--config=configs/build_volumes.py:size=64] [--overwrite]
        [--[no]progress]

Row i of the dataset is the i-th included row of OUT/series.csv (sorted by series_key).
Per series: pixels decoded with pydicom, rescaled per slice (per frame for enhanced
multi-frame), ordered along the slice normal, linearly resized to the configured shape
(48×192×192 by default; fewer slices → centred and padded, never stretched), min-max
normalised to uint8. A series that fails is recorded (decode_failed, spacing_too_large,
invalid_rescale, constant_volume, too_large, worker_died,
…) with split -1 and the build goes on.

Series are Dask tasks (data_prep/cluster.py): on a LocalCluster of ``--workers``
processes started for the run, or on a running cluster (``--scheduler``; docs/scale.md),
whose workers write their chunks straight to ``--out`` (a shared file system or any
TensorStore kvstore URL, e.g. gs://bucket/dataset). Killed at any moment (the command,
or one worker), the same command resumes and ends with the dataset an uninterrupted run
would have written. Layout: docs/dataset.md.

Modules: builder (series tasks, done markers, finalize; the per-series pixel
work is radnet.preprocess), cli (the command line).
"""

