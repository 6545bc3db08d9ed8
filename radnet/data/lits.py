"""LiTS liver cases: the LiTS case of radnet.data.nifti (kept so existing imports work).

``prepare_case(volume, segmentation)`` with LiTS's labels (tumour folded into liver),
the dataset reader (``cases``, ``open_case``, ``read_window``, ``read_attributes``) and
the constants are radnet.data.nifti's; see its docstring for the preparation and layout.
"""

from radnet.data.nifti import (  # noqa: F401
    CHUNK_SLICES, KINDS, LITS_CLASS_NAMES, LITS_LABEL_MAP, LIVER_LABELS, MANIFEST_COLUMNS,
    ORIENTATION, VALID_LABELS, CaseError, PreparedCase, array_spec, cases, class_names,
    has_native, open_case, prepare_case, read_attributes, read_crop, read_manifest,
    read_native, read_window, reorient, slice_positions, spacing_of)
