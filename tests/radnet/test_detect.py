"""Task ``detect``: targets ↔ decoding, the loss, the detector's encoder names, and one real
tiny run on phantom-lesion slabs with a pretrained encoder (Orbax, Grain, the loop)."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import detect as detect_config
from data_prep.phantoms import lesions as phantom_lesions
from radnet import models
from radnet.data import deeplesion as dl
from radnet.detection import decode
from radnet.detection.boxes import recist_box
from radnet.models.detection import STRIDE
from radnet.train import checkpoint as ckpt_lib
from radnet.train import detect
from tests.radnet.test_transfer import ENC, radnet_init, save_pretraining


def test_targets_decode_back_to_the_boxes():
    boxes = np.array([[10.0, 12.0, 30.0, 26.0], [40.5, 8.0, 52.0, 20.0], [0, 0, 0, 0]],
                     np.float32)
    valid = np.array([True, True, False])
    t = decode.centernet_targets(boxes, valid, (16, 16), STRIDE)
    assert t["box_mask"].tolist() == [1, 1, 0]
    assert t["heatmap"].max() == 1.0 and (t["heatmap"] == 1.0).sum() == 2
    # perfect outputs: logits high at the centres, the targets' sizes and offsets everywhere
    logits = np.where(t["heatmap"] == 1.0, 8.0, -8.0)[None, ..., None]
    size = np.zeros((1, 16 * 16, 2), np.float32)
    off = np.zeros((1, 16 * 16, 2), np.float32)
    for i in range(2):
        size[0, t["center_index"][i]] = t["log_size"][i]
        off[0, t["center_index"][i]] = t["offset"][i]
    out = {"heatmap": jnp.asarray(logits), "size": jnp.asarray(size.reshape(1, 16, 16, 2)),
           "offset": jnp.asarray(off.reshape(1, 16, 16, 2))}
    peaks = decode.topk_peaks(out, 5)
    got, scores = decode.to_detections(np.asarray(peaks["scores"][0]),
                                       np.asarray(peaks["boxes"][0]), STRIDE, (64, 64), 0.3, 10,
                                       min_score=0.5)
    assert len(got) == 2
    np.testing.assert_allclose(sorted(got.tolist()), sorted(boxes[:2].tolist()), atol=1e-4)
    # the loss is lower for the perfect outputs than for shifted ones
    batch = {k: jnp.asarray(v[None]) for k, v in t.items()}
    good, _ = detect.detection_loss(out, batch, 0.1, 1.0)
    bad, _ = detect.detection_loss({**out, "heatmap": jnp.roll(out["heatmap"], 3, axis=2)},
                                   batch, 0.1, 1.0)
    assert float(good) < 0.05 < float(bad)


def test_detector_encoder_has_the_pretrained_names_and_shapes():
    det = models.get("detector")(**ENC, neck_width=8, head_width=8)
    shapes = jax.eval_shape(lambda: det.init(jax.random.key(0), jnp.zeros((1, 3, 64, 64, 1)),
                                             train=False))
    pre = radnet_init()
    for collection in ("params", "batch_stats"):
        a = jax.tree.map(np.shape, ckpt_lib.flatten(shapes[collection]["encoder"]))
        b = jax.tree.map(np.shape, ckpt_lib.flatten(pre[collection]["encoder"]))
        assert a == b
    with pytest.raises(ValueError, match="multiples of 64"):
        det.init(jax.random.key(0), jnp.zeros((1, 3, 48, 48, 1)), train=False)


def write_phantom_slabs(path, splits=("train",) * 4 + ("val", "test"), rows=64, seed=0):
    """Phantom lesion slabs (3 slices around each lesion's key slice) as a lesion dataset."""
    base, masks = phantom_lesions.anatomy(rows, 12)
    store = dl.create(path, len(splits), 1, rows, 5.0, (-1024, 1024), "phantom")
    images, lesions = [], []
    for i, split in enumerate(splits):
        rng = np.random.default_rng([seed, i])
        plan = phantom_lesions.plan_study(rng, i, rows, 12, 5.0, 5.0, masks, 2)
        hu = phantom_lesions.render(base, plan, rng)
        key = plan.lesions[0].key_slice
        slab, _ = dl.prepare_slab(hu[key - 1:key + 2], 5.0, 5.0, rows, (-1024, 1024))
        store[i].write(slab).result()
        on_key = [les for les in plan.lesions if les.key_slice == key]
        images.append({"index": i, "image_key": f"p{i}", "split": split, "status": "ok",
                       "reason": "", "key_slice_index": key, "spacing_mm": 5,
                       "slice_interval_mm": 5, "scale": 1, "rows": rows, "columns": rows,
                       "num_lesions": len(on_key)})
        for j, les in enumerate(on_key):
            box = recist_box(np.concatenate(les.endpoints()), 2.0, (rows, rows))
            lesions.append({"index": i, "lesion_id": f"{i}-{j}", "status": "ok", "reason": "",
                            "split": split, **dict(zip(("x1", "y1", "x2", "y2"), box)),
                            **dict(zip(("bx1", "by1", "bx2", "by2"), box)),
                            "lesion_type": phantom_lesions.LESION_KINDS[les.kind][4],
                            "long_mm": les.long_px * 5.0, "short_mm": les.short_px * 5.0,
                            "possibly_noisy": 0})
    dl.write_tables(path, images, lesions)


def test_detect_run_with_a_pretrained_frozen_encoder(tmp_path):
    write_phantom_slabs(str(tmp_path / "ds"))
    pre = radnet_init()
    save_pretraining(str(tmp_path / "pre"), pre["params"], pre["batch_stats"], ENC, step=3)
    config = detect_config.get_config(
        f"tiny,freeze=all,dataset={tmp_path / 'ds'},pretrained={tmp_path / 'pre'}")
    workdir = str(tmp_path / "run")
    results = detect.train_and_evaluate(config, workdir)

    assert results["freeze"] == "all" and results["best_step"] in (2, 4)
    for split in ("val", "test"):
        r = results[split]
        assert r["num_images"] == 1 and r["num_lesions"] >= 1
        assert set(r["sensitivity"]) == {"0.5", "1", "2", "4", "8", "16"}
        assert all(0.0 <= v <= 1.0 for v in r["sensitivity"].values())
        assert sum(g["num_lesions"] for g in r["by_size"].values()) == r["num_lesions"]
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f) == results
    with open(os.path.join(workdir, "detections.csv")) as f:
        dets = list(csv.DictReader(f))
    assert {d["split"] for d in dets} <= {"val", "test"}
    assert all(float(d["x1"]) <= float(d["x2"]) for d in dets)
    assert open(os.path.join(workdir, "froc.png"), "rb").read(4) == b"\x89PNG"
    assert "| all (test) |" in open(os.path.join(workdir, "froc.md")).read()
    metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    vals = {m["step"]: m["froc_mean"] for m in metrics if m["split"] == "val"}
    assert set(vals) == {2, 4} and vals[results["best_step"]] == max(vals.values())
    # frozen: the trained encoder is the pretrained one, bit for bit
    restored, _ = ckpt_lib.restore_subtree(workdir, {"params": pre["params"],
                                                     "batch_stats": pre["batch_stats"]})
    for collection in ("params", "batch_stats"):
        a = ckpt_lib.flatten(restored[collection]["encoder"])
        b = ckpt_lib.flatten(pre[collection]["encoder"])
        for k in b:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    assert "| run (all) |" in detect.format_runs(str(tmp_path))


def test_scratch_is_the_same_network_with_fresh_weights(tmp_path):
    write_phantom_slabs(str(tmp_path / "ds"), splits=("train", "val"))
    pre = radnet_init()
    save_pretraining(str(tmp_path / "pre"), pre["params"], pre["batch_stats"], ENC, step=3)
    config = detect_config.get_config(
        f"freeze=scratch,dataset={tmp_path / 'ds'},pretrained={tmp_path / 'pre'}")
    resolved = detect.resolve_config(config)
    assert (resolved.model.depth, resolved.model.width) == (ENC["depth"], ENC["width"])
    assert tuple(resolved.input.volume_shape) == (3, 64, 64)
    with pytest.raises(ValueError, match="pretrained.workdir is empty"):
        detect.resolve_config(detect_config.get_config(f"dataset={tmp_path / 'ds'},pretrained="))
