"""Slice groups (labels, sectors, balance), the sector-conditioned model, and task
``slicegroups`` end to end on phantom chest CTs (tiny): restored frozen encoder, ranked
CSV, PNG strips, results and the study table."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import slicegroups as sg_config
from radnet.data import slicegroups as sg
from radnet.models.slicegroups import SectorHead, SliceGroupNet
from radnet.train import checkpoint as ckpt_lib
from radnet.train import slicegroups as task
from tests.data_prep.test_lidc_phantom import make_lidc
from tests.radnet.test_transfer import radnet_init, save_pretraining

ENC = dict(depth=10, variant="radnet", norm="batch", width=4, hidden=8)


def _labels(scheme):
    return ml_collections.ConfigDict(dict(min_readers=1, min_diameter_mm=0.0, min_overlap_slices=3,
                                          **sg_config.LABEL_SCHEMES[scheme]))


def _nodule(median, readers=4, kind="nodule", diameter="8.0"):
    return {"kind": kind, "n_readers": str(readers), "diameter_mm": diameter,
            "malignancy_median": "" if median is None else str(median)}


def test_label_schemes():
    report, strict = _labels("report"), _labels("strict")
    assert [sg.nodule_class(_nodule(m), report) for m in (1, 2.5, 3, 3.5, 5)] == [
        sg.BENIGN, sg.BENIGN, sg.MALIGNANT, sg.MALIGNANT, sg.MALIGNANT]
    assert [sg.nodule_class(_nodule(m), strict) for m in (2, 2.5, 3, 3.5, 4)] == [
        sg.BENIGN, sg.UNKNOWN, sg.UNKNOWN, sg.UNKNOWN, sg.MALIGNANT]
    assert sg.nodule_class(_nodule(None, kind="small_nodule"), report) is None
    report.min_readers = 3
    assert sg.nodule_class(_nodule(4, readers=2), report) is None


def test_sectors_run_from_the_top():
    assert [sg.sector_of(s, 16, 240, 5) for s in range(0, 240, 16)] == [
        0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert {sg.sector_of(s, 16, 240, 1) for s in range(0, 240, 16)} == {0}
    assert sg.sector_of(224, 16, 230, 13) == 12     # a short last group stays in range


def test_balance_modes():
    def g(label, sector):
        return sg.Group("k", "train", 0, 0, sector, label, "")
    groups = [g(0, 0)] * 10 + [g(1, 0)] * 2 + [g(2, 0)] * 3 + [g(0, 1)] * 5 + [g(-1, 1)]
    counts = lambda gs: np.bincount([x.label for x in gs], minlength=3).tolist()
    assert counts(sg.balance(groups, "oversample", 0)) == [15, 15, 15]
    assert counts(sg.balance(groups, "undersample", 0)) == [3 + 1, 2, 3]
    assert counts(sg.balance(groups, "none", 0)) == [15, 2, 3]


def test_heads_condition_on_the_sector():
    emb = jax.random.normal(jax.random.key(0), (3, 8))
    for head in ("embedding", "per_sector"):
        h = SectorHead(head=head, sector_num=4, sector_dim=4, hidden=8)
        v = h.init(jax.random.key(1), emb, jnp.zeros(3, jnp.int32))
        a = h.apply(v, emb, jnp.array([0, 0, 0]))
        b = h.apply(v, emb, jnp.array([0, 3, 2]))
        assert a.shape == (3, 3)
        np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
        assert not np.allclose(a[1], b[1])
        if head == "per_sector":  # one 3-way classifier per sector
            assert v["params"]["logits"]["kernel"].shape == (8, 12)
            k = v["params"]["logits"]["kernel"].reshape(8, 4, 3)
            hidden = jax.nn.relu(emb @ v["params"]["hidden"]["kernel"]
                                 + v["params"]["hidden"]["bias"])
            want = hidden[1] @ k[:, 3] + v["params"]["logits"]["bias"].reshape(4, 3)[3]
            np.testing.assert_allclose(b[1], want, rtol=1e-5, atol=1e-6)


def test_fresh_head_starts_at_uniform_probabilities():
    """The head is drawn with Flax's initialisers and a zero output layer (He over fan-out,
    the encoder's init, gave a 3-logit layer of std 0.8: logits ±10 and loss 8.9 at step 0);
    the encoder keeps radnet's init."""
    from radnet.train.segment import init_variables
    for head in ("embedding", "per_sector"):
        model = SliceGroupNet(depth=10, width=4, head=head, sector_num=5, sector_dim=4,
                              hidden=64)
        v = task.init_model_variables(model, (1, 16, 32, 32, 1), 0)
        ref = init_variables(model, (1, 16, 32, 32, 1), 0)
        for a, b in zip(jax.tree.leaves(v["params"]["encoder"]),
                        jax.tree.leaves(ref["params"]["encoder"])):
            np.testing.assert_array_equal(a, b)
        hidden = np.asarray(v["params"]["head"]["hidden"]["kernel"])
        assert np.std(hidden) == pytest.approx(hidden.shape[0] ** -0.5, rel=0.2)
        # The head on any embedding: equal logits; one gradient step reaches the zero layer.
        h = SectorHead(head=head, sector_num=5, sector_dim=4, hidden=64)
        width = hidden.shape[0] - (4 if head == "embedding" else 0)   # less the sector part
        emb = jax.random.normal(jax.random.key(2), (3, width))
        sectors = jnp.array([0, 2, 4])
        head_params = {"params": v["params"]["head"]}
        np.testing.assert_array_equal(np.asarray(h.apply(head_params, emb, sectors)), 0.0)
        grads = jax.grad(lambda p: jnp.mean(h.apply({"params": p}, emb, sectors)[:, 1]))(
            head_params["params"])
        assert np.abs(np.asarray(grads["logits"]["kernel"])).max() > 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sg")
    make_lidc(root)
    v = radnet_init()
    save_pretraining(str(root / "pre"), v["params"], v["batch_stats"], ENC, step=3)
    return root, v


