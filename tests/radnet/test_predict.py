"""The predict task and Pretrained.preprocess/predict/embed on a real phantom archive.

One module fixture makes the whole chain for real: the phantom PACS (one included series
has its SeriesDescription removed, so the index excludes it for missing_description only),
data_prep.index, data_prep.build_volumes (tiny 16×32×32 volumes), a tiny pretraining
workdir for that dataset (config.json resolved by radnet.train.pretrain, so it carries the
preprocessing; an Orbax checkpoint of the initial state), the evaluation report, and the
predict task over the archive. Predictions of the demo's trained model: docs/predict.md.
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pydicom
import pytest

from configs import build_volumes as build_config
from configs import evaluate as evaluate_config
from configs import index as index_config
from configs import predict as predict_config
from configs import pretrain as pretrain_config
from radnet import archive, evaluate, labels, pretrained
from radnet import preprocess as preprocess_lib
from radnet.data import schema
from radnet.evaluators import heads as heads_lib

SALT = "predict-test-salt-0123456789abcdef\n"


def _csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _index(dicom, out, salt):
    from data_prep import index
    return index.run_index(str(dicom), str(out), index_config.get_config(), workers=0,
                           salt_file=str(salt), progress=False)


def _predict(world, out, **overrides):
    config = predict_config.get_config("tiny,neighbours=2")
    config.checkpoint = world["run"]
    config.dicom_root = str(world["dicom"])
    config.salt_file = str(world["salt"])
    config.qc_calibration_dataset = ""   # the fixed rule, but in the QC tests (less compiling)
    for k, v in overrides.items():
        config[k] = v
    assert archive.run(config, str(out)) == 0
    return _csv(os.path.join(out, archive.PREDICTIONS_CSV))


def _untrained_run(dataset: str, workdir: str) -> None:
    """A pretraining workdir at step 0, written as radnet.train.pretrain writes one (its
    resolved config, an Orbax checkpoint) without the minutes of compiling a train step:
    the tests here need a run's files, not a trained model."""
    import jax

    from radnet.train import checkpoint as ckpt_lib
    from radnet.train import pretrain
    from radnet.train import state as state_lib

    config = pretrain.resolve_config(pretrain_config.get_config(f"tiny,dataset={dataset}"))
    model, optimizer = state_lib.build_model(config), state_lib.build_optimizer(config)
    # Weights drawn with NumPy on the shapes of the model's init (compiling the init
    # itself took 40 s on the loaded test machine): He-normal kernels, unit norm scales
    # and variances, zero biases and means.
    abstract = jax.eval_shape(lambda k: model.init(
        k, np.zeros((1, *config.input.volume_shape, 1), np.float32), train=False),
        jax.random.key(0))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)
        fill = 1.0 if name in ("scale", "var") else 0.0
        return np.full(leaf.shape, fill, leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(draw, abstract)
    state = state_lib.state_from_variables(optimizer, variables)
    manager = ckpt_lib.make_manager(workdir, config.checkpoint)
    ckpt_lib.save(manager, 0, state)
    manager.wait_until_finished()
    manager.close()
    ckpt_lib.save_config(workdir, config)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from data_prep.phantoms import pacs
    from data_prep.volumes import builder

    root = tmp_path_factory.mktemp("predict")
    pacs.generate(str(root / "pacs"), patients=3, seed=4, lits_cases=0, workers=1)
    dicom, salt = root / "pacs" / "dicom", root / "salt"
    salt.write_text(SALT)
    _index(dicom, root / "index0", salt)
    # One included series loses its description: the index excludes it for that alone.
    files0 = _csv(root / "index0" / "files.csv")
    included = sorted(r["series_key"] for r in _csv(root / "index0" / "series.csv")
                      if r["status"] == "included")
    stripped = included[0]
    for r in files0:
        if r["series_key"] == stripped:
            ds = pydicom.dcmread(dicom / r["path"])
            del ds.SeriesDescription
            ds.save_as(dicom / r["path"])
    _index(dicom, root / "index", salt)
    dataset = str(root / "dataset")
    summary = builder.build(str(root / "index"), str(dicom), dataset,
                            build_config.get_config("tiny"), workers=0, progress=False)
    assert summary["finalized"]
    run = str(root / "run")
    _untrained_run(dataset, run)
    world = {"root": root, "dicom": dicom, "salt": salt, "index": root / "index",
             "dataset": dataset, "run": run, "stripped": stripped}
    world["rows"] = _predict(world, root / "out")
    world["out"] = root / "out"
    return world


def test_the_run_carries_its_preprocessing(world):
    with open(os.path.join(world["run"], "config.json")) as f:
        stored = json.load(f)["input"]["preprocessing"]
    built = schema.read_attributes(world["dataset"])["build"]["config"]
    assert stored == {k: v for k, v in built.items() if k in stored}
    assert stored["volume_shape"] == [16, 32, 32] and stored["min_slices"] == 4
    p = pretrained.load(world["run"])
    assert p.volume_options == preprocess_lib.VolumeOptions(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})


