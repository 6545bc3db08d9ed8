"""python -m data_prep.lits --lits_dir=DIR --out=DATASET: see data_prep/lits/build.py."""

from __future__ import annotations

import json
import os

from absl import flags

from data_prep.lits import build
from radnet import cli
from radnet.labels import SPLITS

FLAGS = flags.FLAGS


def define_flags():
    """Command-line flags, defined only when run as a program (the data_prep tools share
    flag names: --out, --workers, --progress)."""
    flags.DEFINE_string("lits_dir", None, "Folder holding volume-<k>.nii[.gz] and "
                        "segmentation-<k>.nii[.gz] (searched recursively).", required=True)
    flags.DEFINE_string("out", None, "Output dataset folder (zarr v3 + manifest.csv).",
                        required=True)
    flags.DEFINE_integer("in_plane", 192, "In-plane size after resampling (pixels).")
    flags.DEFINE_float("slice_spacing_mm", 5.0, "Slice spacing after resampling (mm).")
    flags.DEFINE_integer("seed", 0, "Seed of the train/val/test split.")
    flags.DEFINE_string("split", "0.7,0.15,0.15", "train,val,test fractions.")
    flags.DEFINE_integer("workers", max(1, min(4, (os.cpu_count() or 1) - 1)),
                         "Processes reading and resampling cases.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv):
    del argv
    fractions = tuple(float(x) for x in FLAGS.split.split(","))
    manifest = build.build(FLAGS.lits_dir, FLAGS.out, in_plane=FLAGS.in_plane,
                           slice_spacing_mm=FLAGS.slice_spacing_mm, seed=FLAGS.seed,
                           split_fractions=fractions, workers=FLAGS.workers,
                           progress=FLAGS.progress)
    included = sum(r["status"] == "included" for r in manifest)
    print(json.dumps({"dataset": FLAGS.out, "included": included,
                      "excluded": len(manifest) - included,
                      **{s: sum(r["split"] == s for r in manifest) for s in SPLITS}}))
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags)
