"""python -m data_prep.index: see data_prep/index/__init__.py."""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from data_prep import cluster, index
from radnet import cli
from data_prep.index import outputs, salt

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CONFIG = os.path.join(_REPO, "configs", "index.py")

FLAGS = flags.FLAGS


def define_flags():
    """Command-line flags, defined only when run as a program so that importing this
    module next to the other data_prep tools never clashes on shared names (--out, --workers)."""
    flags.DEFINE_string("dicom_root", None, "Root of the DICOM tree (any layout, any file names).")
    flags.DEFINE_string("out", None, "Output folder (files.csv, series.csv, review.csv, summary.json).")
    cluster.define_flags(flags, max(1, (os.cpu_count() or 2) - 1), "Header-reading")
    flags.adopt_module_key_flags(cluster)  # --help lists them with this tool\'s own
    flags.DEFINE_string("collections", None, "Optional collections.csv: collection,regions.")
    flags.DEFINE_string("overrides", None, "Optional overrides.csv: series_key,column,value.")
    flags.DEFINE_string("salt_file", salt.DEFAULT_SALT_FILE,
                        "Secret for the keyed hashes (created if missing).")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    config_flags.DEFINE_config_file("config", _CONFIG, "Index config (thresholds).")


def main(argv):
    del argv
    if not FLAGS.dicom_root or not FLAGS.out:
        raise app.UsageError("--dicom_root and --out are required")
    try:
        summary = index.run_index(FLAGS.dicom_root, FLAGS.out, FLAGS.config, FLAGS.workers,
                                  FLAGS.salt_file, FLAGS.collections, FLAGS.overrides,
                                  FLAGS.progress, scheduler=FLAGS.scheduler,
                                  connect_timeout_s=FLAGS.connect_timeout_s)
    except (cluster.ClusterError, FileNotFoundError, NotADirectoryError) as err:
        cluster.exit_with_error(str(err))
    print(outputs.format_summary(summary))
    logging.debug("wrote %s", FLAGS.out)  # (-v 1) the caller named --out
    if summary["files"].get("to_retry"):
        # Killed workers or stalled reads: the tables are complete, but these files
        # deserve another try (a re-run reads only them; the rest comes from the cache).
        logging.error("%d file(s) recorded worker_died/timeout; run the same command again",
                      summary["files"]["to_retry"])
        raise SystemExit(1)


if __name__ == "__main__":
    cli.run(main, define_flags)

