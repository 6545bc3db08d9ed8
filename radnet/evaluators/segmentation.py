"""Segmentation metrics per case and class, their summaries and bootstrap intervals.

Definitions (per case and foreground class, over all voxels of the case; P = predicted
set, T = true set, ∂X = the surface voxels of X, d = Euclidean distance in mm using the
voxel spacing)::

    Dice = 2 |P ∩ T| / (|P| + |T|)        IoU = |P ∩ T| / |P ∪ T|
    HD95 = max( q95{ d(p, ∂T) : p ∈ ∂P },  q95{ d(t, ∂P) : t ∈ ∂T } )       (mm)
    NSD_τ = ( |{p ∈ ∂P : d(p, ∂T) ≤ τ}| + |{t ∈ ∂T : d(t, ∂P) ≤ τ}| ) / ( |∂P| + |∂T| )

**Surfaces** are the voxels of a mask with at least one face-neighbour outside it
(``X ∧ ¬erode(X)``, 6-connected erosion; outside the image counts as outside the mask,
so a mask touching the border has a surface there), as MONAI's ``get_mask_edges`` does.
Distances come from ``scipy.ndimage.distance_transform_edt`` with ``sampling`` = the
spacing in mm, computed inside the bounding box of both masks (exact: every surface voxel
lies in it). q95 is NumPy's linear-interpolated 95th percentile (MONAI's
``compute_hausdorff_distance(percentile=95)``); NSD counts surface voxels (the Decathlon
and DeepMind's ``surface-distance`` weigh surface elements by area; on isotropic grids
the two agree closely, on anisotropic ones voxel counts weigh in-plane faces more).

**Empty masks.** Both P and T empty: the prediction is exactly right, Dice = IoU = NSD = 1
and HD95 = 0 (MONAI's ``ignore_empty=False`` for the overlap metrics; the MSD convention).
Exactly one empty: Dice = IoU = NSD = 0 and HD95 = the diagonal of the image in mm (the
largest distance the image allows), so every value is finite and means and medians over
cases never see NaN or infinity.

Intervals: 95% bootstrap confidence intervals of a mean (percentile method,
``scipy.stats.bootstrap``, resampling cases, seeded); none (NaN) with fewer than 2 cases.
Cases are scored whole, after their windows are stitched (radnet.train.segment).
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage, stats

METRICS = ("dice", "iou", "hd95_mm", "nsd")
BOOTSTRAP_RESAMPLES = 2000


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


# ----------------------------------------------------------------------------- surfaces

def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face-neighbour outside it (outside the array = outside)."""
    faces = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=faces, border_value=0)


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(distances in mm of ∂P's voxels to ∂T, of ∂T's voxels to ∂P); both masks non-empty."""
    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    if len(spacing_mm) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing_mm)} does not fit a {pred.ndim}-d mask")
    # Crop to the bounding box of both (a full LiTS grid is ~10^8 voxels), with one
    # voxel of background around it so the border erodes as outside.
    box = ndimage.find_objects((pred | truth).astype(np.uint8))[0]
    p = np.pad(pred[box], 1)
    t = np.pad(truth[box], 1)
    sp, st_ = _surface(p), _surface(t)
    to_t = ndimage.distance_transform_edt(~st_, sampling=spacing_mm)
    to_p = ndimage.distance_transform_edt(~sp, sampling=spacing_mm)
    return to_t[sp], to_p[st_]


def _diagonal_mm(shape: Sequence[int], spacing_mm: Sequence[float]) -> float:
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing_mm))))


def hd95_nsd(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float],
             tolerance_mm: float) -> tuple[float, float]:
    """(HD95 in mm, normalised surface Dice at ``tolerance_mm``) (module docstring)."""
    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    has_p, has_t = bool(pred.any()), bool(truth.any())
    if not has_p and not has_t:
        return 0.0, 1.0
    if not (has_p and has_t):
        return _diagonal_mm(pred.shape, spacing_mm), 0.0
    d_pt, d_tp = surface_distances(pred, truth, spacing_mm)
    hd95 = max(float(np.percentile(d_pt, 95)), float(np.percentile(d_tp, 95)))
    nsd = (np.count_nonzero(d_pt <= tolerance_mm) + np.count_nonzero(d_tp <= tolerance_mm)) / (
        d_pt.size + d_tp.size)
    return hd95, float(nsd)


def case_metrics(pred: np.ndarray, truth: np.ndarray, class_names: Sequence[str],
                 spacing_mm: Sequence[float], tolerance_mm: float,
                 surface: bool = True) -> dict[str, dict[str, float]]:
    """Class maps ``[D, H, W]`` (index per voxel) → ``{class: {dice, iou[, hd95_mm, nsd]}}``
    for every foreground class (index ≥ 1)."""
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    out = {}
    for c, name in enumerate(class_names):
        if c == 0:
            continue
        p, t = pred == c, truth == c
        d, j = dice_iou(p, t)
        out[name] = {"dice": d, "iou": j}
        if surface:
            out[name]["hd95_mm"], out[name]["nsd"] = hd95_nsd(p, t, spacing_mm, tolerance_mm)
    return out


# ----------------------------------------------------------------------------- summaries

def bootstrap_ci(values: Sequence[float], seed: int = 0,
                 n_resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean over cases; (nan, nan) for n < 2."""
    x = np.asarray(values, np.float64)
    if x.size < 2:
        return float("nan"), float("nan")
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=n_resamples,
                              method="percentile", vectorized=True,
                              random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def summarize(per_case: Mapping[str, Mapping[str, float]] | Iterable[Mapping[str, float]],
              with_ci: bool = False, seed: int = 0) -> dict[str, float]:
    """Per-case ``{"dice", "iou"}`` → mean and median of each over cases (and n); with
    ``with_ci``, ``ci95_dice`` and ``ci95_iou`` (bootstrap over cases)."""
    rows = list(per_case.values()) if isinstance(per_case, Mapping) else list(per_case)
    if not rows:
        raise ValueError("no cases to summarise")
    d = np.array([r["dice"] for r in rows], np.float64)
    j = np.array([r["iou"] for r in rows], np.float64)
    out = {"n": len(rows), "mean_dice": float(d.mean()), "mean_iou": float(j.mean()),
           "median_dice": float(np.median(d)), "median_iou": float(np.median(j))}
    if with_ci:
        out["ci95_dice"] = list(bootstrap_ci(d, seed))
        out["ci95_iou"] = list(bootstrap_ci(j, seed))
    return out


