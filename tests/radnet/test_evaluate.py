"""The evaluation report: built from arrays (no model), and end to end from a checkpoint."""

import json
import os
import re

import numpy as np
import pytest

from radnet import evaluate, labels
from radnet.evaluators import heads as metrics


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

    full_md = (tmp_path / "report.md").read_text()
    # 95% intervals in brackets after accuracies and AUCs (series-level here: no patients)
    assert "95% confidence interval" in full_md and "1000 resamples of the 40 series" in full_md
    ci = on_disk["intervals"]["coverage"]["exact_match"]
    assert f"{100 * heads['coverage']['exact_match']:.1f}% [{100 * ci[0]:.1f}–{100 * ci[1]:.1f}]" in full_md
    md = re.sub(r" \[[^\]]*\]", "", full_md)  # without the intervals, for the layout below
    assert "| | Samples | Accuracy | AUC | Recall | Precision |" in md
    sections = [s for s in re.findall(r"\| \*\*(.+?)\*\* \|", md)]
    assert sections == ["Modality/Sequence", "View", "Contrast", "Scan Coverage"]
    assert md.count("<u>Total</u>") == 4
    # A class row: name, samples, then four percentages or dashes, in the paper's order.
    ct = heads["sequence"]["classes"]["CT"]
    assert (f"| CT | {ct['samples']} | {100 * ct['accuracy']:.1f}% | {100 * ct['auc']:.1f}% | "
            f"{100 * ct['recall']:.1f}% | {100 * ct['precision']:.1f}% |") in md
    assert "| T2-FLAIR | 0 | " in md and "T2-FLAIR: AUC — no positive samples" in md
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


# --------------------------------------------------------------------------- end to end

VOLUME_SHAPE = (16, 32, 32)  # tiny volumes, yet enough for the 4 strided stages of ResNet-10
SPLIT_ROWS = {"train": 6, "val": 2, "test": 7}   # 7 test rows: the last batch is padded


def _write_dataset(path):
    """A real zarr dataset (TensorStore) with labels, unknowns and an unusable row."""
    from radnet.data import schema

    splits = [s for s, k in SPLIT_ROWS.items() for _ in range(k)] + ["unusable"]
    n = len(splits)
    rng = np.random.default_rng(0)
    arrays = schema.create(str(path), n, volume_shape=VOLUME_SHAPE)
    seq = rng.integers(0, 5, n)
    arrays["volume"].write(
        (rng.random((n, *VOLUME_SHAPE)) * 60 + 40 * seq[:, None, None, None]).astype(np.uint8)
    ).result()
    seq[3] = labels.UNKNOWN
    arrays["sequence"].write(seq.astype(np.int8)).result()
    arrays["view"].write(rng.integers(0, 3, n).astype(np.int8)).result()
    arrays["contrast"].write(rng.integers(0, 2, n).astype(np.int8)).result()
    cov = rng.integers(0, 2, (n, 9))
    cov[SPLIT_ROWS["train"] + SPLIT_ROWS["val"]] = labels.UNKNOWN   # first test row
    arrays["coverage"].write(cov.astype(np.int8)).result()
    spacing = rng.uniform(1, 10, n).astype(np.float32)
    spacing[-2] = np.nan                                            # last test row
    arrays["effective_spacing_mm"].write(spacing).result()
    arrays["split"].write(np.array([labels.split_index(s) if s in labels.SPLITS else -1
                                    for s in splits], np.int8)).result()
    return np.flatnonzero(np.array(splits) == "test")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A real (tiny) pretraining run: checkpoint written by radnet.train.pretrain."""
    from radnet.train import pretrain
    from configs import pretrain as pretrain_config

    root = tmp_path_factory.mktemp("e2e")
    dataset = root / "dataset"
    test_rows = _write_dataset(dataset)
    config = pretrain_config.get_config(f"tiny,dataset={dataset}")
    config.train.num_steps = 1          # the evaluation needs a checkpoint, not a good model
    config.eval.every_steps = 0
    config.checkpoint.every_steps = 1
    workdir = root / "run"
    assert pretrain.run(config, str(workdir)) in (0, None)
    return dataset, workdir, test_rows


def test_evaluate_end_to_end(pretrained, tmp_path):
    """The CLI on 2 CPU devices: every test row once, outputs equal a direct model call."""
    import subprocess
    import sys

    from radnet import models
    from radnet.train import checkpoint

    dataset, workdir, test_rows = pretrained
    out = tmp_path / "report"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run(
        [sys.executable, "-m", "radnet.main", "--config=configs/evaluate.py",
         f"--workdir={workdir}", f"--config.checkpoint={workdir}", f"--config.dataset={dataset}",
         "--config.split=test", "--config.batch_size=4", f"--config.out={out}"],
        capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "coverage" in proc.stdout and "exact match" in proc.stdout
    assert "MAE / RMSE (mm)" in proc.stdout

    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == SPLIT_ROWS["test"]
    assert report["meta"]["devices"] == 2
    heads = report["heads"]
    assert heads["sequence"]["samples"] + heads["sequence"]["unknown"] == SPLIT_ROWS["test"]
    assert heads["coverage"]["unknown_rows"] == 1 and heads["coverage"]["samples"] == 6
    assert heads["slice_spacing"]["unknown"] == 1 and heads["slice_spacing"]["samples"] == 6
    assert "<u>Total</u>" in (out / "report.md").read_text()
    assert report["meta"]["step"] == 1 and "latest" in report["meta"]["step_reason"]
    assert report["meta"]["ci"]["unit"] == "series"  # a dataset without manifest.csv
    assert "training_curves.png" in report["meta"]["plots"]
    for p in report["meta"]["plots"]:
        assert (out / p).stat().st_size > 5000

    saved = np.load(out / "predictions.npz")
    np.testing.assert_array_equal(saved["target_index"], test_rows)   # each row exactly once
    # The gathered outputs are the model's on exactly those rows, in that order.
    from radnet.data import schema
    config, variables, _ = checkpoint.load_variables(str(workdir))
    model = models.get(config.model_name)(**config.model)
    volume = schema.open_arrays(str(dataset), names=("volume",))["volume"][test_rows].read().result()
    direct = model.apply(variables, volume.astype(np.float32)[..., None] / 255.0, train=False)
    assert np.isfinite(np.asarray(direct["sequence"])).all()
    for head in labels.HEADS:
        np.testing.assert_allclose(saved[f"output_{head}"], np.asarray(direct[head]),
                                   rtol=1e-4, atol=1e-4, err_msg=head)
    assert heads == json.loads(json.dumps(metrics.head_metrics(
        {h: saved[f"output_{h}"] for h in labels.HEADS},
        {k: saved[f"target_{k}"] for k in (*labels.CLASS_HEADS, "coverage",
                                           labels.SLICE_SPACING_TARGET)})))
