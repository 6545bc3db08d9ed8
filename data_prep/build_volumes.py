"""python -m data_prep.build_volumes --index=OUT --dicom_root=DIR --out=DATASET: the volume
build's command line (data_prep/volumes/cli.py); what it does: data_prep/volumes/__init__.py."""

from absl import flags

from data_prep.volumes import cli
from radnet import cli as radnet_cli

if __name__ == "__main__":
    cli.define_flags()
    flags.adopt_module_key_flags(cli)  # --help lists them as this program's flags
    radnet_cli.run(cli.main)
