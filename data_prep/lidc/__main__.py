"""python -m data_prep.lidc --lidc_root=DIR --out=DATASET: see data_prep/lidc/build.py."""

from __future__ import annotations

import json
import os

from absl import flags
from ml_collections import config_flags

from data_prep.index import salt as salt_lib
from data_prep.lidc import build
from radnet import cli

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("lidc_root", None, "Folder of the LIDC-IDRI download (patient "
                        "folders with DICOM files and reading XML).", required=True)
    flags.DEFINE_string("out", None, "Output dataset folder.", required=True)
    flags.DEFINE_string("salt_file", salt_lib.DEFAULT_SALT_FILE, "Site secret of the keyed "
                        "series keys (created when missing).")
    config_flags.DEFINE_config_file("config", os.path.join(_REPO, "configs", "slicegroups.py"),
                                    "Config whose build section holds the numbers.")


def main(argv):
    del argv
    # A missing --lidc_root (FileNotFoundError) is one line and exit 2 through radnet.cli.
    summary = build.build(FLAGS.lidc_root, FLAGS.out, FLAGS.config,
                          salt_lib.load_salt(FLAGS.salt_file))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags)
