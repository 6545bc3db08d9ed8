"""Every number of the archive index and its label rules (data_prep.index, radnet.rules).

    python -m data_prep.index --dicom_root=DIR --out=OUT --config=configs/index.py
    python -m data_prep.index ... --config=configs/index.py:max_oblique_deg=15
    python -m data_prep.index ... --config.split.val=0.05

Values follow MR physics and adult anatomy, not any one dataset; docs/index.md
says where each comes from.
"""

import ml_collections

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, max_oblique_deg=20.0,
                           max_effective_spacing_mm=common.PAPER_MAX_EFFECTIVE_SPACING_MM,
                           heldout_collections="")
    c = ml_collections.ConfigDict()

    # --- volumes (paper 2.1.5) ---
    c.min_slices = common.PAPER_MIN_SLICES  # fewer slices: too_few_slices
    c.target_slices = common.PAPER_VOLUME_SHAPE[0]  # the volume builder's depth
    c.max_effective_spacing_mm = arg.max_effective_spacing_mm  # 1.5 cm in the paper

    # --- geometry ---
    # Slices whose row and column cosines differ by less than this belong to one
    # orientation group (absorbs the rounding noise of written cosines).
    c.orientation_group_deg = common.ORIENTATION_GROUP_DEG
    # Angle between the slice normal and its dominant patient axis above which
    # the view is non-standard. 20 deg keeps usual AC-PC angulation and gantry
    # tilt, excludes true obliques.
    c.max_oblique_deg = arg.max_oblique_deg
    # Two slice centres closer than this along the normal are the same position.
    c.same_position_mm = 0.01
    # A step between neighbouring slices may differ from the median step by
    # max(spacing_rel_tol × median, spacing_abs_tol_mm); more is a gap or mixed spacing.
    c.spacing_rel_tol = 0.1
    c.spacing_abs_tol_mm = 0.02
    # Pixel spacing may vary this much (relative) inside a series.
    c.pixel_spacing_rel_tol = 0.01

    # --- MR weighting (ms). T1: TR <= short_tr and TE <= short_te; T2: TR >= long_tr
    # and TE >= long_te. Between the bounds (PD, mixed) the tags do not decide.
    c.mr = ml_collections.ConfigDict(dict(
        short_tr_max_ms=1000.0,   # T1-SE 300-800 ms at 1.5-3 T
        long_tr_min_ms=1800.0,    # T2-SE 2000-6000 ms
        short_te_max_ms=30.0,     # T1-SE 8-25 ms
        long_te_min_ms=60.0,      # T2-SE 80-120 ms
        # Inversion recovery: STIR nulls fat (TI ~ 0.69 T1_fat: 130-250 ms);
        # FLAIR nulls fluid (T2-FLAIR 1800-2800 ms) or gives T1 contrast with
        # the fluid dark (T1-FLAIR 700-1200 ms).
        stir_max_ti_ms=300.0,
        flair_min_ti_ms=600.0,
        # T1- vs T2-FLAIR when TE is between the bounds: by TR.
        flair_t2_min_tr_ms=4000.0,
        flair_t1_max_tr_ms=3000.0,
    ))

    # --- coverage: minimum craniocaudal length of each region (adult anatomy, mm)
    # and its level along the body (regions on one level overlap or lie side by side).
    c.coverage_min_mm = ml_collections.ConfigDict(dict(
        brain=120.0, upper_head_neck=60.0, lower_head_neck=70.0, lung=220.0, breast=140.0,
        liver=140.0, kidney=100.0, intestine=250.0, pelvis=150.0))
    # Where each region lies in a typical adult, mm below the vertex (top, bottom).
    # Neighbouring regions overlap (the liver dome rises beside the lung bases, the
    # intestine fills the pelvis), so several regions together need the span of
    # their union, not the sum of their lengths. A smaller adult is allowed for by
    # coverage_span_scale; a single region always needs its minimum length.
    c.coverage_ref_z_mm = ml_collections.ConfigDict(dict(
        brain=(5.0, 140.0), upper_head_neck=(100.0, 175.0), lower_head_neck=(175.0, 255.0),
        lung=(245.0, 485.0), breast=(300.0, 450.0), liver=(440.0, 600.0),
        kidney=(510.0, 630.0), intestine=(560.0, 830.0), pelvis=(710.0, 880.0)))
    c.coverage_span_scale = 0.9

    # --- patient-level split ---
    c.split = ml_collections.ConfigDict(dict(train=0.8, val=0.1, test=0.1))
    # Collections (collections.csv names / top folders / TCIA CTP project) whose
    # patients all go to test, as the paper tested on other collections.
    c.heldout_collections = arg.heldout_collections  # comma-separated

    # --- reading ---
    c.chunksize = 16                  # smallest number of files per worker task (large trees use up to 256)
    c.cache_flush_s = 2.0             # the cache is flushed at least this often
    # Budget of one header (0: none). Classic headers take 1-20 KiB and enhanced
    # multi-frame ones a few MiB; beyond these a file is too_large (bytes read) or
    # timeout (seconds; tried again by the next run), never a stalled index.
    c.header_max_mb = 256.0
    c.header_max_s = 30.0
    return c
