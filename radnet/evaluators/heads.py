"""Metrics of the 3D-RADNet heads, shared by validation during training and the report.

Pure NumPy, so they run on gathered host arrays the same way in a training loop, in the
evaluation task and in tests. Everything is computed the way the paper's Table 1 reports it:

- single-choice heads (sequence, view, contrast; softmax): per class, one-vs-rest
  samples (labelled positives), accuracy, AUC, recall and precision, where a sample is
  predicted positive when the class is the argmax; the head's total accuracy is the
  argmax accuracy.
- coverage (nine sigmoids): per region the same with a 0.5 probability threshold, and the
  exact-match accuracy over all nine regions.
- slice spacing (linear, mm): MAE and RMSE in mm.

Unknown labels (-1 for classes and regions, NaN for spacing) are masked out, and so are
padding rows when a ``mask`` is given. A metric that is undefined on the data (AUC for a
class without positives or without negatives, precision without predicted positives, any
metric without labelled samples) is ``None`` with its reason in the entry's ``undefined``
dict; no metric is ever NaN, so the result is always valid JSON.

Inputs to ``head_metrics`` are the model's raw outputs (logits, as ``radnet`` returns them);
the functions below it take probabilities or scores directly.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import scipy.special
import scipy.stats

from radnet import labels

COVERAGE_THRESHOLD = 0.5

Metric = float | None


# --------------------------------------------------------------------------- basics


def softmax(logits: np.ndarray) -> np.ndarray:
    """[N, K] logits → probabilities (float64, stable for large logits)."""
    return scipy.special.softmax(np.asarray(logits, dtype=np.float64), axis=-1)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Elementwise logistic function (float64, stable on both tails)."""
    return scipy.special.expit(np.asarray(logits, dtype=np.float64))


def _ratio(numerator: float, denominator: float, reason: str,
           undefined: dict[str, str], name: str) -> Metric:
    if denominator == 0:
        undefined[name] = reason
        return None
    return float(numerator) / float(denominator)


def midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` with ties given the mean of the ranks they span."""
    return scipy.stats.rankdata(np.asarray(values), method="average")


def binary_auc(scores: np.ndarray, is_positive: np.ndarray) -> tuple[Metric, str | None]:
    """Area under the ROC curve by the Mann–Whitney rank statistic.

    Tied scores count one half, which is the trapezoidal ROC area (scikit-learn's
    ``roc_auc_score``). Returns (auc, None) or (None, reason) when it is undefined.
    """
    scores = np.asarray(scores, dtype=np.float64)
    is_positive = np.asarray(is_positive, dtype=bool)
    n_pos = int(is_positive.sum())
    n_neg = int(is_positive.size - n_pos)
    if n_pos == 0:
        return None, f"no positive samples (all {n_neg} labelled samples are negative)"
    if n_neg == 0:
        return None, f"no negative samples (all {n_pos} labelled samples are positive)"
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        return None, f"{bad} predicted scores are not finite"
    ranks = midranks(scores)
    u = ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg)), None


def roc_curve(scores: np.ndarray, is_positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC points (fpr, tpr) for thresholds at every distinct score, from (0, 0) to (1, 1).

    Empty arrays when the curve is undefined (no positives, no negatives, non-finite scores).
    """
    scores = np.asarray(scores, dtype=np.float64)
    is_positive = np.asarray(is_positive, dtype=bool)
    n_pos = int(is_positive.sum())
    n_neg = int(is_positive.size - n_pos)
    if n_pos == 0 or n_neg == 0 or not np.all(np.isfinite(scores)):
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    y = is_positive[order]
    # Keep only the last index of each run of tied scores: a threshold admits all ties at once.
    last_of_run = np.append(s[1:] != s[:-1], True)
    tp = np.cumsum(y)[last_of_run]
    fp = np.cumsum(~y)[last_of_run]
    tpr = np.concatenate([[0.0], tp / n_pos])
    fpr = np.concatenate([[0.0], fp / n_neg])
    return fpr, tpr


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, K] counts, rows = true class, columns = predicted class. Inputs must be valid."""
    true = np.asarray(true, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    flat = true * num_classes + predicted
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes,
                                                                          num_classes)


def binary_table(scores: np.ndarray, is_positive: np.ndarray,
                 predicted_positive: np.ndarray) -> dict[str, Any]:
    """One row of Table 1: samples, accuracy, AUC, recall, precision of one class.

    ``scores`` rank samples for the AUC; ``predicted_positive`` is the decision (argmax
    for a softmax head, threshold for a sigmoid). All inputs are over labelled samples.
    """
    is_positive = np.asarray(is_positive, dtype=bool)
    predicted_positive = np.asarray(predicted_positive, dtype=bool)
    n = int(is_positive.size)
    tp = int(np.sum(is_positive & predicted_positive))
    tn = int(np.sum(~is_positive & ~predicted_positive))
    fp = int(np.sum(~is_positive & predicted_positive))
    fn = int(np.sum(is_positive & ~predicted_positive))
    undefined: dict[str, str] = {}
    row: dict[str, Any] = {"samples": tp + fn, "labelled": n, "tp": tp, "fp": fp, "fn": fn,
                           "tn": tn}
    row["accuracy"] = _ratio(tp + tn, n, "no labelled samples", undefined, "accuracy")
    if n == 0:
        row["auc"] = None
        undefined["auc"] = "no labelled samples"
    else:
        row["auc"], reason = binary_auc(scores, is_positive)
        if reason:
            undefined["auc"] = reason
    row["recall"] = _ratio(tp, tp + fn, "no positive samples", undefined, "recall")
    row["precision"] = _ratio(tp, tp + fp, "no sample predicted positive", undefined,
                              "precision")
    row["undefined"] = undefined
    return row


# --------------------------------------------------------------------------- heads


def _row_mask(n: int, mask: np.ndarray | None) -> np.ndarray:
    if mask is None:
        return np.ones(n, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"mask has shape {mask.shape}, expected ({n},)")
    return mask


def classification_metrics(probabilities: np.ndarray, targets: np.ndarray,
                           class_names: tuple[str, ...] | list[str],
                           mask: np.ndarray | None = None) -> dict[str, Any]:
    """A single-choice head: per-class one-vs-rest table and the total (argmax) accuracy.

    Args:
      probabilities: [N, K] class probabilities (softmax outputs; any scores rank the same
        way for AUC only if they are monotone per class, so pass probabilities).
      targets: [N] class indices, ``labels.UNKNOWN`` (-1) for unknown.
      class_names: K names, in head order.
      mask: [N] bool, False for rows to ignore (padding).
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets).astype(np.int64)
    k = len(class_names)
    if probabilities.ndim != 2 or probabilities.shape[1] != k:
        raise ValueError(f"probabilities have shape {probabilities.shape}, expected [N, {k}]")
    if targets.shape != probabilities.shape[:1]:
        raise ValueError(f"targets have shape {targets.shape}, expected "
                         f"({probabilities.shape[0]},)")
    rows = _row_mask(targets.shape[0], mask)
    out_of_range = rows & ((targets < labels.UNKNOWN) | (targets >= k))
    if out_of_range.any():
        raise ValueError(f"targets hold {sorted(set(targets[out_of_range].tolist()))}, "
                         f"outside 0..{k - 1} and {labels.UNKNOWN} (unknown)")
    known = rows & (targets != labels.UNKNOWN)
    p = probabilities[known]
    y = targets[known]
    predicted = np.argmax(p, axis=1) if p.shape[0] else np.zeros(0, dtype=np.int64)
    n = int(y.size)
    undefined: dict[str, str] = {}
    result: dict[str, Any] = {
        "samples": n,
        "unknown": int(np.sum(rows & (targets == labels.UNKNOWN))),
        "accuracy": _ratio(np.sum(predicted == y), n, "no labelled samples", undefined,
                           "accuracy"),
    }
    result["classes"] = {
        name: binary_table(p[:, c], y == c, predicted == c) for c, name in enumerate(class_names)
    }
    result["confusion"] = confusion_matrix(y, predicted, k).tolist()
    result["undefined"] = undefined
    return result


def multilabel_metrics(probabilities: np.ndarray, targets: np.ndarray,
                       label_names: tuple[str, ...] | list[str],
                       mask: np.ndarray | None = None,
                       threshold: float = COVERAGE_THRESHOLD) -> dict[str, Any]:
    """A multi-label head (coverage): per-label table at ``threshold`` and exact match.

    Args:
      probabilities: [N, L] sigmoid outputs.
      targets: [N, L] 0/1, -1 unknown (masked per entry).
      label_names: L names.
      mask: [N] bool, False for rows to ignore (padding).
      threshold: probability at or above which a label is predicted present.

    The exact match counts rows whose L labels are all known; a row with any unknown label
    cannot be judged as a whole and is left out of it (it is counted in ``unknown_rows``).
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets).astype(np.int64)
    n_labels = len(label_names)
    if probabilities.ndim != 2 or probabilities.shape[1] != n_labels:
        raise ValueError(f"probabilities have shape {probabilities.shape}, "
                         f"expected [N, {n_labels}]")
    if targets.shape != probabilities.shape:
        raise ValueError(f"targets have shape {targets.shape}, expected {probabilities.shape}")
    rows = _row_mask(targets.shape[0], mask)
    bad = rows[:, None] & ~np.isin(targets, (labels.UNKNOWN, 0, 1))
    if bad.any():
        raise ValueError(f"multi-label targets hold {sorted(set(targets[bad].tolist()))}; "
                         f"expected 0, 1 or {labels.UNKNOWN} (unknown)")
    known = rows[:, None] & (targets != labels.UNKNOWN)
    predicted = probabilities >= threshold
    per_label = {}
    for j, name in enumerate(label_names):
        keep = known[:, j]
        per_label[name] = binary_table(probabilities[keep, j], targets[keep, j] == 1,
                                       predicted[keep, j])
    complete = rows & np.all(targets != labels.UNKNOWN, axis=1)
    n_complete = int(complete.sum())
    undefined: dict[str, str] = {}
    exact = np.all(predicted[complete] == (targets[complete] == 1), axis=1)
    return {
        "samples": n_complete,
        "unknown_rows": int(np.sum(rows & ~complete)),
        "threshold": float(threshold),
        "exact_match": _ratio(exact.sum(), n_complete, "no sample with all labels known",
                              undefined, "exact_match"),
        "classes": per_label,
        "undefined": undefined,
    }


def regression_metrics(predicted_mm: np.ndarray, target_mm: np.ndarray,
                       mask: np.ndarray | None = None) -> dict[str, Any]:
    """Slice spacing: MAE and RMSE in mm over samples with a finite target.

    Args:
      predicted_mm: [N] predictions (a trailing axis of 1 is accepted).
      target_mm: [N] targets, NaN for unknown.
      mask: [N] bool, False for rows to ignore (padding).
    """
    predicted_mm = np.asarray(predicted_mm, dtype=np.float64)
    target_mm = np.asarray(target_mm, dtype=np.float64)
    if predicted_mm.ndim == 2 and predicted_mm.shape[1] == 1:
        predicted_mm = predicted_mm[:, 0]
    if predicted_mm.shape != target_mm.shape or target_mm.ndim != 1:
        raise ValueError(f"predictions {predicted_mm.shape} and targets {target_mm.shape} "
                         "must both be [N]")
    rows = _row_mask(target_mm.shape[0], mask)
    known = rows & np.isfinite(target_mm)
    n = int(known.sum())
    error = predicted_mm[known] - target_mm[known]
    undefined: dict[str, str] = {}
    result: dict[str, Any] = {"samples": n, "unknown": int(np.sum(rows & ~known))}
    bad = int((~np.isfinite(error)).sum())
    if n == 0:
        reason = "no sample with a known slice spacing"
    elif bad:
        reason = f"{bad} predictions are not finite"
    else:
        reason = None
    if reason:
        for name in ("mae_mm", "rmse_mm", "bias_mm"):
            result[name] = None
            undefined[name] = reason
    else:
        result["mae_mm"] = float(np.mean(np.abs(error)))
        result["rmse_mm"] = float(np.sqrt(np.mean(error ** 2)))
        result["bias_mm"] = float(np.mean(error))  # mean(pred - true): over/under-estimation
    result["undefined"] = undefined
    return result


def _spacing_target(targets: Mapping[str, np.ndarray]) -> np.ndarray:
    if labels.SLICE_SPACING_TARGET in targets:
        return targets[labels.SLICE_SPACING_TARGET]
    if "slice_spacing" in targets:
        return targets["slice_spacing"]
    raise KeyError(f"targets need {labels.SLICE_SPACING_TARGET!r} (the dataset's spacing array)")


def head_metrics(outputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                 mask: np.ndarray | None = None,
                 coverage_threshold: float = COVERAGE_THRESHOLD) -> dict[str, Any]:
    """All heads of a ``radnet`` model from its raw outputs and the dataset's labels.

    Args:
      outputs: the model's dict: ``sequence`` [N,5], ``view`` [N,3], ``contrast`` [N,2],
        ``coverage`` [N,9] logits, ``slice_spacing`` [N] mm (heads absent are skipped).
      targets: a batch of the pipeline (or the dataset arrays): ``sequence``, ``view``,
        ``contrast`` [N] int, ``coverage`` [N,9] int, ``effective_spacing_mm`` [N] float.
      mask: [N] bool, False for padding rows.

    Returns ``{head: metrics}`` as the report's ``"heads"`` entry.
    """
    heads: dict[str, Any] = {}
    for head, names in labels.CLASS_HEADS.items():
        if head in outputs:
            heads[head] = classification_metrics(softmax(outputs[head]), targets[head], names,
                                                 mask)
    for head, names in labels.MULTILABEL_HEADS.items():
        if head in outputs:
            heads[head] = multilabel_metrics(sigmoid(outputs[head]), targets[head], names, mask,
                                             coverage_threshold)
    for head in labels.REGRESSION_HEADS:
        if head in outputs:
            heads[head] = regression_metrics(outputs[head], _spacing_target(targets), mask)
    return heads


def summary(heads: Mapping[str, Any]) -> dict[str, float]:
    """The headline scalars, for logs and metrics.jsonl: ``{"sequence/accuracy": …,
    "coverage/exact_match": …, "slice_spacing/mae_mm": …, …}``; undefined ones are left out."""
    out: dict[str, float] = {}
    for head, m in heads.items():
        for key in ("accuracy", "exact_match", "mae_mm", "rmse_mm"):
            if m.get(key) is not None:
                out[f"{head}/{key}"] = float(m[key])
        aucs = [row["auc"] for row in m.get("classes", {}).values() if row["auc"] is not None]
        if aucs:
            out[f"{head}/mean_auc"] = float(np.mean(aucs))
    return out


class Accumulator:
    """Collects masked batches of outputs and targets on the host; ``compute()`` at the end.

    AUC needs every score at once, so the metrics are computed over the concatenation
    rather than averaged over batches. Rows with ``mask`` False (padding) are dropped
    when added, so every real sample is counted exactly once.
    """

    def __init__(self):
        self._outputs: dict[str, list[np.ndarray]] = {}
        self._targets: dict[str, list[np.ndarray]] = {}
        self._index: list[np.ndarray] = []

    def add(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> int:
        """Adds one batch; returns the number of real rows kept."""
        first = next(iter(outputs.values()))
        n = int(np.asarray(first).shape[0])
        keep = _row_mask(n, batch.get("mask"))
        for head, value in outputs.items():
            self._outputs.setdefault(head, []).append(np.asarray(value)[keep])
        target_names = (*labels.CLASS_HEADS, *labels.MULTILABEL_HEADS,
                        labels.SLICE_SPACING_TARGET)
        for name in target_names:
            if name in batch:
                self._targets.setdefault(name, []).append(np.asarray(batch[name])[keep])
        if "index" in batch:
            self._index.append(np.asarray(batch["index"])[keep])
        return int(keep.sum())

    def arrays(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(outputs, targets) concatenated over all batches added."""
        cat = lambda d: {k: np.concatenate(v, axis=0) for k, v in d.items()}
        targets = cat(self._targets)
        if self._index:
            targets["index"] = np.concatenate(self._index)
        return cat(self._outputs), targets

    def compute(self, coverage_threshold: float = COVERAGE_THRESHOLD) -> dict[str, Any]:
        outputs, targets = self.arrays()
        return head_metrics(outputs, targets, coverage_threshold=coverage_threshold)


# --------------------------------------------------------------------------- bootstrap CIs
#
# Confidence intervals by the percentile bootstrap over PATIENTS: series of one patient are
# not independent (same anatomy, same scanner), so a resample draws patients with
# replacement and takes all their series. A resample is a vector of row weights (how often
# the row's patient was drawn), and every metric below is its weighted form, so all
# resamples are computed at once with array operations; at weights 1 each equals the point
# estimate of the functions above (tests/radnet/test_metrics.py checks it).


def bootstrap_weights(groups: np.ndarray, num_samples: int, seed: int = 0) -> np.ndarray:
    """[B, N] row weights of ``num_samples`` resamples of the distinct ``groups`` [N]."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    g = int(inverse.max()) + 1 if inverse.size else 0
    if g == 0:
        return np.zeros((num_samples, 0))
    counts = np.random.default_rng(seed).multinomial(g, np.full(g, 1.0 / g), size=num_samples)
    return counts[:, inverse].astype(np.float64)


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def weighted_accuracy(correct: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[B] share of weight on correct rows (``correct`` [N] over the labelled rows)."""
    return _divide(weights @ np.asarray(correct, np.float64), weights.sum(axis=1))


def weighted_auc(scores: np.ndarray, is_positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[B] Mann–Whitney AUC with row weights (ties count one half), NaN where a resample
    has no positives or no negatives: Σ w_i w_j [s_i > s_j] / (Σ w_pos Σ w_neg) in O(B·N)."""
    scores = np.asarray(scores, np.float64)
    is_positive = np.asarray(is_positive, bool)
    order = np.argsort(scores, kind="mergesort")
    s, pos = scores[order], is_positive[order]
    w = weights[:, order]
    w_pos, w_neg = w * pos, w * ~pos
    cum_neg = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(w_neg, axis=1)], axis=1)
    lo, hi = np.searchsorted(s, s, "left"), np.searchsorted(s, s, "right")
    below, tied = cum_neg[:, lo], cum_neg[:, hi] - cum_neg[:, lo]
    num = (w_pos * (below + 0.5 * tied)).sum(axis=1)
    return _divide(num, w_pos.sum(axis=1) * w_neg.sum(axis=1))


def _interval(values: np.ndarray, level: float) -> list[float] | None:
    finite = values[np.isfinite(values)]
    if finite.size < 0.5 * values.size or finite.size == 0:
        return None  # undefined in most resamples: no interval worth showing
    tail = 50.0 * (1.0 - level)
    lo, hi = np.percentile(finite, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def bootstrap_intervals(outputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                        groups: np.ndarray, num_samples: int = 1000, seed: int = 0,
                        level: float = 0.95,
                        coverage_threshold: float = COVERAGE_THRESHOLD) -> dict[str, Any]:
    """Percentile-bootstrap intervals, resampling ``groups`` (patients) [N], of the metrics
    ``head_metrics`` reports as accuracy, AUC, exact match and MAE.

    Returns ``{head: {"accuracy"|"exact_match"|"mae_mm": [lo, hi], "classes": {name:
    {"accuracy": [lo, hi], "auc": [lo, hi]}}}}``; an entry is None when the metric is
    undefined in most resamples.
    """
    weights = bootstrap_weights(groups, num_samples, seed)
    out: dict[str, Any] = {}
    for head, names in labels.CLASS_HEADS.items():
        if head not in outputs:
            continue
        y = np.asarray(targets[head]).astype(np.int64)
        known = y != labels.UNKNOWN
        p, y, w = softmax(outputs[head])[known], y[known], weights[:, known]
        predicted = np.argmax(p, axis=1) if p.shape[0] else np.zeros(0, np.int64)
        out[head] = {
            "accuracy": _interval(weighted_accuracy(predicted == y, w), level),
            "classes": {name: {
                "accuracy": _interval(weighted_accuracy((predicted == c) == (y == c), w), level),
                "auc": _interval(weighted_auc(p[:, c], y == c, w), level)}
                for c, name in enumerate(names)}}
    for head, names in labels.MULTILABEL_HEADS.items():
        if head not in outputs:
            continue
        y = np.asarray(targets[head]).astype(np.int64)
        p = sigmoid(outputs[head])
        predicted = p >= coverage_threshold
        complete = np.all(y != labels.UNKNOWN, axis=1)
        exact = np.all(predicted[complete] == (y[complete] == 1), axis=1)
        classes = {}
        for j, name in enumerate(names):
            keep = y[:, j] != labels.UNKNOWN
            classes[name] = {
                "accuracy": _interval(weighted_accuracy(
                    predicted[keep, j] == (y[keep, j] == 1), weights[:, keep]), level),
                "auc": _interval(weighted_auc(p[keep, j], y[keep, j] == 1, weights[:, keep]),
                                 level)}
        out[head] = {"exact_match": _interval(weighted_accuracy(exact, weights[:, complete]),
                                              level),
                     "classes": classes}
    for head in labels.REGRESSION_HEADS:
        if head in outputs:
            pred = np.asarray(outputs[head], np.float64).reshape(-1)
            true = np.asarray(_spacing_target(targets), np.float64)
            keep = np.isfinite(true) & np.isfinite(pred)
            w = weights[:, keep]
            out[head] = {"mae_mm": _interval(
                _divide(w @ np.abs(pred[keep] - true[keep]), w.sum(axis=1)), level)}
    return out
