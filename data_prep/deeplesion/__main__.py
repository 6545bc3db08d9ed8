"""python -m data_prep.deeplesion --deeplesion_root=DIR --out=DS: see build.py."""

from __future__ import annotations

import json
import sys

from absl import flags

from data_prep.deeplesion import build

from radnet import cli

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("deeplesion_root", None, "DeepLesion folder (DL_info.csv, Images_png/).")
    flags.DEFINE_string("out", None, "Output lesion dataset folder.")
    flags.DEFINE_integer("context", 1, "k: context slices on each side of the key slice "
                         "(2k+1 slices per image; 1 → 3 slices as Yan et al.).")
    flags.DEFINE_float("mm_per_pixel", 0.8, "In-plane resampling target (0 = native pixels).")
    flags.DEFINE_integer("size", 512, "Slab size after resampling (pixels; pad/crop).")
    flags.DEFINE_string("window_hu", "-1024,1024", "HU window mapped to 0..255.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv):
    del argv
    if not FLAGS.deeplesion_root or not FLAGS.out:
        raise cli.UserError("--deeplesion_root and --out are required")
    progress = lambda it: it
    if FLAGS.progress:
        from tqdm import tqdm  # noqa: PLC0415
        progress = lambda it: tqdm(it, desc="key slices")
    try:
        summary = build.build(FLAGS.deeplesion_root, FLAGS.out, FLAGS.context,
                              FLAGS.mm_per_pixel, FLAGS.size, build.floats(FLAGS.window_hu),
                              progress)
    except build.InputError as e:
        raise cli.UserError(str(e))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags)
