"""python -m data_prep.phantoms --out=DIR: see data_prep/phantoms/pacs.py."""

from __future__ import annotations

import csv
import json
import os
from typing import Sequence

from absl import app, flags

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
    flags.DEFINE_integer("lesion_studies", 0, "CT studies with lesions and their GSPS/SR "
                         "measurements under DIR/dicom/LESIONS, truth in "
                         "DIR/lesion_truth.csv (data_prep/phantoms/lesions.py); 0 = none.")


def main(argv: Sequence[str]) -> None:
    del argv
    if not FLAGS.out:
        raise app.UsageError("--out is required")
    summary = pacs.generate(FLAGS.out, FLAGS.patients, FLAGS.seed, FLAGS.lits_cases,
                            workers=FLAGS.workers, progress=FLAGS.progress)
    if FLAGS.lesion_studies > 0:
        from data_prep.phantoms import lesions  # noqa: PLC0415
        lesion_summary = lesions.generate(os.path.join(FLAGS.out, "dicom"),
                                          os.path.join(FLAGS.out, "lesion_truth.csv"),
                                          FLAGS.lesion_studies, FLAGS.seed)
        print(f"lesion studies: {json.dumps(lesion_summary)}")
    print(describe(summary, FLAGS.out, FLAGS.patients, FLAGS.lits_cases))


def describe(summary: dict, out: str, patients: int, lits_cases: int) -> str:
    """The summary once, in words that match the index's counts: truth.csv has a row per
    series and one per unreadable junk file, which the index lists in files.csv only."""
    with open(os.path.join(out, "truth.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    junk = sum(r["reasons"] == "unreadable" for r in rows)
    not_image = sum("not_image" in r["reasons"].split(";") for r in rows)
    return (f"phantom archive {out}: {patients} patients, {summary['series']} truth rows = "
            f"{summary['series'] - junk} series ({not_image} not images; {summary['included']} "
            f"meant to be included, {summary['excluded'] - junk} excluded) + {junk} unreadable "
            f"junk files (no series: the index counts them as files); {lits_cases} LiTS-format "
            f"liver cases in {os.path.join(out, 'lits')}")


if __name__ == "__main__":
    cli.run(main, define_flags, user_errors=(ValueError,))
