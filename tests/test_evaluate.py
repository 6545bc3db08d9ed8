"""The evaluation report: built from arrays (no model), and end to end from a checkpoint."""

import json
import os
import re

import numpy as np
import pytest

from radnet import evaluate, labels, metrics


def _fake_predictions(n=40, seed=0):
    """Outputs that are informative but imperfect, with unknown labels sprinkled in."""
    rng = np.random.default_rng(seed)
    targets, outputs = {}, {}
    for head, names in labels.CLASS_HEADS.items():
        y = rng.integers(0, len(names), n)
        logits = rng.normal(size=(n, len(names)))
        logits[np.arange(n), y] += 1.5
        y[rng.random(n) < 0.1] = labels.UNKNOWN
        targets[head], outputs[head] = y, logits
    # No sample is T2-FLAIR: its AUC and recall are undefined and must say why.
    targets["sequence"][targets["sequence"] == 4] = 3
    cov = (rng.random((n, 9)) < 0.4).astype(np.int64)
    outputs["coverage"] = np.where(cov == 1, 1.0, -1.0) + rng.normal(0, 1.2, (n, 9))
    cov[:3] = labels.UNKNOWN
    targets["coverage"] = cov
    spacing = rng.uniform(1, 12, n).astype(np.float32)
    outputs["slice_spacing"] = spacing + rng.normal(0, 1, n)
    spacing[5] = np.nan
    targets[labels.SLICE_SPACING_TARGET] = spacing
    targets["index"] = np.arange(n)
    return outputs, targets


def test_report_from_arrays(tmp_path):
    outputs, targets = _fake_predictions()
    report = evaluate.write_report(outputs, targets, str(tmp_path),
                                   meta={"split": "test", "dataset": "ds"})

    with open(tmp_path / "report.json") as f:
        text = f.read()
    assert "NaN" not in text and "Infinity" not in text
    on_disk = json.loads(text)
    heads = on_disk["heads"]
    expected = metrics.head_metrics(outputs, targets)
    assert heads == json.loads(json.dumps(expected))
    assert set(heads) == {"sequence", "view", "contrast", "coverage", "slice_spacing"}
    assert heads["sequence"]["accuracy"] == expected["sequence"]["accuracy"]
    assert set(heads["sequence"]["classes"]) == set(labels.SEQUENCE)
    flair = heads["sequence"]["classes"]["T2-FLAIR"]
    assert flair["samples"] == 0 and flair["auc"] is None
    assert "no positive samples" in flair["undefined"]["auc"]
    assert 0 <= heads["coverage"]["exact_match"] <= 1
    assert heads["coverage"]["samples"] == 37          # 3 rows with unknown coverage
    assert heads["slice_spacing"]["samples"] == 39     # one NaN spacing
    assert heads["slice_spacing"]["mae_mm"] > 0

    md = (tmp_path / "report.md").read_text()
    assert "| | Samples | Accuracy | AUC | Recall | Precision |" in md
    sections = [s for s in re.findall(r"\| \*\*(.+?)\*\* \|", md)]
    assert sections == ["Modality/Sequence", "View", "Contrast", "Scan Coverage"]
    assert md.count("<u>Total</u>") == 4
    # A class row: name, samples, then four percentages or dashes, in the paper's order.
    ct = heads["sequence"]["classes"]["CT"]
    assert (f"| CT | {ct['samples']} | {100 * ct['accuracy']:.1f}% | {100 * ct['auc']:.1f}% | "
            f"{100 * ct['recall']:.1f}% | {100 * ct['precision']:.1f}% |") in md
    assert "| T2-FLAIR | 0 | " in md and "T2-FLAIR: auc undefined — no positive samples" in md
    assert "| Upper Head-Neck |" in md and "| No Contrast |" in md
    total = heads["coverage"]["exact_match"]
    assert f"| <u>Total</u> | <u>37</u> | {100 * total:.1f}% |" in md
    assert f"{heads['slice_spacing']['mae_mm']:.2f}" in md

    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == sorted(["roc_sequence.png", "roc_view.png", "roc_contrast.png",
                           "roc_coverage.png", "confusion_sequence.png", "confusion_view.png",
                           "confusion_contrast.png", "confusion_coverage.png",
                           "slice_spacing.png"])
    for p in pngs:
        data = (tmp_path / p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, p
    assert report["meta"]["plots"] == on_disk["meta"]["plots"]

    saved = np.load(tmp_path / "predictions.npz")
    np.testing.assert_array_equal(saved["target_index"], targets["index"])
    np.testing.assert_allclose(saved["output_view"], outputs["view"])

    table = evaluate.console_table(report)
    assert "coverage" in table and "exact match" in table and "MAE / RMSE (mm)" in table
    assert f"{100 * heads['view']['accuracy']:.1f}%" in table
