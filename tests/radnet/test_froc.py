"""radnet.detection.froc against a brute-force reference of the DeepLesion protocol and a
hand-worked example; per-group sensitivities, the table and the PNG."""

import os

import numpy as np
import pytest

import radnet.detection
from radnet.detection import boxes as box_lib
from radnet.detection.froc import format_table, plot_froc


def brute_force(predictions, ground_truth, fps_per_image, thr, criterion="iou"):
    """The protocol by prefixes: for each prefix of the score-sorted predictions, count the
    predictions overlapping no box (FPs) and the boxes overlapped by any prediction (found);
    the sensitivity at f is that of the longest prefix with FPs / images ≤ f."""
    overlap = {"iou": box_lib.iou, "iobb": box_lib.iobb}[criterion]
    flat = [(s, i, j) for i, (b, sc) in enumerate(predictions) for j, s in enumerate(sc)]
    order = sorted(range(len(flat)), key=lambda k: -flat[k][0])  # Python's sort is stable
    flat = [flat[k] for k in order]
    total = sum(len(g) for g in ground_truth)
    n_img = len(ground_truth)
    points = []
    for n in range(len(flat) + 1):
        fp, found = 0, set()
        for _, i, j in flat[:n]:
            g = np.asarray(ground_truth[i], float).reshape(-1, 4)
            ov = overlap(np.asarray(predictions[i][0], float)[j:j + 1], g)[0] if len(g) else []
            if not any(o >= thr for o in ov):
                fp += 1
            found |= {(i, m) for m, o in enumerate(ov) if o >= thr}
        points.append((fp / n_img, len(found) / total))
    out = {}
    for f in fps_per_image:
        ok = [s for x, s in points if x <= f]
        out[f] = ok[-1]
    return out, points[1:]


def random_case(rng):
    n_img = int(rng.integers(1, 6))
    gts, preds = [], []
    for _ in range(n_img):
        m = int(rng.integers(0, 4))
        xy = rng.uniform(0, 80, (m, 2))
        wh = rng.uniform(4, 20, (m, 2))
        g = np.concatenate([xy, xy + wh], 1)
        gts.append(g)
        n = int(rng.integers(0, 8))
        p = []
        for _ in range(n):
            if m and rng.random() < 0.6:  # jittered copies of a truth box: hits, near misses
                b = g[rng.integers(m)] + rng.normal(0, 3, 4)
            else:
                c = rng.uniform(0, 90, 2)
                b = np.concatenate([c, c + rng.uniform(3, 20, 2)])
            p.append(b)
        scores = np.round(rng.random(n), 1)  # rounded: ties happen
        preds.append((np.asarray(p).reshape(-1, 4), scores))
    if sum(len(g) for g in gts) == 0:
        gts[0] = np.array([[1.0, 1, 9, 9]])
    return preds, gts


@pytest.mark.parametrize("criterion", ["iou", "iobb"])
def test_equals_brute_force_on_random_cases(criterion):
    rng = np.random.default_rng(0)
    fps = (0.125, 0.25, 0.5, 1, 2, 4, 8, 16)
    for _ in range(150):
        preds, gts = random_case(rng)
        thr = float(rng.choice([0.3, 0.5, 0.7]))
        got = radnet.detection.froc(preds, gts, fps_per_image=fps, iou_threshold=thr,
                                    criterion=criterion)
        want, points = brute_force(preds, gts, fps, thr, criterion)
        assert got["sensitivity"] == pytest.approx(want)
        np.testing.assert_allclose(got["fps"], [p[0] for p in points])
        np.testing.assert_allclose(got["sensitivities"], [p[1] for p in points])


