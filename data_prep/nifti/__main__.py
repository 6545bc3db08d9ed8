"""python -m data_prep.nifti --dataset_dir=DIR --out=DATASET: see data_prep/nifti/build.py."""

from __future__ import annotations

import json
import os

from absl import flags

from data_prep import cluster
from data_prep.nifti import build, layouts
from radnet import cli
from radnet.labels import SPLITS

FLAGS = flags.FLAGS


def define_common_flags():
    """The flags data_prep.nifti and data_prep.lits share."""
    flags.DEFINE_string("out", None, "Output dataset folder (zarr v3 + manifest.csv).",
                        required=True)
    flags.DEFINE_integer("in_plane", 192, "In-plane size after resampling (pixels).")
    flags.DEFINE_float("slice_spacing_mm", 5.0, "Slice spacing after resampling (mm); the "
                       "paper's liver setting is 5.")
    flags.DEFINE_integer("seed", 0, "Seed of the train/val/test split.")
    flags.DEFINE_string("split", "0.7,0.15,0.15", "train,val,test fractions.")
    flags.DEFINE_integer("workers", max(1, min(4, (os.cpu_count() or 1) - 1)),
                         "Processes reading and resampling cases.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")


def define_flags():
    flags.DEFINE_string("dataset_dir", None, "Folder of the cases: an MSD task (Task03_Liver), "
                        "an nnU-Net v2 raw dataset or LiTS files.", required=True)
    flags.DEFINE_enum("layout", "auto", ["auto", *layouts.LAYOUTS], "Layout of --dataset_dir.")
    flags.DEFINE_string("fold_foreground", "", "Merge every non-zero label into one class of "
                        "this name (e.g. liver: the paper's liver with its tumours); '' keeps "
                        "every label of dataset.json as its own class.")
    define_common_flags()


def run(dataset_dir: str, layout: str, fold_foreground: str) -> int:
    try:
        fractions = tuple(float(x) for x in FLAGS.split.split(","))
        manifest = build.build(dataset_dir, FLAGS.out, in_plane=FLAGS.in_plane,
                               slice_spacing_mm=FLAGS.slice_spacing_mm, seed=FLAGS.seed,
                               split_fractions=fractions, workers=FLAGS.workers,
                               progress=FLAGS.progress, layout=layout,
                               fold_foreground=fold_foreground)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as err:
        # LayoutError is a ValueError: the user's folder or flags, said in one line.
        cluster.exit_with_error(str(err))
    included = sum(r["status"] == "included" for r in manifest)
    print(json.dumps({"dataset": FLAGS.out, "included": included,
                      "excluded": len(manifest) - included,
                      **{s: sum(r["split"] == s for r in manifest) for s in SPLITS}}))
    return 0


def main(argv):
    del argv
    return run(FLAGS.dataset_dir, FLAGS.layout, FLAGS.fold_foreground)


if __name__ == "__main__":
    cli.run(main, define_flags)
