"""Series → volumes (data_prep.build_volumes): the paper's preprocessing by default.

    python -m data_prep.build_volumes --index=OUT --dicom_root=DIR --out=DATASET
    ... --config=configs/build_volumes.py:size=32          # 48×32×32 (the CPU demo)
    ... --config=configs/build_volumes.py:normalise=window,window_level=40,window_width=400
    ... --config=configs/build_volumes.py:tiny             # 16×32×32 for tests

Any field can also be overridden on the command line: --config.min_slices=8.
"""

import ml_collections

from configs import common


def get_config(arg=None):
    slices, size, _ = common.PAPER_VOLUME_SHAPE
    arg = common.parse_arg(arg, slices=slices, size=size, rows=0, cols=0, tiny=False,
                           normalise="minmax", antialias=False, codec="zstd",
                           min_slices=common.PAPER_MIN_SLICES, window_level=40.0,
                           window_width=400.0)
    config = ml_collections.ConfigDict()
    # Volume [slices, rows, cols]: slices ascending along the slice normal, image rows,
    # image columns (the acquisition plane is kept). The paper: 48×192×192.
    config.volume_shape = (arg.slices, arg.rows or arg.size, arg.cols or arg.size)
    # Series with fewer slices were excluded by the paper (and by the index); the
    # builder re-counts the decoded slices. Shorter than volume_shape[0] → padded.
    config.min_slices = arg.min_slices
    # Effective spacing (mm) between the resized slices above which a series is
    # excluded (paper: 1.5 cm).
    config.max_effective_spacing_mm = common.PAPER_MAX_EFFECTIVE_SPACING_MM
    # One gap deviating from the median gap by more than this fraction = a missing or
    # misplaced slice → inconsistent_geometry.
    config.max_spacing_deviation = 0.25
    # Largest angle (degrees) between the cosines of two slices of one series: the same
    # as the index's orientation_group_deg (configs/index.py), so the builder's re-check
    # agrees with the index's grouping into series.
    config.max_orientation_deviation_deg = common.ORIENTATION_GROUP_DEG
    # In-plane triangle anti-aliasing when shrinking (paper: plain linear resize).
    config.antialias = arg.antialias
    # minmax (paper) | percentile (robust min/max) | window (fixed CT window, HU)
    config.normalise = arg.normalise
    config.percentiles = (0.5, 99.5)
    config.window_level = arg.window_level
    config.window_width = arg.window_width
    # Chunk compression of the volume array; see docs/dataset.md for the measurement.
    config.codec = arg.codec
    # fsync every chunk and done marker, so a finished series survives a power loss or
    # OS crash too (kill -9 alone would not need it; costs ~15 ms per write on slow disks).
    config.fsync = True
    # Memory one series may need (radnet.preprocess.memory_estimate_bytes, from the index's
    # rows, columns and slices), checked before decoding: beyond it the series is too_large
    # instead of a worker killed by the OOM killer. 0: no limit. A 512² CT of 1000 slices
    # needs ~0.2 GiB in classic files, ~1 GiB as one enhanced multi-frame file.
    config.max_series_memory_mb = 8192.0
    if arg.tiny:
        config.volume_shape = (16, 32, 32)
        config.min_slices = 4
    return config
