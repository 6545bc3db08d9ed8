"""Pretraining loop: one step + eval, loss masking, kill/resume, 8 devices vs 1.

Real components throughout: a TensorStore dataset written with radnet.data.schema, the
Grain pipeline, the model factory, Optax, Orbax checkpoints in a tmp workdir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from radnet import labels
from radnet.data import pipeline, schema
from radnet.train import checkpoint as ckpt_lib
from radnet.train import logging_utils
from radnet.train import losses as losses_lib
from radnet.train import pretrain
from radnet.train import sharding as sharding_lib
from radnet.train import state as state_lib

VOLUME_SHAPE = (16, 32, 32)  # the smallest the radnet variant takes (total stride 16×32×32)
SPLIT_SIZES = {"train": 12, "val": 5, "test": 3}   # val 5: the last eval batch is padded


def make_dataset(path: str, seed: int = 0) -> str:
    """A tiny dataset whose labels are visible in the pixels (so a step can lower the loss),
    with some unknown labels to exercise the masks."""
    rng = np.random.default_rng(seed)
    n = sum(SPLIT_SIZES.values())
    arrays = schema.create(path, n, volume_shape=VOLUME_SHAPE, codec="raw")
    split = np.concatenate([np.full(k, labels.split_index(s), np.int8)
                            for s, k in SPLIT_SIZES.items()])
    seq = rng.integers(0, len(labels.SEQUENCE), n).astype(np.int8)
    view = rng.integers(0, len(labels.VIEW), n).astype(np.int8)
    contrast = rng.integers(0, 2, n).astype(np.int8)
    contrast[::4] = labels.UNKNOWN
    coverage = rng.integers(0, 2, (n, len(labels.COVERAGE))).astype(np.int8)
    coverage[1::5] = labels.UNKNOWN
    spacing = rng.uniform(1.0, 10.0, n).astype(np.float32)
    spacing[2::6] = np.nan
    vol = rng.integers(0, 60, (n, *VOLUME_SHAPE)).astype(np.uint8)
    vol += (seq * 40)[:, None, None, None].astype(np.uint8)
    arrays["volume"].write(vol).result()
    for name, values in dict(sequence=seq, view=view, contrast=contrast, coverage=coverage,
                             effective_spacing_mm=spacing, split=split).items():
        arrays[name].write(values).result()
    return path


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Each run() compiles the same steps again; a persistent cache makes repeats cheap.

    The folder is the session's (tests/conftest.py), so test_train_faults, which imports
    this fixture and runs the same tiny configs, loads these programs instead of compiling
    them again."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {n: getattr(jax.config, n) for n in names}
    jax.config.update(names[0], os.environ.get("JAX_COMPILATION_CACHE_DIR")
                      or str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update(names[1], 0)
    jax.config.update(names[2], 0)
    yield
    for n, v in saved.items():
        jax.config.update(n, v)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("ds") / "dataset"))


def tiny_config(dataset_path: str, **overrides):
    config = pretrain_config.get_config(f"tiny,dataset={dataset_path}")
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _params_of(workdir, step=None):
    _, variables, _ = ckpt_lib.load_variables(workdir, step)
    return jax.device_get(variables)


def test_one_step_train_and_eval(dataset, tmp_path):
    """One real step from a fresh workdir, then validation over the whole (padded) val split."""
    workdir = str(tmp_path / "run")
    config = tiny_config(dataset, **{"train.num_steps": 1, "eval.every_steps": 1,
                                     "checkpoint.every_steps": 1})
    assert pretrain.run(config, workdir) == 0

    lines = logging_utils.read_metrics(workdir)
    train = [m for m in lines if m["split"] == "train"]
    val = [m for m in lines if m["split"] == "val"]
    assert [m["step"] for m in train] == [1] and [m["step"] for m in val] == [1]
    assert np.isfinite(train[0]["loss"]) and train[0]["volumes_per_s"] > 0
    # every val sample counted once: 5 samples in batches of 2 → 3 batches, 1 padding row
    assert val[0]["num_samples"] == SPLIT_SIZES["val"]
    for head in labels.CLASS_HEADS:
        assert 0.0 <= val[0][f"{head}/accuracy"] <= 1.0
    assert val[0]["slice_spacing/mae_mm"] > 0

    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["input"]["volume_shape"] == list(VOLUME_SHAPE)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))

    loaded_config, variables, _ = ckpt_lib.load_variables(workdir)
    assert loaded_config.model.depth == config.model.depth
    assert set(variables) == {"params", "batch_stats"}
    # the restored weights are the trained ones: evaluated again on the val split they
    # reproduce the validation loss the run logged at step 1 (a fresh initialisation or
    # a wrong step would not), and the batch-norm statistics have left their init (0, 1).
    model = state_lib.build_model(loaded_config)
    mesh = sharding_lib.make_mesh(loaded_config.mesh)
    again = pretrain.evaluate(
        jax.jit(pretrain.make_eval_step(model)), variables,
        pipeline.eval_batches(dataset, split="val", batch_size=2),
        sharding_lib.batch_sharding(mesh), dict(loaded_config.loss_weights))
    np.testing.assert_allclose(again["loss"], val[0]["loss"], rtol=1e-5)
    # The logged accuracies are the restored model's on the val rows, recomputed here
    # independently: argmax of a plain model.apply over every val volume, unknowns masked.
    lab = schema.read_labels(dataset)
    rows = np.flatnonzero(lab["split"] == labels.split_index("val"))
    vols = schema.open_arrays(dataset, names=("volume",))["volume"].read().result()[rows]
    direct = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        variables, pretrain.model_inputs(jnp.asarray(vols)))
    for head in labels.CLASS_HEADS:
        known = lab[head][rows] >= 0
        hits = np.argmax(np.asarray(direct[head]), -1)[known] == lab[head][rows][known]
        assert val[0][f"{head}/accuracy"] == pytest.approx(hits.mean())
    means = [np.abs(v).max() for p, v in jax.tree_util.tree_leaves_with_path(
        variables["batch_stats"]) if "mean" in jax.tree_util.keystr(p)]
    assert means and max(means) > 0
    x = pretrain.model_inputs(jnp.zeros((2, *VOLUME_SHAPE), jnp.uint8))
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert out["sequence"].shape == (2, len(labels.SEQUENCE))

def test_loss_masks_unknown_labels():
    """Unknown (-1 / NaN) labels and padding rows contribute nothing, whatever the logits."""
    rng = np.random.default_rng(0)
    b = 4
    outputs = {h: jnp.asarray(rng.normal(size=(b, labels.HEAD_SIZES[h])), jnp.float32)
               for h in ("sequence", "view", "contrast", "coverage")}
    outputs["slice_spacing"] = jnp.asarray([2.0, 3.0, 100.0, 5.0], jnp.float32)
    batch = {"sequence": jnp.asarray([0, 1, -1, 2]), "view": jnp.asarray([-1, -1, -1, -1]),
             "contrast": jnp.asarray([1, 0, 1, 0]),
             "coverage": jnp.asarray(np.stack([np.ones(9), -np.ones(9), np.zeros(9),
                                               np.ones(9)]).astype(np.int32)),
             "effective_spacing_mm": jnp.asarray([1.0, 3.0, np.nan, 5.0], jnp.float32)}
    weights = dict(sequence=1.0, view=1.0, contrast=1.0, coverage=1.0, slice_spacing=1.0)
    mask = jnp.asarray([True, True, True, False])
    loss_fn = jax.jit(lambda o: losses_lib.multitask_loss(o, batch, weights, mask))
    loss, per_head, stats = loss_fn(outputs)

    # view: no known label → exactly 0 and no gradient; no NaN from an empty mean
    assert float(per_head["view"]) == 0.0 and float(stats["view/count"]) == 0
    # sequence: rows 0 and 1 (row 2 unknown, row 3 padding)
    logp = jax.nn.log_softmax(outputs["sequence"])
    np.testing.assert_allclose(per_head["sequence"], -(logp[0, 0] + logp[1, 1]) / 2, rtol=1e-6)
    # spacing: rows 0 and 1 only (row 2 NaN with a wild prediction, row 3 padding)
    np.testing.assert_allclose(per_head["slice_spacing"], np.sqrt((1.0 ** 2 + 0.0) / 2), rtol=1e-6)
    # coverage: rows 0 and 2 known (9 entries each)
    assert float(stats["coverage/count"]) == 18 and float(stats["coverage/exact_count"]) == 2
    assert np.isfinite(float(loss))

    # changing anything that is masked changes nothing, and gradients are finite
    def f(o):
        return loss_fn(o)[0]
    moved = dict(outputs)
    moved["view"] = outputs["view"] + 7.0
    moved["sequence"] = outputs["sequence"].at[2:].add(5.0)
    moved["slice_spacing"] = outputs["slice_spacing"].at[2:].add(50.0)
    moved["coverage"] = outputs["coverage"].at[1].add(3.0).at[3].add(3.0)
    np.testing.assert_allclose(f(moved), loss, rtol=1e-6)
    grads = jax.jit(jax.grad(f))(outputs)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["view"]).sum()) == 0.0
    assert float(jnp.abs(grads["sequence"][2:]).sum()) == 0.0


def test_kill_and_resume_equals_uninterrupted(dataset, tmp_path):
    """Stopped after step 2 (checkpoint + data position), restarted: same params at step 4."""
    straight = str(tmp_path / "straight")
    pretrain.run(tiny_config(dataset), straight)

    resumed = str(tmp_path / "resumed")
    pretrain.run(tiny_config(dataset, **{"train.stop_at_step": 3,
                                         "checkpoint.every_steps": 3}), resumed)
    assert ckpt_lib.make_manager(resumed, tiny_config(dataset).checkpoint,
                                 read_only=True).latest_step() == 3
    pretrain.run(tiny_config(dataset, **{"checkpoint.every_steps": 3}), resumed)

    a, b = _params_of(straight, 4), _params_of(resumed, 4)
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
    for path, value in flat_a:
        np.testing.assert_allclose(value, flat_b[path], rtol=1e-6, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))
    # the resumed run really started from step 3: its train log has step 4 but no step 1..3 twice
    steps = [m["step"] for m in logging_utils.read_metrics(resumed) if m["split"] == "train"]
    assert steps == [1, 2, 3, 4]
    # and the data order continued: straight and resumed saw the same batches, hence same losses
    la = [m["loss"] for m in logging_utils.read_metrics(straight) if m["split"] == "train"]
    lb = [m["loss"] for m in logging_utils.read_metrics(resumed) if m["split"] == "train"]
    np.testing.assert_allclose(la, lb, rtol=1e-5)


_EIGHT_DEVICE_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    from absl import logging
    logging.set_verbosity("info")
    assert jax.device_count() == 8, jax.devices()
    from tests.radnet.test_train import tiny_config
    from radnet.train import pretrain
    overrides = {"train.batch_size": 8, "eval.batch_size": 8, "train.num_steps": 2,
                 "eval.every_steps": 2, "checkpoint.every_steps": 2,
                 # FSDP: shard every array of ≥ 64 elements over the 8 'data' devices
                 "sharding.fsdp_axis": "data", "sharding.fsdp_min_size": 64}
    pretrain.run(tiny_config(sys.argv[1], **overrides), sys.argv[2])
""")


