"""Dice / IoU against a direct NumPy reference, empty masks included."""

import numpy as np
import pytest

from radnet.evaluators import segmentation as seg_metrics


def _reference(pred, truth):
    # Independent reference: voxel sets as flat index sets.
    p = set(np.flatnonzero(pred).tolist())
    t = set(np.flatnonzero(truth).tolist())
    if not p and not t:
        return 1.0, 1.0
    return 2 * len(p & t) / (len(p) + len(t)), len(p & t) / len(p | t)


def _cases():
    rng = np.random.default_rng(0)
    shape = (3, 5, 4)
    out = [rng.random(shape) < q for q in (0.1, 0.5, 0.9)]
    truths = [rng.random(shape) < q for q in (0.3, 0.5, 0.7)]
    pairs = list(zip(out, truths))
    empty, full = np.zeros(shape, bool), np.ones(shape, bool)
    pairs += [(empty, empty), (empty, truths[0]), (out[0], empty), (full, full),
              (truths[1], truths[1])]
    return pairs


@pytest.mark.parametrize("i", range(8))
def test_numpy_metrics_match_reference(i):
    pred, truth = _cases()[i]
    d_ref, j_ref = _reference(pred, truth)
    assert seg_metrics.dice(pred, truth) == pytest.approx(d_ref, abs=1e-12)
    assert seg_metrics.iou(pred, truth) == pytest.approx(j_ref, abs=1e-12)
    assert seg_metrics.dice_iou(pred, truth) == pytest.approx((d_ref, j_ref), abs=1e-12)


def test_empty_masks_convention():
    e = np.zeros((2, 2), bool)
    one = e.copy()
    one[0, 0] = True
    assert seg_metrics.dice(e, e) == 1.0 and seg_metrics.iou(e, e) == 1.0
    assert seg_metrics.dice(one, e) == 0.0 and seg_metrics.iou(e, one) == 0.0


def test_summary_mean_and_median():
    s = seg_metrics.summarize({"a": {"dice": 0.9, "iou": 0.8}, "b": {"dice": 0.1, "iou": 0.05},
                               "c": {"dice": 0.5, "iou": 0.4}})
    assert s["n"] == 3
    assert s["mean_dice"] == pytest.approx(0.5) and s["median_dice"] == pytest.approx(0.5)
    assert s["mean_iou"] == pytest.approx(1.25 / 3) and s["median_iou"] == pytest.approx(0.4)
    with pytest.raises(ValueError):
        seg_metrics.summarize([])


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ in shape"):
        seg_metrics.dice(np.zeros((2, 3)), np.zeros((3, 2)))
