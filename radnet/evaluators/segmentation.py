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
``scipy.stats.bootstrap``, resampling cases, seeded); none (NaN, ``null`` in the
summaries) with fewer than 2 cases.
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


def _ci_or_none(values, seed: int) -> list[float] | None:
    """The interval as stored in JSON: None where it is undefined (n < 2)."""
    lo, hi = bootstrap_ci(values, seed)
    return None if math.isnan(lo) else [lo, hi]


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
        out["ci95_dice"] = _ci_or_none(d, seed)
        out["ci95_iou"] = _ci_or_none(j, seed)
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
                                 "ci95": _ci_or_none(x, seed)}
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


# ----------------------------------------------------------------------------- whole volumes

def window_starts(n: int, window: int, overlap: float) -> list[int]:
    """Starts of windows of ``window`` voxels covering ``n`` along one axis: the step is
    ``max(1, floor(window · (1 − overlap)))``, the last window ends at the last voxel, and
    an axis shorter than a window gets one window centred on it (padded with blanks)."""
    if n < 1 or window < 1:
        raise ValueError(f"axis of {n} voxels, window of {window}: both must be positive")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if n <= window:
        return [-((window - n) // 2)]
    step = max(1, int(window * (1 - overlap)))
    starts = list(range(0, n - window + 1, step))
    if starts[-1] != n - window:
        starts.append(n - window)
    return starts


def window_grid(shape: Sequence[int], window: Sequence[int], overlap: float
                ) -> list[tuple[int, int, int]]:
    """Every window start ``(z, y, x)`` of a sliding window over a ``[D, H, W]`` volume."""
    per_axis = [window_starts(int(n), int(w), overlap) for n, w in zip(shape, window)]
    return [(z, y, x) for z in per_axis[0] for y in per_axis[1] for x in per_axis[2]]


def gaussian_weights(window: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """``[D, H, W]`` float32 importance of each voxel of a window for stitching.

    A separable Gaussian centred on the window, standard deviation ``sigma_scale`` × the
    window's size on each axis (nnU-Net's 1/8), scaled to 1 at the centre. Predictions
    near a window's border (where the network saw zero padding instead of context) count
    less where windows overlap; the stitched value is Σ w·p / Σ w, so the weights cancel
    wherever every window agrees. Floored at float32's smallest normal number so a voxel
    only a window's corner reaches still has a defined (if lightly weighted) value.
    """
    if sigma_scale <= 0:
        raise ValueError(f"gaussian sigma scale must be positive, got {sigma_scale}")
    w = np.ones((), np.float64)
    for n in window:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2
        w = np.multiply.outer(w, np.exp(-0.5 * (x / (sigma_scale * n)) ** 2))
    w = (w / w.max()).astype(np.float32)
    return np.maximum(w, np.finfo(np.float32).tiny)


class Stitcher:
    """Window predictions → the volume's class probabilities, weighted per voxel.

    ``add(start, prob)`` with ``prob [d, h, w, K]`` at ``start (z, y, x)`` (parts outside
    the volume are dropped); ``result()`` → ``[K, D, H, W]`` = Σ weight·prob / Σ weight,
    and background (class 0 = 1) where no window reached. ``weights`` ``[d, h, w]``
    (:func:`gaussian_weights`) or None for a plain mean.
    """

    def __init__(self, shape: Sequence[int], num_classes: int, weights: np.ndarray | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.weights = weights
        self.total = np.zeros((num_classes, *self.shape), np.float32)
        self.weight = np.zeros(self.shape, np.float32)

    def add(self, start: Sequence[int], prob: np.ndarray) -> None:
        prob = np.asarray(prob, np.float32)
        lo = [max(s, 0) for s in start]
        hi = [min(s + n, dim) for s, n, dim in zip(start, prob.shape[:3], self.shape)]
        if any(h <= l for l, h in zip(lo, hi)):
            return
        dst = tuple(slice(l, h) for l, h in zip(lo, hi))
        src = tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))
        w = (np.ones(prob.shape[:3], np.float32) if self.weights is None
             else self.weights)[src]
        self.total[(slice(None), *dst)] += np.moveaxis(prob[src], -1, 0) * w
        self.weight[dst] += w

    def result(self) -> np.ndarray:
        out = np.divide(self.total, self.weight, out=np.zeros_like(self.total),
                        where=self.weight > 0)
        out[0][self.weight == 0] = 1.0
        return out


def _linear_positions(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    coords = np.clip(coords, 0, n - 1)
    lo = np.floor(coords).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    return lo, hi, (coords - lo).astype(np.float32)


def to_source_grid(prob: np.ndarray, source_shape: Sequence[int], source_slice_mm: float,
                   slice_spacing_mm: float) -> np.ndarray:
    """Class probabilities ``[K, D, H, W]`` on the training grid → class map ``uint8`` on
    the source grid ``[n_slices, rows, cols]`` (both in radnet orientation).

    The inverse of radnet.data.nifti.prepare_case's resampling: source slice i lies at
    training slice ``i × source_slice_mm / slice_spacing_mm`` (the first slices coincide),
    source pixel i at training pixel ``(i + 0.5) × n_train / n_source − 0.5``; positions
    past the ends take the end values. Linear in each axis, then argmax. Slice by slice
    with separable interpolation (hand-written: scipy's map_coordinates would need a
    coordinate array of 3 × the source grid, ~3 GB for a 512² × 500 LiTS case).
    """
    k, d, h, w = prob.shape
    n, rows, cols = (int(s) for s in source_shape)
    zl, zh, zw = _linear_positions(np.arange(n) * (source_slice_mm / slice_spacing_mm), d)
    rl, rh, rw = _linear_positions((np.arange(rows) + 0.5) * h / rows - 0.5, h)
    cl, ch, cw = _linear_positions((np.arange(cols) + 0.5) * w / cols - 0.5, w)
    out = np.empty((n, rows, cols), np.uint8)
    for i in range(n):
        plane = prob[:, zl[i]] * (1 - zw[i]) + prob[:, zh[i]] * zw[i]            # [K, H, W]
        plane = plane[:, rl] * (1 - rw)[:, None] + plane[:, rh] * rw[:, None]     # [K, rows, W]
        plane = plane[:, :, cl] * (1 - cw) + plane[:, :, ch] * cw                 # [K, rows, cols]
        out[i] = np.argmax(plane, axis=0)
    return out
