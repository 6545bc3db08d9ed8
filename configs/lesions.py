"""Mining RECIST measurements from GSPS and SR objects (python -m data_prep.lesions).

Tolerances of the pairing of a long and a short axis drawn on the same image, and the
DeepLesion box rule; the dataset-building fields when --dataset_out is given.
"""

import ml_collections


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    # A pair is a RECIST measurement when the two lines are within this many degrees of
    # perpendicular and cross: the crossing point lies on both segments, each allowed to
    # fall short of it by crossing_margin × its own length.
    config.perpendicular_tol_deg = 15.0
    config.crossing_margin = 0.1
    # A measurement is flagged possibly_noisy when it is further than this from 90°, or
    # crosses outside the inner (1 − 2 × noisy_crossing_margin) of either axis.
    config.noisy_angle_deg = 7.5
    config.noisy_crossing_margin = 0.1
    # The short axis is at most this fraction longer than the long one (equal axes are fine).
    config.short_over_long_max = 1.0
    # DeepLesion: the box of the four end points, dilated by 5 pixels, clipped to the image.
    config.box_dilate_px = 5.0
    # Dataset (--dataset_out): 2k+1 slices, in-plane mm per pixel, size, HU window (wide
    # enough for lung and bone, narrow enough to keep 4 HU per grey level for soft tissue).
    config.dataset = ml_collections.ConfigDict(dict(
        context=1, mm_per_pixel=2.5, size=128, window_hu=(-400.0, 600.0)))
    return config