def test_eight_devices_match_one(dataset, tmp_path):
    """Same run on 8 fake CPU devices (batch split, parameters FSDP-sharded) and on 1."""
    overrides = {"train.batch_size": 8, "eval.batch_size": 8, "train.num_steps": 2,
                 "eval.every_steps": 2, "checkpoint.every_steps": 2}
    # The 8-device subprocess starts first and runs while this process trains on one
    # device: two independent runs (different programs, no shared cache entries), so on
    # 2 cores their start-up and compilation overlap instead of adding up.
    eight = str(tmp_path / "eight")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                          " --xla_force_host_platform_device_count=8").strip())
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", _EIGHT_DEVICE_SCRIPT, dataset, eight],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        one = str(tmp_path / "one")
        pretrain.run(tiny_config(dataset, **overrides), one)
        _, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-4000:]
    assert "'data': 8" in stderr   # the mesh really spanned 8 devices

    def losses(workdir):
        lines = logging_utils.read_metrics(workdir)
        return ([m["loss"] for m in lines if m["split"] == "train"],
                [m["loss"] for m in lines if m["split"] == "val"])

    train_1, val_1 = losses(one)
    train_8, val_8 = losses(eight)
    assert len(train_1) == 2 and len(val_1) == 1
    np.testing.assert_allclose(train_8, train_1, rtol=2e-4)
    np.testing.assert_allclose(val_8, val_1, rtol=2e-4)
