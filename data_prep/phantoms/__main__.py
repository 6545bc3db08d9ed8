"""python -m data_prep.phantoms --out=DIR: see data_prep/phantoms/pacs.py."""

from __future__ import annotations

import json
from typing import Sequence

from absl import app, flags, logging

from data_prep.phantoms import pacs
from radnet import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a program: other tools (the index)
    define --out too, and all modules are imported in one test session."""
    flags.DEFINE_string("out", None, "Output folder (DIR/dicom, DIR/truth.csv, DIR/lits).")
    flags.DEFINE_integer("patients", 50, "Number of phantom patients.")
    flags.DEFINE_integer("seed", 0, "Seed; the same seed gives identical files.")
    flags.DEFINE_integer("lits_cases", 4, "Number of LiTS-format liver CT cases.")
    flags.DEFINE_integer("workers", None, "Worker processes (default: CPU count).")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv: Sequence[str]) -> None:
    del argv
    if not FLAGS.out:
        raise app.UsageError("--out is required")
    summary = pacs.generate(FLAGS.out, FLAGS.patients, FLAGS.seed, FLAGS.lits_cases,
                            workers=FLAGS.workers, progress=FLAGS.progress)
    logging.info("phantom archive in %s: %s", FLAGS.out, summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main, define_flags, user_errors=(ValueError,))