def test_preprocess_is_the_stored_volume_bit_for_bit(world):
    p = pretrained.load(world["run"])
    manifest = _csv(os.path.join(world["dataset"], "manifest.csv"))
    files = {}
    for r in _csv(world["index"] / "files.csv"):
        if r["status"] == "included":
            files.setdefault(r["series_key"], []).append(world["dicom"] / r["path"])
    series = {r["series_key"]: r for r in _csv(world["index"] / "series.csv")}
    volumes = schema.open_arrays(world["dataset"], names=("volume",))["volume"].read().result()
    checked = 0
    for i, r in enumerate(manifest):
        key = r["series_key"]
        orientation = tuple(float(v) for v in series[key]["orientation"].split(";"))
        if r["status"] == "included":
            got = p.preprocess(files[key], orientation=orientation)
            assert got.dtype == np.uint8 and got.shape == (16, 32, 32)
            np.testing.assert_array_equal(got, volumes[i], err_msg=key)
            checked += 1
        else:  # the same exclusion reason, as the exception's message
            with pytest.raises(preprocess_lib.SeriesError, match=f"^{r['reason']}"):
                p.preprocess(files[key], orientation=orientation)
    assert checked == sum(r["status"] == "included" for r in manifest) >= 5


def test_predict_equals_the_evaluation_report(world, tmp_path):
    """The evaluation report's outputs on the dataset = predict's on the archive, by key."""
    config = evaluate_config.get_config("tiny")
    config.checkpoint, config.dataset, config.split = world["run"], world["dataset"], "train"
    config.step = pretrained.load(world["run"]).step   # evaluate's default is the latest
    assert evaluate.run(config, str(tmp_path)) == 0
    npz = np.load(tmp_path / evaluate.PREDICTIONS)
    manifest = _csv(os.path.join(world["dataset"], "manifest.csv"))
    by_key = {r["series_key"]: r for r in world["rows"]}
    emb = np.load(world["out"] / archive.EMBEDDINGS)
    p = pretrained.load(world["run"])
    volumes = schema.open_arrays(world["dataset"], names=("volume",))["volume"]
    for j, index in enumerate(npz["target_index"]):
        row = by_key[manifest[index]["series_key"]]
        assert row["status"] == archive.PREDICTED
        for head, names in labels.CLASS_HEADS.items():
            probs = heads_lib.softmax(npz[f"output_{head}"][j:j + 1])[0]
            assert row[head] == names[int(np.argmax(probs))]
            assert float(row[f"{head}_probability"]) == pytest.approx(probs.max(), abs=2e-6)
        cov = heads_lib.sigmoid(npz["output_coverage"][j])
        got = [float(row[f"coverage_{n}"]) for n in labels.COVERAGE]
        np.testing.assert_allclose(got, cov, atol=2e-6)
        assert float(row["slice_spacing_mm"]) == pytest.approx(
            float(npz["output_slice_spacing"][j]), abs=2e-3)
    # The methods agree with the task too (the same function).
    keys = [r["series_key"] for r in manifest if r["status"] == "included"][:2]
    row_of = {r["series_key"]: i for i, r in enumerate(world["rows"])}
    first = [row_of[k] for k in keys]
    index_of = {r["series_key"]: int(r["index"]) for r in manifest}
    batch = np.stack([volumes[index_of[k]].read().result() for k in keys])
    out = p.predict(batch)
    assert set(out) == {*labels.CLASS_HEADS, "coverage", "slice_spacing"}
    assert out["sequence"].shape == (2, 5) and out["coverage"].shape == (2, 9)
    np.testing.assert_allclose(out["sequence"].sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(p.embed(batch), emb[first], rtol=1e-5, atol=1e-6)
    assert p.embed(batch).dtype == np.float32 and p.embed(batch).shape == (2, emb.shape[1])


def test_every_series_has_one_row_with_its_status(world):
    rows, series = world["rows"], _csv(world["index"] / "series.csv")
    assert [r["series_key"] for r in rows] == sorted(r["series_key"] for r in series)
    emb = np.load(world["out"] / archive.EMBEDDINGS)
    assert emb.shape[0] == len(rows) and emb.dtype == np.float32
    index_rows = {r["series_key"]: r for r in series}
    for i, r in enumerate(rows):
        s = index_rows[r["series_key"]]
        reasons = [x for x in s["reasons"].split(";") if x]
        if s["status"] == "included" or reasons == ["missing_description"]:
            # The image needs no description; a series the builder rejects keeps its reason.
            assert r["status"] == archive.PREDICTED or r["status"] in labels.EXCLUSION_REASONS
        else:   # the first reason that stops a prediction
            assert r["status"] == [x for x in reasons if x != "missing_description"][0]
        assert np.isfinite(emb[i]).all() == (r["status"] == archive.PREDICTED)
        for h in (*labels.CLASS_HEADS, "coverage"):   # the header-mined labels, as indexed
            assert r[f"header_{h}"] == s[h]
    stripped = next(r for r in rows if r["series_key"] == world["stripped"])
    assert stripped["index_reasons"] == "missing_description"
    assert stripped["status"] == archive.PREDICTED and stripped["sequence"]
    # No path, description or raw UID in any output: only keyed hashes and label names.
    text = "".join(open(world["out"] / n, encoding="utf-8").read() for n in
                   (archive.PREDICTIONS_CSV, archive.QC_MD, archive.NEIGHBOURS_CSV,
                    archive.OVERRIDES_CSV, archive.SUMMARY_JSON))
    ds = pydicom.dcmread(next(p for p in world["dicom"].rglob("*") if p.is_file()))
    for secret in (str(world["dicom"]), str(ds.get("PatientName", "")),
                   str(ds.get("SeriesInstanceUID", "")), str(ds.get("StudyInstanceUID", ""))):
        if secret:
            assert secret not in text


def test_builder_rejections_get_their_reason(world, tmp_path):
    """A model whose preprocessing rejects more than the index (a smaller spacing limit):
    those series get a row with the builder's reason and no embedding."""
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    with open(run / "config.json") as f:
        config = json.load(f)
    # Between the effective spacings of the built series: some pass, some do not.
    spacings = sorted(float(r["effective_spacing_mm"]) for r in
                      _csv(os.path.join(world["dataset"], "manifest.csv"))
                      if r["status"] == "included")
    middle = len(spacings) // 2
    config["input"]["preprocessing"]["max_effective_spacing_mm"] = \
        (spacings[middle - 1] + spacings[middle]) / 2
    with open(run / "config.json", "w") as f:
        json.dump(config, f)
    rows = _predict(dict(world, run=str(run)), tmp_path / "out")
    assert archive.PREDICTED in {r["status"] for r in rows}
    before = {r["series_key"]: r["status"] for r in world["rows"]}
    rejected = [r for r in rows if before[r["series_key"]] == archive.PREDICTED
                and r["status"] != archive.PREDICTED]
    assert rejected
    for r in rejected:
        assert r["status"] == "spacing_too_large" and r["sequence"] == "" and r["qc"] == ""


def _qc_view(out, rows):
    """Per predicted row: (its header labels, disbelief scores) from OUT's full outputs."""
    parts = archive._load_parts(os.path.join(out, archive.WORK_DIR))
    view = {}
    for r in rows:
        if r["status"] == archive.PREDICTED:
            header = archive.header_labels(
                {**{h: r[f"header_{h}"] for h in (*labels.CLASS_HEADS, "coverage")},
                 "effective_spacing_mm": r["header_effective_spacing_mm"]})
            view[r["series_key"]] = (header, archive.qc_scores(parts[r["series_key"]], header))
    return view


def test_qc_rule_on_the_full_outputs(world):
    """qc lists exactly the heads whose disbelief (1 − p(header label); coverage: worst
    region; spacing: relative error beyond the absolute tolerance) is above the threshold."""
    config = predict_config.get_config("tiny")
    thresholds = archive.fixed_thresholds(config)
    view = _qc_view(world["out"], world["rows"])
    assert view
    for r in world["rows"]:
        if r["status"] != archive.PREDICTED:
            assert r["qc"] == ""
            continue
        header, scores = view[r["series_key"]]
        for head in labels.CLASS_HEADS:   # the score is 1 − the header label's probability
            if r[f"header_{head}"]:
                p_header, p_top = 1.0 - scores[head], float(r[f"{head}_probability"])
                if r[head] == r[f"header_{head}"]:
                    assert p_header == pytest.approx(p_top, abs=2e-6)
                else:
                    assert p_header <= p_top + 2e-6
        expected = [h for h in archive.QC_HEADS if h in scores and scores[h] > thresholds[h]
                    + archive.QC_EPS and (h != "slice_spacing" or scores[h] *
                                          header["slice_spacing"] > config.qc_spacing_abs_mm)]
        assert r["qc"] == ";".join(expected)


def test_qc_rule_by_hand():
    """The rule on hand-made scores: above the threshold flags, at it does not; a spacing
    error beyond the relative threshold is flagged only when it is also more than
    qc_spacing_abs_mm in millimetres."""
    config = predict_config.get_config("tiny")
    thr = {"sequence": 0.9, "view": 0.5, "contrast": 0.95, "coverage": 0.99,
           "slice_spacing": 0.5}
    header = {"slice_spacing": 3.0}
    scores = {"sequence": 0.91, "view": 0.5, "contrast": 0.2, "coverage": 0.995,
              "slice_spacing": 0.6}        # 0.6 × 3 mm = 1.8 mm ≤ 2 mm: not flagged
    assert sorted(archive.qc_flags_from(scores, header, thr, config)) == ["coverage",
                                                                          "sequence"]
    header = {"slice_spacing": 5.0}       # 0.6 × 5 mm = 3 mm > 2 mm: flagged
    assert "slice_spacing" in archive.qc_flags_from(scores, header, thr, config)
    del scores["sequence"]                # a head without a header label is never flagged
    assert "sequence" not in archive.qc_flags_from(scores, header, thr, config)


def test_calibrate_thresholds_on_trusted_series():
    """Equal shares per head; at most the target rate of the trusted series flagged; never
    below the floor; a reliable head keeps a low threshold while a weak head's rises."""
    rng = np.random.default_rng(0)
    config = predict_config.get_config("tiny")
    config.qc_target_flag_rate, config.qc_min_disbelief = 0.05, 0.5
    n = 200
    scores, headers = [], []
    for i in range(n):
        s = {"sequence": float(rng.uniform(0, 0.2)),          # reliable: always ≤ 0.2
             "view": float(rng.uniform(0, 0.6)),              # some disbelief > 0.5
             "contrast": float(rng.uniform(0, 1.0)),          # weak: errs everywhere
             "slice_spacing": float(rng.uniform(0, 0.3))}
        scores.append(s)
        headers.append({"slice_spacing": 5.0, "coverage": None})
    cal = archive.calibrate_thresholds(scores, headers, config)
    t = cal["thresholds"]
    assert cal["series"] == n and cal["flagged"] <= 0.05 * n and cal["flag_rate"] <= 0.05
    assert t["sequence"] == 0.5 and t["slice_spacing"] == config.qc_spacing_rel  # floors
    assert t["contrast"] > 0.9                  # the weak head's errors stay unflagged
    contrast = np.array([s["contrast"] for s in scores])
    assert (contrast > t["contrast"] + archive.QC_EPS).sum() == cal["per_head"]["contrast"]["flagged"] > 0
    # A little more room for the budget would overflow it: q is the largest admissible share.
    looser = dict(t, contrast=float(np.sort(contrast)[-cal["per_head"]["contrast"]["flagged"] - 2]))
    assert sum(bool(archive.qc_flags_from(s, h, looser, config))
               for s, h in zip(scores, headers)) > cal["flagged"]
    # A series the image disbelieves beyond every trusted one, on a reliable head, is flagged.
    lie = {"sequence": 0.9, "view": 0.1, "contrast": 0.1, "slice_spacing": 0.0}
    assert list(archive.qc_flags_from(lie, headers[0], t, config)) == ["sequence"]
    assert "warning" not in cal
    small = archive.calibrate_thresholds(scores[:40], headers[:40], config)   # 40 × 5 % < 4
    assert small["warning"].startswith("only 40 trusted series")
    config.qc_target_flag_rate = 0.0
    assert archive.calibrate_thresholds(scores, headers, config)["flagged"] == 0


def test_calibration_per_modality_keeps_a_head_sharp_where_it_is_reliable():
    """A head confidently wrong on CT but reliable on MR: one pooled threshold is set by the
    CT errors and misses an MR lie; per-modality thresholds catch it, within the same
    false-flag budget, and a series without a sequence label gets the stricter one."""
    rng = np.random.default_rng(1)
    config = predict_config.get_config("tiny")
    config.qc_target_flag_rate, config.qc_min_disbelief = 0.02, 0.5
    ct, t1 = labels.SEQUENCE.index("CT"), labels.SEQUENCE.index("T1-SE")
    scores, headers = [], []
    for i in range(300):
        on_ct = i % 3 == 0
        contrast = rng.uniform(0, 1.0) if on_ct else rng.uniform(0, 0.5)   # weak on CT
        scores.append({"sequence": float(rng.uniform(0, 0.1)), "contrast": float(contrast)})
        headers.append({"sequence": ct if on_ct else t1, "slice_spacing": None,
                        "coverage": None})
    mr_lie = ({"sequence": 0.01, "contrast": 0.9}, dict(headers[1]))
    unknown = dict(headers[1], sequence=labels.UNKNOWN)
    config.qc_by_modality = False
    pooled = archive.calibrate_thresholds(scores, headers, config)
    config.qc_by_modality = True
    strata = archive.calibrate_thresholds(scores, headers, config)
    for cal in (pooled, strata):
        assert 0 < cal["flagged"] <= 0.02 * 300
    t = strata["thresholds"]
    assert pooled["thresholds"]["contrast"] > 0.9 > t["contrast@MR"]
    assert t["contrast@CT"] > 0.9 and t["contrast"] == max(t["contrast@CT"], t["contrast@MR"])
    assert strata["per_head"]["contrast@CT"]["compared"] == 100
    assert "contrast" not in archive.qc_flags_from(*mr_lie, pooled["thresholds"], config)
    assert "contrast" in archive.qc_flags_from(*mr_lie, t, config)
    assert archive.threshold_of(t, "contrast", unknown) == t["contrast"]
    assert archive.threshold_of(t, "contrast", headers[0]) == t["contrast@CT"]


def test_qc_calibrated_flags_a_corrupted_header(world, tmp_path):
    """The whole mechanism on the tiny model: thresholds calibrated on the dataset's
    trusted labels (qc_calibration.json) carry over to the archive — none of the same
    series is flagged at target 0 — and the one series whose contrast header is corrupted
    is flagged exactly when the image disbelieves its new label beyond the threshold."""
    rows = world["rows"]
    view = _qc_view(world["out"], rows)
    # Corrupt one contrast header (agent added, or removed), on the series whose flipped
    # label the (untrained) model disbelieves most.
    provenance = {r["series_key"]: r["provenance"] for r in _csv(world["index"] / "series.csv")}
    candidates = [r for r in rows if r["status"] == archive.PREDICTED and (
        "contrast=no_contrast<-default" in provenance[r["series_key"]]
        or "contrast=contrast<-ContrastBolusAgent" in provenance[r["series_key"]])]
    target = min(candidates, key=lambda r: (view[r["series_key"]][1]["contrast"],
                                            r["series_key"]))
    dicom = tmp_path / "dicom"
    shutil.copytree(world["dicom"], dicom)
    for f in _csv(world["index"] / "files.csv"):
        if f["series_key"] == target["series_key"]:
            ds = pydicom.dcmread(dicom / f["path"])
            if target["header_contrast"] == "no_contrast":
                ds.ContrastBolusAgent = "IOPAMIDOL"
            else:
                del ds.ContrastBolusAgent
            ds.save_as(dicom / f["path"])
    out = tmp_path / "out"
    after = _predict(dict(world, dicom=dicom), out, qc_calibration_dataset=world["dataset"],
                     qc_calibration_split="train,val,test", qc_target_flag_rate=0.0)
    cal = json.load(open(out / archive.QC_CALIBRATION_JSON))
    in_dataset = {r["series_key"] for r in _csv(os.path.join(world["dataset"], "manifest.csv"))
                  if r["status"] == "included"}
    assert cal["calibrated"] and cal["series"] == len(in_dataset) and cal["flagged"] == 0
    thresholds = cal["thresholds"]
    hit = next(r for r in after if r["series_key"] == target["series_key"])
    assert hit["header_contrast"] != target["header_contrast"]   # the header now lies
    assert hit["contrast"] == target["contrast"]                 # the image did not change
    disbelief = _qc_view(out, [hit])[hit["series_key"]][1]["contrast"]
    assert disbelief == pytest.approx(1.0 - view[target["series_key"]][1]["contrast"], abs=1e-5)
    flagged = "contrast" in hit["qc"].split(";")
    assert flagged == (disbelief > thresholds["contrast"] + archive.QC_EPS)
    assert flagged, "the corrupted header should stand out against the trusted series"
    section = open(out / archive.QC_MD).read().partition("## contrast:")[2].partition("##")[0]
    assert target["series_key"] in section
    assert f"calibrated on {len(in_dataset)} series" in open(out / archive.QC_MD).read()
    for r, before in zip(after, rows):   # the other series keep their labels and no flag
        if r["series_key"] != target["series_key"]:
            assert r["header_contrast"] == before["header_contrast"]
            if r["series_key"] in in_dataset:
                assert r["qc"] == ""
    # The calibration travels: given to another run, its thresholds are used as they are;
    # a calibration of another step is refused.
    p = pretrained.load(world["run"])
    config = predict_config.get_config("tiny")
    config.qc_calibration = str(out / archive.QC_CALIBRATION_JSON)
    os.makedirs(tmp_path / "other")
    got, info = archive.qc_thresholds(p, config, str(tmp_path / "other"))
    assert got == thresholds and info["calibrated"]
    other = dict(cal, key=dict(cal["key"], step=cal["key"]["step"] + 1))
    (tmp_path / "other.json").write_text(json.dumps(other))
    config.qc_calibration = str(tmp_path / "other.json")
    with pytest.raises(ValueError, match="another checkpoint or step"):
        archive.qc_thresholds(p, config, str(tmp_path / "other"))


def test_qc_corruption_bench_plants_lies_the_index_believes(world, tmp_path):
    """bench/qc_corruption.py (the catch measurement of docs/predict.md): each planted lie
    makes the index mine the wrong label on that head only; every other series, and the
    other heads of the corrupted ones, keep their labels; the score counts a lie as taken
    from the header column of predictions.csv."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "qc_corruption.py")
    spec = importlib.util.spec_from_file_location("qc_corruption", path)
    qc_corruption = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qc_corruption)
    series = _csv(world["index"] / "series.csv")
    split = max(labels.SPLITS, key=lambda s: sum(r["split"] == s for r in series))
    copy = tmp_path / "copy"
    qc_corruption.main(["corrupt", f"--index={world['index']}", f"--dicom_root={world['dicom']}",
                        f"--out={copy}", f"--split={split}", "--seed=0", "--contrast=1",
                        "--sequence=1", "--view=1"])
    lies = json.load(open(copy / "corrupted.json"))
    assert sorted(v["head"] for v in lies.values()) == ["contrast", "sequence", "view"]
    _index(copy, tmp_path / "index", world["salt"])
    before = {r["series_key"]: r for r in series if r["split"] == split}
    after = {r["series_key"]: r for r in _csv(tmp_path / "index" / "series.csv")}
    assert set(after) == set(before)
    for key, row in after.items():
        for head in ("sequence", "view", "contrast"):
            lie = lies.get(key)
            want = lie["lie"] if lie and lie["head"] == head else before[key][head]
            assert row[head] == want, (key, head)
        assert row["status"] == before[key]["status"]
    # The score reads predictions.csv: a row whose header column shows the lie counts as
    # taken; a flag on the lie's head counts as caught.
    rows = [{"series_key": k, "status": "predicted", "qc": "",
             **{f"header_{h}": after[k][h] for h in ("sequence", "view", "contrast")}}
            for k in after if after[k]["status"] == "included"]
    first = sorted(lies)[0]
    next(r for r in rows if r["series_key"] == first)["qc"] = lies[first]["head"]
    with open(tmp_path / "predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    got = qc_corruption.score(qc_corruption.argparse.Namespace(
        out=str(copy), predictions=str(tmp_path / "predictions.csv")))
    assert got["lies_took"] == 3 and got["flagged"] == 1 and got["untouched_flagged"] == 0


def test_suggested_overrides_feed_the_index(world, tmp_path):
    """Missing header labels → suggestions the index's overrides.csv reader accepts."""
    from data_prep.index import outputs

    out = tmp_path / "out"
    _predict(world, out, suggest_threshold=0.01)
    suggested = _csv(out / archive.OVERRIDES_CSV)
    series = _csv(world["index"] / "series.csv")
    missing = {(r["series_key"], h) for r in world["rows"] if r["status"] == archive.PREDICTED
               for h in (*labels.CLASS_HEADS, "coverage") if not r[f"header_{h}"]}
    assert {(s["series_key"], s["column"]) for s in suggested if s["column"] != "reasons"} \
        <= missing
    assert outputs.apply_overrides(series, str(out / archive.OVERRIDES_CSV)) == len(suggested)


def test_resume_skips_finished_series(world, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(world["out"], out)
    parts = sorted(p for p in os.listdir(out / archive.WORK_DIR) if p.startswith("part-"))
    assert len(parts) > 1
    os.remove(out / archive.WORK_DIR / parts[-1])   # as if killed before the last chunk
    os.remove(out / archive.PREDICTIONS_CSV)
    rows = _predict(world, out)
    assert rows == world["rows"]
    summary = json.load(open(out / archive.SUMMARY_JSON))
    predicted = sum(archive.predictable(r, ["missing_description"])
                    for r in _csv(world["index"] / "series.csv"))
    assert 0 < summary["series_run_this_time"] < predicted
    neighbours = _csv(out / archive.NEIGHBOURS_CSV)
    assert {r["rank"] for r in neighbours} == {"1", "2"}


def test_nearest_neighbours_by_cosine():
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0]], np.float32)
    rows = archive.nearest_neighbours(["a", "b", "c", "d"], x, 1, block=3)
    assert [(r["series_key"], r["neighbour_key"]) for r in rows] == \
        [("a", "b"), ("b", "a"), ("c", "b"), ("d", "c")]


def test_mistakes_are_one_line_and_status_2(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for args, said in ((["--config.checkpoint=" + str(tmp_path / "nope"),
                         "--config.dicom_root=" + str(tmp_path)], "does not exist"),
                       (["--config.checkpoint=" + str(tmp_path),
                         "--config.dicom_root=" + str(tmp_path / "unmounted")],
                        "is not a directory (is the archive mounted?)")):
        proc = subprocess.run([sys.executable, "-m", "radnet.main", "--config=configs/predict.py",
                               *args, f"--workdir={tmp_path / 'out'}"], cwd=root,
                              capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))
        lines = [l for l in proc.stderr.splitlines() if l.startswith("radnet:")]
        assert proc.returncode == 2 and len(lines) == 1 and said in lines[0], proc.stderr[-500:]
