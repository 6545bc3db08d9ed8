"""Segmentation beyond the liver: a 3-class nnU-Net-layout dataset through data_prep.nifti,
task ``segment`` (configs/segment.py:tiny) on the shared trainer, sliding-window inference
against a direct full-volume pass, and the way back to the source grid."""

import csv
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import segment as segment_config
from data_prep.nifti import build
from radnet.data import nifti
from radnet.evaluators import segmentation as seg_metrics
from radnet.train import segment
from tests.data_prep.test_nifti import write_nnunet


class PerVoxel(nn.Module):
    """A 1×1×1 convolution: each voxel's output depends on that voxel only, so any window
    that contains a voxel predicts it exactly as the whole volume does."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Conv(3, (1, 1, 1))(jnp.concatenate([x, x ** 2], axis=-1))


def _mesh():
    mesh = jax.make_mesh((1,), ("data",))
    return jax.NamedSharding(mesh, jax.P("data")), jax.NamedSharding(mesh, jax.P())


@pytest.mark.parametrize("weighting", ["gaussian", "uniform"])
def test_sliding_window_equals_a_full_volume_pass(tmp_path, weighting):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 40, 36), dtype=np.uint8)
    ds = str(tmp_path / "ds")
    build.write_group(ds, {"kind": "segmentation", "in_plane": 40})
    build.write_case(ds, "c0", nifti.PreparedCase(image, np.zeros_like(image), {}))
    model = PerVoxel()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 4, 1)))
    batch_sharding, replicated = _mesh()
    step = jax.jit(segment.make_predict_step(model), out_shardings=(batch_sharding, replicated))
    window = (8, 16, 16)                                    # smaller than the case on every axis
    starts = seg_metrics.window_grid(image.shape, window, 0.5)
    assert len({s[0] for s in starts}) > 1 and len({s[2] for s in starts}) > 1
    weights = seg_metrics.gaussian_weights(window) if weighting == "gaussian" else None
    got = segment.evaluate_cases(ds, ["c0"], {"c0": starts}, window, 3, step, variables,
                                 batch_sharding, 2, lambda c, p: p, weights)["c0"]
    full, _ = step(variables, {"image": image[None]})
    want = np.moveaxis(np.asarray(full["probability"])[0], -1, 0)
    # Σ w·p / Σ w of identical p is p up to float32 rounding of ≤ 8 weighted terms
    # (a few ulp of values ≤ 1): 1e-6 is ~16 ulp.
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_gaussian_weights_as_documented():
    w = seg_metrics.gaussian_weights((9, 8, 5), sigma_scale=0.125)
    assert w.shape == (9, 8, 5) and w.max() == pytest.approx(1.0) and w[4, 3, 2] == w.max()
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1], rtol=1e-6)       # symmetric
    # Separable: along the first axis it is exp(-x²/2σ²) with σ = 9/8 voxels.
    x = np.arange(9) - 4.0
    np.testing.assert_allclose(w[:, 3, 2] / w[4, 3, 2], np.exp(-0.5 * (x / (9 / 8)) ** 2), rtol=1e-5)


def test_window_grid_covers_and_centres():
    assert seg_metrics.window_starts(20, 8, 0.5) == [0, 4, 8, 12]
    assert seg_metrics.window_starts(21, 8, 0.5) == [0, 4, 8, 12, 13]
    assert seg_metrics.window_starts(5, 8, 0.5) == [-1]            # centred, padded
    assert len(seg_metrics.window_grid((20, 5, 21), (8, 8, 8), 0.5)) == 4 * 1 * 5


def test_back_to_the_source_grid():
    # Training grid: 3 slices at 5 mm, 4×4 pixels; source: 2.5 mm slices, 8×8 pixels.
    prob = np.zeros((2, 3, 4, 4), np.float32)
    prob[0] = 1
    prob[:, 1, 1:3, 1:3] = [[[0.0]], [[1.0]]]                   # class 1 at slice 1 centre
    labels = seg_metrics.to_source_grid(prob, (5, 8, 8), 2.5, 5.0)
    # Source slices sit at training slices 0, .5, 1, 1.5, 2: only source slice 2 is at
    # training slice 1; at .5 and 1.5 both classes interpolate to 0.5 and argmax keeps the
    # first (background). Source pixels 2..5 map to training pixels 0.75..2.25 → inside.
    assert labels[2, 2:6, 2:6].all() and labels[2].sum() == 16
    assert labels[[0, 1, 3, 4]].sum() == 0
    same = seg_metrics.to_source_grid(prob, (3, 4, 4), 5.0, 5.0)
    np.testing.assert_array_equal(same, np.argmax(prob, axis=0))


def test_multiclass_segment_run_on_the_trainer(tmp_path):
    src = tmp_path / "Dataset064_KiTS"
    write_nnunet(str(src), n=4)
    ds = str(tmp_path / "ds")
    build.build(str(src), ds, in_plane=32, slice_spacing_mm=1.25, progress=False)
    config = segment_config.get_config(f"tiny,dataset={ds},pretrained=,freeze=scratch,"
                                       "loss=dice_ce,steps=2")
    workdir = str(tmp_path / "run")
    results = segment.train_and_evaluate(config, workdir)

    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["model"]["num_classes"] == 3 and saved["class_names"] == [
        "background", "kidney", "tumor"]
    assert results["classes"] == ["kidney", "tumor"] and results["windows"] == "sliding"
    with open(os.path.join(workdir, "per_case.csv")) as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["split"], r["class"]) for r in rows) == [
        ("test", "kidney"), ("test", "tumor"), ("val", "kidney"), ("val", "tumor")]
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    for split in ("val", "test"):
        for name in ("kidney", "tumor"):
            per_class = summary[split]["classes"][name]
            assert set(per_class) == set(seg_metrics.METRICS)
            row = next(r for r in rows if r["split"] == split and r["class"] == name)
            for metric in seg_metrics.METRICS:
                assert per_class[metric]["mean"] == pytest.approx(float(row[metric]), abs=1e-6)
        assert results[split]["mean_dice"] == pytest.approx(np.mean(
            [float(r["dice"]) for r in rows if r["split"] == split]), abs=1e-6)
    metrics = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    assert {m["step"] for m in metrics if m["split"] == "val"} == {2}
    assert all(np.isfinite(m["loss"]) for m in metrics if m["split"] == "train")


def test_config_mistakes_are_config_errors(tmp_path):
    from radnet.train import loop

    write_nnunet(str(tmp_path / "src"), n=3)
    ds = str(tmp_path / "ds")
    build.build(str(tmp_path / "src"), ds, in_plane=32, progress=False)
    config = segment_config.get_config(f"tiny,dataset={ds},pretrained=,freeze=scratch")
    assert segment.resolve_config(config).model.num_classes == 3
    config.model.num_classes = 2
    with pytest.raises(loop.ConfigError, match=r"has 3 classes \(background, kidney, tumor\)"):
        segment.resolve_config(config)
    with pytest.raises(loop.ConfigError, match="pretrained.workdir is empty"):
        segment.resolve_config(segment_config.get_config(f"tiny,dataset={ds},pretrained="))
    with pytest.raises(loop.ConfigError, match="multiple of the encoder's total stride"):
        segment.resolve_config(segment_config.get_config(
            f"tiny,dataset={ds},pretrained=,freeze=scratch,patch=16x30x32"))
