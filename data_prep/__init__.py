"""Offline command-line tools: DICOM archive → index → volumes; LiTS → dataset."""
