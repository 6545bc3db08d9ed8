"""python -m data_prep.lits --lits_dir=DIR --out=DATASET: LiTS files (volume-<k>.nii,
segmentation-<k>.nii) through data_prep.nifti, liver and tumour folded into one liver
class (the paper's setting). ``python -m data_prep.nifti`` reads the same files and the
MSD (Task03_Liver) and nnU-Net layouts."""

from __future__ import annotations

from absl import flags

from data_prep.nifti import __main__ as nifti_main
from radnet import cli

FLAGS = flags.FLAGS


def define_flags():
    """Command-line flags, defined only when run as a program (the data_prep tools share
    flag names: --out, --workers, --progress)."""
    flags.DEFINE_string("lits_dir", None, "Folder holding volume-<k>.nii[.gz] and "
                        "segmentation-<k>.nii[.gz] (searched recursively).", required=True)
    nifti_main.define_common_flags()
    flags.adopt_module_key_flags(nifti_main)   # so --help lists them too


def main(argv):
    del argv
    return nifti_main.run(FLAGS.lits_dir, "lits", "liver")


if __name__ == "__main__":
    cli.run(main, define_flags)
