"""LiTS → radnet liver dataset: the LiTS case of data_prep.nifti (kept for its callers).

    python -m data_prep.lits --lits_dir=DIR --out=DATASET [--in_plane=192] [--workers=N]

Every ``volume-<k>.nii[.gz]`` / ``segmentation-<k>.nii[.gz]`` pair under ``lits_dir``
(any depth) becomes case ``lits-<k:03d>``; labels 1 (liver) and 2 (tumour) are one liver
class. Preparation, layout and splits: data_prep/nifti/build.py, radnet/data/nifti.py.
"""

from __future__ import annotations

from typing import Any

from data_prep.nifti import build as nifti_build
from data_prep.nifti.build import assign_splits, write_case, write_group  # noqa: F401
from data_prep.nifti.layouts import lits_case_id as case_id_of  # noqa: F401


def build(lits_dir: str, out: str, in_plane: int = 192, slice_spacing_mm: float = 5.0,
          seed: int = 0, split_fractions=(0.7, 0.15, 0.15), workers: int = 1,
          progress: bool = True) -> list[dict[str, Any]]:
    """Builds the liver dataset; returns the manifest rows (also written to manifest.csv)."""
    return nifti_build.build(lits_dir, out, in_plane, slice_spacing_mm, seed, split_fractions,
                             workers, progress, layout="lits", fold_foreground="liver")
