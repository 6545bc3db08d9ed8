"""python -m data_prep.build_volumes --index=OUT --dicom_root=DIR --out=DATASET: the volume
build's command line (data_prep/volumes/cli.py); what it does: data_prep/volumes/__init__.py."""

from data_prep.volumes import cli

if __name__ == "__main__":
    cli.run()
