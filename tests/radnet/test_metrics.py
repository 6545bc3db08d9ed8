"""radnet.evaluators.heads against scikit-learn and against a table worked out by hand."""

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from radnet import labels
from radnet.evaluators import heads as metrics


def _quantised_probabilities(rng, n, k, step):
    """Random probabilities rounded to ``step`` so that many scores tie."""
    p = rng.dirichlet(np.ones(k), size=n)
    return np.round(p / step) * step


@pytest.mark.parametrize("seed,step", [(0, 1e-9), (1, 0.1), (2, 0.25)])
def test_classification_agrees_with_sklearn(seed, step):
    rng = np.random.default_rng(seed)
    n, names = 200, labels.SEQUENCE
    k = len(names)
    p = _quantised_probabilities(rng, n, k, step)
    y = rng.integers(0, k, size=n)
    y[rng.random(n) < 0.1] = labels.UNKNOWN          # unknown labels are masked
    mask = rng.random(n) > 0.05                      # padding rows are masked
    got = metrics.classification_metrics(p, y, names, mask)

    keep = mask & (y != labels.UNKNOWN)
    pk, yk = p[keep], y[keep]
    pred = np.argmax(pk, axis=1)
    assert got["samples"] == keep.sum()
    assert got["unknown"] == np.sum(mask & (y == labels.UNKNOWN))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(yk, pred), abs=1e-6)
    assert np.array_equal(got["confusion"], skm.confusion_matrix(yk, pred, labels=range(k)))
    sk_auc = skm.roc_auc_score(yk, pk, multi_class="ovr",
                               average=None) if step < 1e-6 else None
    for c, name in enumerate(names):
        row = got["classes"][name]
        t, d = yk == c, pred == c
        assert row["samples"] == t.sum()
        assert row["accuracy"] == pytest.approx(skm.accuracy_score(t, d), abs=1e-6)
        assert row["auc"] == pytest.approx(skm.roc_auc_score(t, pk[:, c]), abs=1e-6)
        assert row["recall"] == pytest.approx(skm.recall_score(t, d), abs=1e-6)
        assert row["precision"] == pytest.approx(skm.precision_score(t, d), abs=1e-6)
        if sk_auc is not None:
            assert row["auc"] == pytest.approx(sk_auc[c], abs=1e-6)
        assert row["undefined"] == {}


@pytest.mark.parametrize("seed,step", [(3, 1e-9), (4, 0.1), (5, 0.5)])
def test_multilabel_coverage_agrees_with_sklearn(seed, step):
    rng = np.random.default_rng(seed)
    n, names = 300, labels.COVERAGE
    p = np.round(rng.random((n, len(names))) / step) * step   # step 0.5: exactly 0.5 occurs
    # Labels correlated with the scores so that exact matches actually happen.
    y = (rng.random((n, len(names))) < 0.3 + 0.5 * (p > 0.5)).astype(np.int64)
    y[rng.random(n) < 0.1] = labels.UNKNOWN          # whole rows unknown
    y[rng.random((n, len(names))) < 0.02] = labels.UNKNOWN   # and a few single regions
    mask = rng.random(n) > 0.05
    got = metrics.multilabel_metrics(p, y, names, mask, threshold=0.5)

    decision = p >= 0.5
    complete = mask & np.all(y != labels.UNKNOWN, axis=1)
    assert got["samples"] == complete.sum()
    # scikit-learn's accuracy on indicator matrices is the subset (exact-match) accuracy.
    assert got["exact_match"] == pytest.approx(
        skm.accuracy_score(y[complete], decision[complete].astype(int)), abs=1e-6)
    assert 0 < got["exact_match"] < 1
    sk_auc = skm.roc_auc_score(y[complete], p[complete], average=None)
    for j, name in enumerate(names):
        row = got["classes"][name]
        keep = mask & (y[:, j] != labels.UNKNOWN)
        t, d = y[keep, j] == 1, decision[keep, j]
        assert row["labelled"] == keep.sum() and row["samples"] == t.sum()
        assert row["accuracy"] == pytest.approx(skm.accuracy_score(t, d), abs=1e-6)
        assert row["auc"] == pytest.approx(skm.roc_auc_score(t, p[keep, j]), abs=1e-6)
        assert row["recall"] == pytest.approx(skm.recall_score(t, d), abs=1e-6)
        assert row["precision"] == pytest.approx(skm.precision_score(t, d), abs=1e-6)
        # On the rows complete in all nine regions, the per-label AUC matches sklearn's
        # multilabel averaging=None path too.
        sub = metrics.binary_auc(p[complete, j], y[complete, j] == 1)[0]
        assert sub == pytest.approx(sk_auc[j], abs=1e-6)


