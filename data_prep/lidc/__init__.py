"""LIDC-IDRI → radnet slice-group dataset (``python -m data_prep.lidc``); see docs/lidc.md."""