def test_make_groups_on_the_phantom(setup):
    root, _ = setup
    groups = sg.make_groups(str(root / "ds"), 16, 5, _labels("report"))
    nodules = [r for r in csv.DictReader(open(root / "ds" / "nodules.csv"))
               if r["kind"] == "nodule"]
    manifest = [r for r in csv.DictReader(open(root / "ds" / "manifest.csv"))]
    assert len(groups) == sum(-(-int(r["n_slices"]) // 16) for r in manifest)
    for r in nodules:  # every nodule lands in the groups holding ≥ 3 of its slices
        want = sg.MALIGNANT if float(r["malignancy_median"]) >= 3 else sg.BENIGN
        first, last = int(r["slice_first"]), int(r["slice_last"])
        mine = [g for g in groups if g.series_key == r["series_key"]
                and g.start <= last and g.start + 15 >= first]
        for g in mine:
            overlap = min(last, g.start + 15) - max(first, g.start) + 1
            if overlap >= min(3, last - first + 1):
                assert r["nodule"] in g.nodules.split(";")
                assert g.label == sg.MALIGNANT or g.label == want
            else:   # only an edge of the nodule: unknown unless another nodule decides
                assert r["nodule"] not in g.nodules.split(";")
                assert g.label != sg.NON_NODULE
        assert any(r["nodule"] in g.nodules.split(";") for g in mine)
    assert {g.label for g in groups} >= {sg.NON_NODULE, sg.MALIGNANT}
    slab = sg.read_slab(str(root / "ds"), groups[-1].series_key, groups[-1].start, 16, 32)
    assert slab.shape == (16, 32, 32) and slab.dtype == np.uint8


def test_task_runs_and_ranks(setup):
    root, pre = setup
    config = sg_config.get_config(
        f"tiny,freeze=all,in_plane=32,sector_num=5,dataset={root / 'ds'},"
        f"pretrained={root / 'pre'}")
    workdir = str(root / "runs" / "s5_32_all")
    results = task.train_and_evaluate(config, workdir)
    assert results["best_step"] in (2, 4)
    test = results["test"]
    assert test["groups"] + test["unknown"] > 0 and 0 <= test["accuracy"] <= 1
    assert set(test["classes"]) == set(sg.CLASSES)
    # The frozen encoder is the pretrained one, bit for bit.
    _, best, _ = ckpt_lib.load_variables(workdir, results["best_step"])
    for a, b in zip(jax.tree.leaves(best["params"]["encoder"]),
                    jax.tree.leaves(pre["params"]["encoder"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ranked = list(csv.DictReader(open(os.path.join(workdir, "ranked.csv"))))
    preds = [r for r in csv.DictReader(open(os.path.join(workdir, "predictions.csv")))
             if r["split"] == "test"]
    assert len(ranked) == len(preds) > 0
    # The reported accuracy is that of the written predictions (argmax against the label;
    # the file's 4 decimals can hide which of two near-equal classes won: a bracket).
    known = [r for r in preds if r["label"] in sg.CLASSES]
    p = np.array([[float(r[f"p_{c}"]) for c in sg.CLASSES] for r in known])
    mine = p[np.arange(len(known)), [sg.CLASSES.index(r["label"]) for r in known]]
    others = np.where(np.eye(len(sg.CLASSES), dtype=bool)[
        [sg.CLASSES.index(r["label"]) for r in known]], -1.0, p).max(axis=1)
    assert test["groups"] == len(known)
    assert np.mean(mine > others + 1e-4) <= test["accuracy"] <= np.mean(mine >= others - 1e-4)
    for key in {r["series_key"] for r in ranked}:
        mine = [r for r in ranked if r["series_key"] == key]
        p = [float(r["p_nodule"]) for r in mine]
        assert p == sorted(p, reverse=True) and [int(r["rank"]) for r in mine] == list(
            range(1, len(mine) + 1))
        assert os.path.getsize(os.path.join(workdir, "strips", f"{key}.png")) > 1000
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["width"] == ENC["width"]
    # A second run (scratch) and the table of both.
    os.makedirs(root / "runs" / "other", exist_ok=True)
    with open(root / "runs" / "other" / "results.json", "w") as f:
        json.dump(dict(results, freeze="scratch", sector_num=1), f)
    table = task.format_table(task.collect_results(str(root / "runs")))
    lines = table.splitlines()
    assert lines[1].split()[:3] == ["1", "32", "scratch"]
    assert lines[2].split()[:3] == ["5", "32", "pre:all"]


def test_study_launcher_dry_run():
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(["bash", "launch/lidc_study.sh", "/d", "/p", "/o", "demo"], cwd=repo,
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DRY_RUN": "1", "PYTHON": "py"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    runs = [l for l in lines if "radnet.main" in l]
    assert len(runs) == 8
    cells = {(l.split("sector_num=")[1].split(",")[0], l.split("in_plane=")[1].split(",")[0],
              l.split("freeze=")[1].split(" ")[0]) for l in runs}
    assert cells == {(s, p, f) for s, p in (("1", "128"), ("5", "128"), ("13", "128"),
                                           ("5", "64")) for f in ("none", "scratch")}
    assert lines[-1] == "py -m radnet.train.slicegroups --root=/o"


def test_config_variants():
    c = sg_config.get_config("sector_num=13,in_plane=64,head=per_sector,labels=strict,"
                             "balance=undersample,freeze=scratch")
    assert (c.groups.sector_num, c.groups.in_plane, c.model.head, c.groups.balance) == (
        13, 64, "per_sector", "undersample")
    assert (c.labels.benign_max, c.labels.malignant_min) == (2.0, 4.0)
    assert c.task == "slicegroups" and c.model.sector_num == 13
    with pytest.raises(ValueError, match="labels="):
        sg_config.get_config("labels=mean")
    # A frozen or fine-tuned encoder needs its pretraining run: said before any data is read.
    with pytest.raises(task.loop.ConfigError, match="pretrained.workdir is empty"):
        task.resolve_config(sg_config.get_config("tiny,freeze=all,pretrained=,dataset=/nonexistent"))


def test_validation_bias_fixes_a_shifted_prior():
    rng = np.random.default_rng(0)
    labels = rng.choice(3, size=400, p=[0.8, 0.1, 0.1])
    logits = rng.normal(0, 1, (400, 3))
    logits[np.arange(400), labels] += 1.5
    logits[:, 1:] += 2.0          # a head trained on balanced classes over-calls nodules
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    bias = task.fit_bias(probs, labels)
    fixed = task.apply_bias(probs, bias)
    assert bias[0] - bias[1:].mean() > 1.0
    assert np.mean(fixed.argmax(1) == labels) > np.mean(probs.argmax(1) == labels) + 0.2
    np.testing.assert_allclose(fixed.sum(1), 1, rtol=1e-5)


def test_study_intervals_of_margin_and_top_k():
    """Bootstrap over studies: a perfect ranker's margin over the majority class is positive
    with its interval around it and its top-3 recall is 1 in every resample; a model that
    always says non-nodule has margin 0 and top-3 recall 0 in every resample."""
    groups, perfect = [], []
    for s in range(12):
        for i in range(10):
            label = (sg.BENIGN if i == 8 else sg.MALIGNANT if i == 9 else sg.NON_NODULE) \
                if s < 8 else sg.NON_NODULE
            groups.append(sg.Group(f"k{s}", "test", i, 16 * i, 0, label, ""))
            perfect.append(np.eye(3)[label])
    perfect = np.array(perfect)
    out = task.study_intervals(groups, perfect, 3, num_samples=300)
    point = 1 - 104 / 120
    assert out["margin_ci"][0] < point < out["margin_ci"][1] and out["margin_ci"][0] > 0
    assert out["top3_study_recall_ci"] == [1.0, 1.0]
    s = task.summarize(groups, perfect, 3)
    assert s["margin"] == pytest.approx(point)
    assert s["margin_ci"] == task.study_intervals(groups, perfect, 3)["margin_ci"]
    always_non = np.tile([0.9, 0.05, 0.05], (len(groups), 1))
    out = task.study_intervals(groups, always_non, 3, num_samples=300)
    assert out["margin_ci"] == [0.0, 0.0] and out["top3_study_recall_ci"] == [0.0, 0.0]


def test_ranking_by_study_and_top_k_recall_by_hand():
    """The reading order per study (highest P(nodule) first, ties in group order) and the
    top-k study recall computed from it, on hand-made probabilities."""
    def g(key, index, label):
        return sg.Group(key, "test", index, 4 * index, 0, label, "")

    groups = [g("a", 0, sg.NON_NODULE), g("a", 1, sg.BENIGN), g("a", 2, sg.NON_NODULE),
              g("b", 0, sg.MALIGNANT), g("b", 1, sg.NON_NODULE), g("b", 2, sg.NON_NODULE),
              g("c", 0, sg.NON_NODULE), g("c", 1, sg.NON_NODULE)]   # c: no nodule group
    p_non = np.array([0.1, 0.5, 0.5, 0.9, 0.2, 0.3, 0.4, 0.6])
    probs = np.stack([p_non, (1 - p_non) / 2, (1 - p_non) / 2], axis=1)
    order = task.ranked_by_study(groups, probs)
    assert order == {"a": [0, 1, 2], "b": [4, 5, 3], "c": [6, 7]}   # a: 1 and 2 tie
    assert task.top_k_hits(groups, probs, 1) == [False, False]
    assert task.top_k_recall(groups, probs, 2) == (0.5, 2)          # a's benign is 2nd
    assert task.top_k_recall(groups, probs, 3) == (1.0, 2)
    assert task.top_k_recall([], None, 3) == (None, 0)


def test_training_flips_are_the_augment_modules_left_right_and_slice_flips():
    from radnet.data import augment
    x = jnp.asarray(np.random.default_rng(0).random((3, 4, 5, 6, 1), dtype=np.float32))
    both = np.asarray(augment.augment(jax.random.key(0), x, task.flips_only(1.0)))
    np.testing.assert_array_equal(both, np.asarray(x)[:, ::-1, :, ::-1])   # z and left-right
    none = augment.augment(jax.random.key(0), x, task.flips_only(0.0))
    np.testing.assert_array_equal(np.asarray(none), np.asarray(x))