def test_regression_agrees_with_sklearn():
    rng = np.random.default_rng(6)
    target = rng.uniform(0.5, 15, size=100).astype(np.float32)
    target[::7] = np.nan
    pred = target + rng.normal(0, 2, size=100)
    pred[np.isnan(pred)] = 3.0
    mask = np.ones(100, bool)
    mask[-3:] = False
    got = metrics.regression_metrics(pred, target, mask)
    keep = mask & np.isfinite(target)
    assert got["samples"] == keep.sum()
    assert got["mae_mm"] == pytest.approx(skm.mean_absolute_error(target[keep], pred[keep]),
                                          abs=1e-6)
    assert got["rmse_mm"] == pytest.approx(
        skm.root_mean_squared_error(target[keep], pred[keep]), abs=1e-6)


def test_roc_curve_agrees_with_sklearn():
    rng = np.random.default_rng(7)
    s = np.round(rng.random(80), 1)
    t = rng.random(80) < 0.4
    fpr, tpr = metrics.roc_curve(s, t)
    sk_fpr, sk_tpr, _ = skm.roc_curve(t, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.binary_auc(s, t)[0], abs=1e-12)


def test_midranks_average_ties():
    np.testing.assert_array_equal(metrics.midranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])),
                                  [4.0, 1.0, 4.0, 2.0, 4.0])