def test_hand_worked_example():
    gts = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([[0, 0, 10, 10]])]
    preds = [
        (np.array([[0, 0, 10, 10],        # .9 finds A
                   [50, 50, 60, 60],      # .8 FP
                   [0, 0, 10, 10],        # .7 hits A again: neither
                   [20, 20, 30, 30]]),    # .3 finds B
         np.array([0.9, 0.8, 0.7, 0.3])),
        (np.array([[40, 40, 50, 50],      # .85 FP
                   [1, 1, 10, 10]]),      # .6 finds C (IoU 0.81)
         np.array([0.85, 0.6])),
    ]
    r = radnet.detection.froc(preds, gts, fps_per_image=(0.25, 0.5, 1, 2))
    # walk: .9 (0, 1/3) .85 (.5, 1/3) .8 (1, 1/3) .7 (1, 1/3) .6 (1, 2/3) .3 (1, 1)
    np.testing.assert_allclose(r["fps"], [0, 0.5, 1, 1, 1, 1])
    np.testing.assert_allclose(r["sensitivities"], [1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1])
    assert r["sensitivity"] == pytest.approx({0.25: 1 / 3, 0.5: 1 / 3, 1: 1.0, 2: 1.0})
    assert r["num_lesions"] == 3 and r["num_images"] == 2 and r["num_predictions"] == 6
    # a stricter threshold: C's hit (IoU 0.81) now misses and counts as a false positive
    strict = radnet.detection.froc(preds, gts, fps_per_image=(1, 2), iou_threshold=0.9)
    assert strict["sensitivity"] == pytest.approx({1: 1 / 3, 2: 2 / 3})
    # a false positive first: nothing at or below 0.1 FPs per image → 0
    first_fp = [(np.array([[40, 40, 50, 50], [0, 0, 10, 10]]), np.array([0.9, 0.5])),
                (np.zeros((0, 4)), np.zeros(0))]
    r0 = radnet.detection.froc(first_fp, [np.array([[0, 0, 10, 10]]), np.zeros((0, 4))],
                               fps_per_image=(0.1, 0.5))
    assert r0["sensitivity"] == {0.1: 0.0, 0.5: 1.0}


def test_iobb_counts_a_small_box_inside_a_lesion():
    gt = [np.array([[0, 0, 20, 20]])]
    pred = [(np.array([[5, 5, 10, 10]]), np.array([0.9]))]
    assert radnet.detection.froc(pred, gt, fps_per_image=(1,))["sensitivity"][1] == 0.0
    assert radnet.detection.froc(pred, gt, fps_per_image=(1,),
                                 criterion="iobb")["sensitivity"][1] == 1.0


def test_groups_table_and_png(tmp_path):
    gts = [np.array([[0, 0, 10, 10], [20, 20, 60, 60]])]
    preds = [(np.array([[0, 0, 10, 10], [70, 70, 80, 80]]), np.array([0.9, 0.8]))]
    sizes = [[radnet.detection.size_bin(d) for d in (10.0, 40.0)]]
    r = radnet.detection.froc(preds, gts, fps_per_image=(0.5, 1), groups=sizes)
    assert r["by_group"]["10-30mm"]["sensitivity"] == {0.5: 1.0, 1: 1.0}
    assert r["by_group"][">=30mm"]["sensitivity"] == {0.5: 0.0, 1: 0.0}
    assert radnet.detection.size_bin(5) == "<10mm"
    table = format_table({"a": r}, (0.5, 1))
    assert "| a | 50.0 | 50.0 | 50.0 |" in table
    path = os.path.join(tmp_path, "froc.png")
    plot_froc({"a": r}, path, (0.5, 1))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_mismatched_inputs_are_named():
    with pytest.raises(ValueError, match="one entry per image"):
        radnet.detection.froc([], [np.zeros((0, 4))])
    with pytest.raises(ValueError, match="3 boxes but 2 scores"):
        radnet.detection.froc([(np.zeros((3, 4)), np.zeros(2))], [np.zeros((0, 4))])


def test_nms_keeps_the_best_of_overlapping_boxes():
    b = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
    keep = box_lib.nms(b, np.array([0.5, 0.9, 0.4]), 0.5)
    assert keep.tolist() == [1, 2]
