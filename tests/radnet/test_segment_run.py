"""End to end on CPU: phantom LiTS cases → data_prep.lits → task ``segment`` (tiny).

A real pretraining-layout workdir (tiny 3D-RADNet, Orbax), the real proposal, the jitted
train step, validation and best-checkpoint selection, stitched evaluation and the table.
"""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import liver as liver_config
from data_prep.phantoms import lits as phantom_lits
from data_prep.lits import build as lits_build
from radnet.data import lits
from radnet import models, proposal
from radnet.train import checkpoint as ckpt_lib
from radnet.train import segment
from tests.radnet.test_transfer import radnet_init, save_pretraining

ENC = dict(depth=10, variant="radnet", norm="batch", width=4, hidden=8)


def make_liver_setup(root):
    """Three phantom LiTS cases as a dataset (``root/ds``) and a tiny pretraining run
    (``root/pre``, step 3); returns the pretrained variables."""
    phantom_lits.write_cases(str(root / "lits"), 3, 0)
    lits_build.build(str(root / "lits"), str(root / "ds"), in_plane=32, progress=False)
    v = radnet_init()
    save_pretraining(str(root / "pre"), v["params"], v["batch_stats"], ENC, step=3)
    return v


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("liver")
    return root, make_liver_setup(root)


def test_segment_run_frozen(setup):
    root, pre = setup
    config = liver_config.get_config(
        f"tiny,freeze=all,dataset={root / 'ds'},pretrained={root / 'pre'}")
    workdir = str(root / "run_all")
    results = segment.train_and_evaluate(config, workdir)

    assert results["n_train"] == 1 and results["freeze"] == "all"
    for split in ("val", "test"):
        s = results[split]
        assert s["n"] == 1 and 0.0 <= s["mean_dice"] <= 1.0 and 0.0 <= s["median_iou"] <= 1.0
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f) == results
    with open(os.path.join(workdir, "per_case.csv")) as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["split"] for r in rows) == ["test", "val"]
    assert {r["class"] for r in rows} == {"liver"}
    assert all(float(r["hd95_mm"]) >= 0 and 0 <= float(r["nsd"]) <= 1 for r in rows)
    # The per-case numbers are the summary's (one case per split here).
    assert float(rows[0]["dice"]) == pytest.approx(results[rows[0]["split"]]["mean_dice"], abs=1e-6)

    # Every case has ≥1 selected window; the proposal file is reusable.
    props = proposal.read_csv(os.path.join(workdir, "proposals.csv"))
    assert set(props) == set(lits.cases(str(root / "ds")))
    assert all(any(w.selected for w in ws) for ws in props.values())

    # The latest and the best validation checkpoints are kept; the best one is evaluated,
    # and its (frozen) encoder is the pretrained one.
    kept = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert kept == sorted({results["best_step"], 4})
    metrics = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    vals = {m["step"]: m["dice"] for m in metrics if m["split"] == "val"}
    assert set(vals) == {2, 4} and vals[results["best_step"]] == max(vals.values())
    # The checkpoint was chosen by the validation Dice on the training grid; the reported
    # metrics are on each case's source grid.
    assert results["selection"]["training_grid_dice"] == pytest.approx(
        vals[results["best_step"]], abs=1e-6)
    assert results["grid"] == "source"
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["test"]["classes"]["liver"]["dice"]["mean"] == pytest.approx(
        results["test"]["mean_dice"])
    assert summary["test"]["classes"]["liver"]["dice"]["ci95"] is None     # n = 1
    png = os.path.join(workdir, "overlays", f"{lits.cases(str(root / 'ds'), 'test')[0]}.png")
    assert os.path.getsize(png) > 1000
    restored, _ = ckpt_lib.restore_subtree(workdir, {"params": pre["params"],
                                                     "batch_stats": pre["batch_stats"]})
    for collection in ("params", "batch_stats"):
        a = ckpt_lib.flatten(restored[collection]["encoder"])
        b = ckpt_lib.flatten(pre[collection]["encoder"])
        for k in b:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))

    table = segment.format_table("freeze", [results])
    assert "Froze all layers" in table and "Mean DICE" in table


def test_fraction_subsets_nest_and_are_seeded():
    ids = [f"lits-{k:03d}" for k in range(92)]
    sizes = {f: len(segment.training_subset(ids, f, 0)) for f in (1.0, 0.8, 0.6, 0.4, 0.2)}
    assert sizes == {1.0: 92, 0.8: 74, 0.6: 55, 0.4: 37, 0.2: 18}     # the paper's n
    small, big = segment.training_subset(ids, 0.2, 0), segment.training_subset(ids, 0.4, 0)
    assert set(small) <= set(big)
    assert segment.training_subset(ids, 0.2, 1) != small
    with pytest.raises(ValueError):
        segment.training_subset(ids, 0.0, 0)


def test_stitch_averages_overlaps_and_crops_padding():
    a = np.full((4, 2, 2), 0.2, np.float32)
    b = np.full((4, 2, 2), 0.8, np.float32)
    out = segment.stitch(7, (2, 2), [-1, 2], [a, b])
    np.testing.assert_allclose(out[:, 0, 0], [0.2, 0.2, 0.5, 0.8, 0.8, 0.8, 0.0])


def test_dice_loss_values():
    mask = np.zeros((1, 2, 2, 2), np.uint8)
    mask[0, 0] = 1
    sure = np.where(mask[..., None] == 1, [-20.0, 20.0], [20.0, -20.0])
    assert float(segment.dice_loss(jnp.asarray(sure), mask, 1e-6)) == pytest.approx(0, abs=1e-4)
    assert float(segment.dice_loss(jnp.asarray(-sure), mask, 1e-6)) == pytest.approx(1, abs=1e-4)


def test_tables_layout():
    mk = lambda f, fr, n, d: {"freeze": f, "fraction": fr, "n_train": n,  # noqa: E731
                              "test": {"n": 20, "mean_dice": d, "mean_iou": d - .1,
                                       "median_dice": d, "median_iou": d - .1}}
    t2 = segment.format_table("freeze", [mk("scratch", 1, 92, .418), mk("all", 1, 92, .9)])
    lines = t2.splitlines()
    assert lines[1].startswith("Froze all layers") and "90.0%" in lines[1]
    assert lines[2].startswith("No transfer learning") and "41.8%" in lines[2]
    t3 = segment.format_table("fraction", [mk("all", .2, 18, .8), mk("all", 1.0, 92, .9)])
    assert t3.splitlines()[1].startswith("100% (n=92)")
    assert t3.splitlines()[2].startswith("20% (n=18)")