def test_six_samples_by_hand():
    """A 6-sample view head, every entry of the table worked out by hand.

    sample  true      p(axial, coronal, sagittal)  argmax
    s0      axial     0.70 0.20 0.10               axial      right
    s1      axial     0.45 0.50 0.05               coronal    wrong
    s2      axial     0.60 0.30 0.10               axial      right
    s3      coronal   0.20 0.70 0.10               coronal    right
    s4      coronal   0.30 0.60 0.10               coronal    right
    s5      sagittal  0.45 0.15 0.40               axial      wrong
    plus a row with an unknown view and a padding row, both of which must be ignored.
    """
    p = np.array([[0.70, 0.20, 0.10], [0.45, 0.50, 0.05], [0.60, 0.30, 0.10],
                  [0.20, 0.70, 0.10], [0.30, 0.60, 0.10], [0.45, 0.15, 0.40],
                  [0.10, 0.10, 0.80],    # unknown label
                  [0.90, 0.05, 0.05]])   # padding
    y = np.array([0, 0, 0, 1, 1, 2, labels.UNKNOWN, 1])
    mask = np.array([1, 1, 1, 1, 1, 1, 1, 0], bool)
    got = metrics.classification_metrics(p, y, labels.VIEW, mask)

    assert got["samples"] == 6 and got["unknown"] == 1
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["confusion"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    axial, coronal, sagittal = (got["classes"][v] for v in labels.VIEW)
    # Axial: positives s0 s1 s2; predicted axial s0 s2 s5 → TP 2, FP 1 (s5), FN 1 (s1), TN 2.
    # AUC: positive scores .70 .45 .60 vs negative .20 .30 .45: pairs won 3 + 2.5 (tie) + 3.
    assert (axial["samples"], axial["tp"], axial["fp"], axial["fn"], axial["tn"]) == (3, 2, 1,
                                                                                     1, 2)
    assert axial["accuracy"] == pytest.approx(4 / 6)
    assert axial["auc"] == pytest.approx(8.5 / 9)
    assert axial["recall"] == pytest.approx(2 / 3)
    assert axial["precision"] == pytest.approx(2 / 3)
    # Coronal: positives s3 s4; predicted coronal s1 s3 s4 → TP 2, FP 1, FN 0, TN 3.
    # AUC: .70 .60 beat every negative (.20 .50 .30 .15) → 1.
    assert coronal["samples"] == 2
    assert coronal["accuracy"] == pytest.approx(5 / 6)
    assert coronal["auc"] == pytest.approx(1.0)
    assert coronal["recall"] == pytest.approx(1.0)
    assert coronal["precision"] == pytest.approx(2 / 3)
    # Sagittal: positive s5 (.40) beats all negatives (.10 .05 .10 .10 .10) → AUC 1, but it
    # is never the argmax: TP 0, FN 1, TN 5; precision has no predicted positive → null.
    assert sagittal["samples"] == 1
    assert sagittal["accuracy"] == pytest.approx(5 / 6)
    assert sagittal["auc"] == pytest.approx(1.0)
    assert sagittal["recall"] == 0.0
    assert sagittal["precision"] is None
    assert "no sample predicted positive" in sagittal["undefined"]["precision"]

    # Coverage on two regions of the same six samples, threshold 0.5 (0.5 itself counts).
    cov_p = np.array([[0.9, 0.1], [0.5, 0.4], [0.2, 0.6], [0.8, 0.7], [0.3, 0.2], [0.6, 0.5]])
    cov_y = np.array([[1, 0], [0, 0], [0, 1], [1, 0], [0, 0], [1, 1]])
    cov = metrics.multilabel_metrics(cov_p, cov_y, ("brain", "lung"))
    # Decisions: [1,0] [1,0] [0,1] [1,1] [0,0] [1,1]; exact match rows s0 s2 s4 s5 → 4/6.
    assert cov["exact_match"] == pytest.approx(4 / 6)
    brain, lung = cov["classes"]["brain"], cov["classes"]["lung"]
    # Brain: positives s0 s3 s5, decided s0 s1 s3 s5 → TP 3, FP 1, TN 2; AUC: .9 .8 .6 beat
    # .5 .2 .3 → 1.
    assert (brain["samples"], brain["accuracy"], brain["recall"], brain["precision"],
            brain["auc"]) == pytest.approx((3, 5 / 6, 1.0, 3 / 4, 1.0))
    # Lung: positives s2 s5 (.6 .5), negatives .1 .4 .7 .2; decided s2 s3 s5 → TP 2, FP 1,
    # TN 3. AUC: .6 beats 3 of 4, .5 beats 3 of 4 → 6/8.
    assert (lung["samples"], lung["accuracy"], lung["recall"], lung["precision"],
            lung["auc"]) == pytest.approx((2, 5 / 6, 1.0, 2 / 3, 6 / 8))

    # Slice spacing errors +1 -1 +2 0 0 -2 mm → MAE 1, RMSE sqrt(10/6).
    true_mm = np.array([5.0, 5.0, 2.5, 1.0, 3.0, 10.0])
    reg = metrics.regression_metrics(true_mm + [1, -1, 2, 0, 0, -2], true_mm)
    assert reg["mae_mm"] == pytest.approx(1.0)
    assert reg["rmse_mm"] == pytest.approx(math.sqrt(10 / 6))
    assert reg["bias_mm"] == pytest.approx(0.0)


def test_undefined_cases_are_null_with_reason_and_json_safe():
    # Contrast head where every labelled sample is non-contrast: class 'contrast' has no
    # positives, class 'no_contrast' no negatives.
    p = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    y = np.array([0, 0, 0])
    got = metrics.classification_metrics(p, y, labels.CONTRAST)
    c = got["classes"]["contrast"]
    assert c["auc"] is None and "no positive samples" in c["undefined"]["auc"]
    assert c["recall"] is None and "no positive" in c["undefined"]["recall"]
    assert c["precision"] == 0.0          # s1 was predicted contrast: defined, and wrong
    nc = got["classes"]["no_contrast"]
    assert nc["auc"] is None and "no negative samples" in nc["undefined"]["auc"]
    # All unknown: nothing to measure, still no NaN and no crash.
    empty = metrics.classification_metrics(p, np.full(3, labels.UNKNOWN), labels.CONTRAST)
    assert empty["accuracy"] is None and empty["samples"] == 0
    reg = metrics.regression_metrics(np.ones(3), np.full(3, np.nan))
    assert reg["mae_mm"] is None and "no sample" in reg["undefined"]["mae_mm"]
    reg = metrics.regression_metrics(np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    assert reg["rmse_mm"] is None and "not finite" in reg["undefined"]["rmse_mm"]
    cov = metrics.multilabel_metrics(np.full((2, 9), 0.7), np.full((2, 9), labels.UNKNOWN),
                                     labels.COVERAGE)
    assert cov["exact_match"] is None and cov["unknown_rows"] == 2
    for result in (got, empty, reg, cov):
        json.dumps(result, allow_nan=False)   # raises on any NaN or inf
    with pytest.raises(ValueError, match="outside 0..1"):
        metrics.classification_metrics(p, np.array([0, 2, 0]), labels.CONTRAST)


def test_head_metrics_from_logits_and_accumulator():
    rng = np.random.default_rng(8)
    n = 23
    outputs = {h: rng.normal(size=(n, labels.HEAD_SIZES[h])) for h in
               (*labels.CLASS_HEADS, *labels.MULTILABEL_HEADS)}
    outputs["slice_spacing"] = rng.uniform(1, 10, n)
    batch = {h: rng.integers(0, labels.HEAD_SIZES[h], n) for h in labels.CLASS_HEADS}
    batch["coverage"] = rng.integers(0, 2, (n, 9))
    batch["effective_spacing_mm"] = rng.uniform(1, 10, n)
    whole = metrics.head_metrics(outputs, batch)
    # Fed in batches of 5 with 2 padding rows appended to each, the result is identical.
    acc = metrics.Accumulator()
    for s in range(0, n, 5):
        sl = slice(s, min(s + 5, n))
        pad = lambda a: np.concatenate([a[sl], a[sl][:1].repeat(2, 0)])
        b = {k: pad(v) for k, v in batch.items()}
        b["mask"] = np.r_[np.ones(sl.stop - sl.start, bool), False, False]
        acc.add({k: pad(v) for k, v in outputs.items()}, b)
    assert acc.compute() == whole
    assert set(whole) == set(labels.HEADS)
    s = metrics.summary(whole)
    assert s["sequence/accuracy"] == whole["sequence"]["accuracy"]
    assert s["slice_spacing/mae_mm"] == whole["slice_spacing"]["mae_mm"]
    assert "coverage/exact_match" in s
    # Softmax preserves the argmax and sums to one, even for huge logits.
    big = np.array([[1000.0, 0.0, -1000.0]])
    assert metrics.softmax(big).sum() == pytest.approx(1.0)
    assert metrics.sigmoid(np.array([-1000.0, 0.0, 1000.0])).tolist() == [0.0, 0.5, 1.0]
