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


# ----------------------------------------------------------------------------- surfaces

def _box(lo, hi, shape=(10, 10, 10)):
    m = np.zeros(shape, bool)
    m[lo:hi, lo:hi, lo:hi] = True
    return m


def test_hd95_and_surface_dice_of_nested_boxes_by_hand():
    # Truth: a 6³ box, prediction: the 4³ box inside it, 1 mm voxels. Every predicted
    # surface voxel is 1 mm from the true surface. The true surface's 152 voxels: 96 face
    # voxels at 1 mm, 48 edge voxels at √2, 8 corners at √3 from the predicted surface.
    truth, pred = _box(2, 8), _box(3, 7)
    q95 = np.sqrt(2) + 0.45 * (np.sqrt(3) - np.sqrt(2))     # position 0.95·151 = 143.45
    hd95, nsd = seg_metrics.hd95_nsd(pred, truth, (1.0, 1.0, 1.0), tolerance_mm=1.0)
    assert hd95 == pytest.approx(q95, abs=1e-9)
    assert nsd == pytest.approx((56 + 96) / (56 + 152))
    assert seg_metrics.hd95_nsd(pred, truth, (1, 1, 1), 1.5)[1] == pytest.approx(200 / 208)
    assert seg_metrics.hd95_nsd(pred, truth, (1, 1, 1), 1.8)[1] == 1.0
    # Symmetric in its arguments.
    assert seg_metrics.hd95_nsd(truth, pred, (1, 1, 1), 1.0) == pytest.approx((hd95, nsd))


def test_hd95_uses_the_physical_spacing():
    # Two single voxels 3 slices apart: 3 × 2.5 mm = 7.5 mm, whatever the in-plane spacing.
    a = np.zeros((8, 4, 4), bool)
    b = a.copy()
    a[2, 1, 1] = b[5, 1, 1] = True
    assert seg_metrics.hd95_nsd(a, b, (2.5, 0.7, 0.7), 7.4) == pytest.approx((7.5, 0.0))
    assert seg_metrics.hd95_nsd(a, b, (2.5, 0.7, 0.7), 7.5) == pytest.approx((7.5, 1.0))


def test_surface_distances_match_brute_force_on_anisotropic_blobs():
    from scipy import ndimage
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(1)
    spacing = (3.0, 0.8, 1.1)
    pred = ndimage.binary_opening(rng.random((9, 14, 12)) < 0.55)
    truth = ndimage.binary_opening(rng.random((9, 14, 12)) < 0.55)

    def surface_points(m):          # face-neighbour outside (the array border counts)
        padded = np.pad(m, 1)
        inner = np.ones_like(m)
        for axis in range(3):
            for step in (-1, 1):
                inner &= np.roll(padded, step, axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(m & ~inner) * np.array(spacing)

    d = cdist(surface_points(pred), surface_points(truth))
    d_pt, d_tp = d.min(axis=1), d.min(axis=0)
    want_hd = max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))
    want_nsd = ((d_pt <= 2.0).sum() + (d_tp <= 2.0).sum()) / (d_pt.size + d_tp.size)
    assert seg_metrics.hd95_nsd(pred, truth, spacing, 2.0) == pytest.approx((want_hd, want_nsd))


def test_surface_metrics_empty_conventions():
    e = np.zeros((4, 5, 6), bool)
    one = e.copy()
    one[1, 1, 1] = True
    assert seg_metrics.hd95_nsd(e, e, (1, 1, 1), 1.0) == (0.0, 1.0)
    diagonal = np.sqrt((4 * 2.0) ** 2 + 5 ** 2 + 6 ** 2)
    assert seg_metrics.hd95_nsd(one, e, (2, 1, 1), 1.0) == pytest.approx((diagonal, 0.0))
    assert seg_metrics.hd95_nsd(e, one, (2, 1, 1), 1.0) == pytest.approx((diagonal, 0.0))


def test_case_metrics_per_class_and_summaries_with_intervals():
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[2:8, 2:8, 2:8] = 1
    truth[4:6, 4:6, 4:6] = 2
    pred = truth.copy()
    pred[pred == 2] = 1                                      # class 2 missed entirely
    m = seg_metrics.case_metrics(pred, truth, ["background", "liver", "tumour"], (1, 1, 1), 1.0)
    assert set(m) == {"liver", "tumour"}
    assert m["tumour"] == {"dice": 0.0, "iou": 0.0, "hd95_mm": pytest.approx(np.sqrt(300)),
                           "nsd": 0.0}
    assert m["liver"]["dice"] == pytest.approx(2 * 208 / (216 + 208))
    per_case = {f"c{k}": {"liver": {"dice": d, "iou": d / 2}} for k, d in
                enumerate([0.6, 0.7, 0.8, 0.9, 0.95])}
    s = seg_metrics.summarize_classes(per_case, seed=0)["liver"]["dice"]
    assert s["n"] == 5 and s["mean"] == pytest.approx(0.79) and s["median"] == 0.8
    lo, hi = s["ci95"]
    assert 0.6 <= lo < 0.79 < hi <= 0.95
    assert seg_metrics.summarize_classes(per_case, seed=0)["liver"]["dice"]["ci95"] == [lo, hi]
    assert np.isnan(seg_metrics.bootstrap_ci([0.5])).all()
    means = seg_metrics.case_means({"a": m})["a"]
    assert means["dice"] == pytest.approx((m["liver"]["dice"] + 0.0) / 2)
