"""Overlap metrics of binary segmentations: Dice and IoU per case, mean and median.

Definitions (per case, over all voxels of the case; P = predicted set, T = true set)::

    Dice = 2 |P ∩ T| / (|P| + |T|)        IoU = |P ∩ T| / |P ∪ T|

**Empty masks.** When both P and T are empty the prediction is exactly right and both
metrics are **1.0** (the convention of e.g. the Medical Segmentation Decathlon and
MONAI's ``ignore_empty=False``); when only one is empty they are 0.0. The values are
therefore always defined, so mean and median over cases never see NaN.

Cases are scored whole, after their windows are stitched (radnet.train.segment).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np


def _counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    pred = np.asarray(pred).astype(bool)
    truth = np.asarray(truth).astype(bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    inter = int(np.count_nonzero(pred & truth))
    return inter, int(np.count_nonzero(pred)), int(np.count_nonzero(truth))


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(Dice, IoU) of two binary masks of the same shape; each 1.0 when both are empty."""
    inter, p, t = _counts(pred, truth)
    union = p + t - inter
    return (1.0 if p + t == 0 else 2.0 * inter / (p + t),
            1.0 if union == 0 else inter / union)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return dice_iou(pred, truth)[0]


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    return dice_iou(pred, truth)[1]


def summarize(per_case: Mapping[str, Mapping[str, float]] | Iterable[Mapping[str, float]]
              ) -> dict[str, float]:
    """Per-case ``{"dice", "iou"}`` → mean and median of each over cases (and n)."""
    rows = list(per_case.values()) if isinstance(per_case, Mapping) else list(per_case)
    if not rows:
        raise ValueError("no cases to summarise")
    d = np.array([r["dice"] for r in rows], np.float64)
    j = np.array([r["iou"] for r in rows], np.float64)
    return {"n": len(rows), "mean_dice": float(d.mean()), "mean_iou": float(j.mean()),
            "median_dice": float(np.median(d)), "median_iou": float(np.median(j))}
