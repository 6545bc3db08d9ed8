"""python -m data_prep.lesions --dicom_root=DIR --index=INDEX --out=OUT: see mine.py."""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from data_prep.index import salt
from data_prep.lesions import dataset, mine

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from radnet import cli

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("dicom_root", None, "Root of the DICOM tree the index was made of.")
    flags.DEFINE_string("index", None, "Output folder of python -m data_prep.index.")
    flags.DEFINE_string("out", None, "Output folder (lesions.csv, annotations.csv, summary.json).")
    flags.DEFINE_string("dataset_out", None, "Optional: also build the lesion dataset here.")
    flags.DEFINE_string("salt_file", salt.DEFAULT_SALT_FILE,
                        "Secret for the keyed hashes: the index's.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    config_flags.DEFINE_config_file("config", os.path.join(_REPO, "configs", "lesions.py"),
                                    "Mining config (tolerances).")


def main(argv):
    del argv
    if not FLAGS.dicom_root or not FLAGS.index or not FLAGS.out:
        raise cli.UserError("--dicom_root, --index and --out are required")
    progress = lambda it: it
    if FLAGS.progress:
        from tqdm import tqdm  # noqa: PLC0415
        progress = lambda it: tqdm(it, desc="annotation objects")
    try:
        secret = salt.load_salt(FLAGS.salt_file)
        summary, archive = mine.mine(FLAGS.dicom_root, FLAGS.index, FLAGS.out, FLAGS.config,
                                     secret, progress, return_archive=True)
    except mine.InputError as e:
        raise cli.UserError(str(e))
    if FLAGS.dataset_out:
        summary["dataset"] = dataset.build(os.path.join(FLAGS.out, "lesions.csv"), archive,
                                           FLAGS.dataset_out, FLAGS.config.dataset, progress)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags)
