"""Patient-level bootstrap intervals of the report (radnet/evaluators/heads.py)."""

import numpy as np
import pytest

from radnet import labels
from radnet.evaluators import heads


def test_weighted_metrics_equal_the_plain_ones_on_repeated_rows():
    """Weights are row repetitions: a weighted AUC/accuracy equals the plain metric of the
    data with each row repeated that many times (ties included)."""
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=40), 1)  # rounding makes ties
    positive = rng.random(40) < 0.4
    w = rng.integers(0, 4, size=(5, 40)).astype(float)
    got = heads.weighted_auc(scores, positive, w)
    for b in range(5):
        want, _ = heads.binary_auc(np.repeat(scores, w[b].astype(int)),
                                   np.repeat(positive, w[b].astype(int)))
        assert got[b] == pytest.approx(want, abs=1e-12)
    ones = np.ones((1, 40))
    assert heads.weighted_auc(scores, positive, ones)[0] == pytest.approx(
        heads.binary_auc(scores, positive)[0])
    correct = scores > 0
    assert heads.weighted_accuracy(correct, w)[2] == pytest.approx(
        np.repeat(correct, w[2].astype(int)).mean())


def test_a_patient_is_drawn_with_all_its_series():
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    w = heads.bootstrap_weights(groups, 200, seed=1)
    assert w.shape == (200, 6)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 5]).all()
    per_group = w[:, [0, 2, 3]]
    assert (per_group.sum(axis=1) == 3).all()  # 3 patients drawn per resample


def test_intervals_hold_the_estimate_and_narrow_with_more_patients():
    rng = np.random.default_rng(2)

    def data(n_patients):
        n = 3 * n_patients
        y = rng.integers(0, 2, n)
        logits = np.stack([-y + rng.normal(0, 1.2, n), y + rng.normal(0, 1.2, n)], axis=1)
        return {"contrast": logits}, {"contrast": y}, np.repeat(np.arange(n_patients), 3)

    widths = []
    for n_patients in (15, 150):
        outputs, targets, groups = data(n_patients)
        ci = heads.bootstrap_intervals(outputs, targets, groups, 500, seed=0)["contrast"]
        point = heads.head_metrics(outputs, targets)["contrast"]
        lo, hi = ci["accuracy"]
        assert lo <= point["accuracy"] <= hi
        lo_auc, hi_auc = ci["classes"]["contrast"]["auc"]
        assert lo_auc <= point["classes"]["contrast"]["auc"] <= hi_auc
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_undefined_in_most_resamples_gives_no_interval():
    # no sample of the class "contrast": its AUC is undefined in every resample
    y = np.zeros(30, int)
    logits = np.stack([np.zeros(30), np.linspace(0, 1, 30)], axis=1)
    ci = heads.bootstrap_intervals({"contrast": logits}, {"contrast": y}, np.arange(30), 300)
    assert ci["contrast"]["classes"]["contrast"]["auc"] is None
    assert ci["contrast"]["accuracy"] is not None
    assert set(ci["contrast"]["classes"]) == set(labels.CONTRAST)
