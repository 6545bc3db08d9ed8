"""NIfTI segmentation datasets (MSD, nnU-Net v2 raw, LiTS) → radnet segmentation dataset."""
