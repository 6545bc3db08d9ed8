"""The command line of the volume build, ``python -m data_prep.build_volumes`` (its entry
module data_prep/build_volumes.py); what it does: data_prep/volumes/__init__.py."""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

from data_prep import cluster

FLAGS = flags.FLAGS


def define_flags():
    """Command-line flags, defined only when run as a program so that importing this
    module next to the other data_prep tools never clashes on shared names (--out, --workers)."""
    flags.DEFINE_string("index", None, "Index folder written by data_prep.index (files.csv, series.csv).")
    flags.DEFINE_string("dicom_root", None, "Root the index's file paths are relative to.")
    flags.DEFINE_string("out", None, "Dataset path or kvstore URL (gs://…, s3://…).")
    cluster.define_flags(flags, os.cpu_count() or 1, "Volume-building")
    flags.adopt_module_key_flags(cluster)  # --help lists them with this tool\'s own
    flags.DEFINE_bool("overwrite", False,
                      "Replace a dataset built from another index or config.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    config_flags.DEFINE_config_file(
        "config", None, "Config file, default configs/build_volumes.py; e.g. "
        "configs/build_volumes.py:size=64. Fields can be overridden: --config.min_slices=8.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    for name in ("index", "dicom_root", "out"):
        if not FLAGS[name].value:
            raise app.UsageError(f"--{name} is required")
    # Imported here, as a module, so worker processes unpickle the functions by name.
    from configs import build_volumes as default_config
    from data_prep.volumes import builder

    config = FLAGS.config if FLAGS.config is not None else default_config.get_config()
    try:
        summary = builder.build(
            FLAGS.index, FLAGS.dicom_root, FLAGS.out, config, workers=FLAGS.workers,
            overwrite=FLAGS.overwrite, progress=FLAGS.progress, scheduler=FLAGS.scheduler,
            connect_timeout_s=FLAGS.connect_timeout_s)
    except (cluster.ClusterError, FileNotFoundError, NotADirectoryError) as err:
        cluster.exit_with_error(str(err))
    print(json.dumps(summary, sort_keys=True))
    if not summary["finalized"] or summary.get("to_retry"):
        raise SystemExit(1)  # the log said which series are left; a re-run builds them
