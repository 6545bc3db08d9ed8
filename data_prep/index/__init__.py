"""Index a DICOM archive: read every header once, group slices into series, mine labels.

    python -m data_prep.index --dicom_root=DIR --out=OUT [--workers=N | --scheduler=tcp://HOST:PORT] \\
        [--[no]progress] [--collections=collections.csv] [--overrides=overrides.csv] \\
        [--config=configs/index.py] [--salt_file=~/.config/radnet/salt]

Writes OUT/files.csv, OUT/series.csv, OUT/review.csv and OUT/summary.json
(formats: docs/interfaces.md; rules: radnet/rules.py; how to run it on a
PACS export: docs/index.md).

Headers are read as Dask tasks (pixel data never; data_prep/cluster.py): on a
LocalCluster of ``--workers`` processes, or on the cluster of ``--scheduler``
(docs/scale.md). Each record is appended to OUT/cache/headers.jsonl by this process
as it arrives, and a re-run reads again only files whose (path, size, mtime) changed,
so a killed run continues where it stopped and a re-run on an unchanged tree parses
nothing. The cache holds keyed
hashes, never raw identifiers, and is discarded when the salt or the reader changes.

Modules: salt (the keyed-hash secret), reading (walk, header tasks, HeaderCache),
series (grouping slices into series, geometry, labels), outputs (columns, split,
overrides, CSV files, summary); ``run_index`` below runs them in order.
"""

from __future__ import annotations

import os

from absl import logging

from data_prep import cluster
from data_prep.index import outputs, reading, salt
from radnet.dicom import series  # the grouping and keys, shared with radnet.archive


def run_index(dicom_root: str, out: str, cfg, workers: int = 0,
              salt_file: str = salt.DEFAULT_SALT_FILE, collections_csv: str | None = None,
              overrides_csv: str | None = None, progress: bool = True,
              scheduler: str | None = None,
              connect_timeout_s: float = cluster.CONNECT_TIMEOUT_S) -> dict:
    """The whole index; returns the summary (also written to OUT/summary.json).

    Headers are read on the Dask cluster at ``scheduler`` (or DASK_SCHEDULER_ADDRESS),
    else on a LocalCluster of ``workers`` processes, else (0) in this process.
    """
    if not os.path.isdir(dicom_root):
        raise FileNotFoundError(f"--dicom_root {dicom_root!r} is not a directory")
    # The cluster first: an unreachable scheduler fails before the tree is walked.
    with cluster.engine(scheduler, workers, connect_timeout_s=connect_timeout_s) as eng:
        os.makedirs(out, exist_ok=True)
        secret = salt.load_salt(salt_file)
        collections_table = series.load_collections(collections_csv)
        problems: dict[str, dict] = {}
        paths = reading.walk(dicom_root, skip=[out], problems=problems)
        cache = reading.HeaderCache(os.path.join(out, "cache", "headers.jsonl"),
                                    salt.salt_fingerprint(secret))
        budget = (int(cfg.header_max_mb * 2**20) if cfg.header_max_mb > 0 else None,
                  float(cfg.header_max_s) if cfg.header_max_s > 0 else None)
        records = reading.read_all(dicom_root, paths, secret, cache, eng, cfg.chunksize,
                                   cfg.cache_flush_s, progress, problems=problems,
                                   budget=budget)
    series_rows, file_key, review_rows = series.build_series(records, secret, cfg,
                                                             collections_table)
    outputs.assign_splits(series_rows, cfg)
    n_over = outputs.apply_overrides(series_rows, overrides_csv)
    if n_over:
        logging.info("applied %d overrides from %s", n_over, overrides_csv)
    files_rows = outputs.file_rows(paths, records, file_key, series_rows)
    series_rows.sort(key=lambda r: r["series_key"])
    review_rows.sort(key=lambda r: (r["series_key"], r["column"]))
    outputs.write_csv(os.path.join(out, "files.csv"), outputs.FILES_COLUMNS, files_rows)
    outputs.write_csv(os.path.join(out, "series.csv"), outputs.SERIES_COLUMNS, series_rows)
    outputs.write_csv(os.path.join(out, "review.csv"), outputs.REVIEW_COLUMNS, review_rows)
    summary = outputs.summarize(files_rows, series_rows, review_rows)
    summary["headers_parsed"] = cache.n_added
    outputs.write_summary(os.path.join(out, "summary.json"), summary)
    return summary