def summarize_classes(per_case: Mapping[str, Mapping[str, Mapping[str, float]]],
                      seed: int = 0) -> dict[str, dict[str, dict[str, float]]]:
    """``{case: {class: {metric: value}}}`` → ``{class: {metric: {n, mean, median, ci95}}}``."""
    if not per_case:
        raise ValueError("no cases to summarise")
    classes = list(next(iter(per_case.values())))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in classes:
        out[name] = {}
        for metric in METRICS:
            values = [m[name][metric] for m in per_case.values() if metric in m[name]]
            if not values:
                continue
            x = np.asarray(values, np.float64)
            out[name][metric] = {"n": int(x.size), "mean": float(x.mean()),
                                 "median": float(np.median(x)),
                                 "ci95": list(bootstrap_ci(x, seed))}
    return out


def case_means(per_case: Mapping[str, Mapping[str, Mapping[str, float]]]
               ) -> dict[str, dict[str, float]]:
    """``{case: {class: {metric}}}`` → ``{case: {metric: mean over foreground classes}}``
    (with one foreground class, that class's values)."""
    out = {}
    for case, classes in per_case.items():
        metrics = [m for m in METRICS if all(m in v for v in classes.values())]
        out[case] = {m: float(np.mean([v[m] for v in classes.values()])) for m in metrics}
    return out
