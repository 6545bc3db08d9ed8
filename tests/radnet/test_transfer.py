"""Encoder transfer: partial Orbax restore (loud on mismatch) and bit-exact freezing.

Uses the real radnet classifier and VNet (tiny), a real Orbax checkpoint in the
pretraining layout (WORKDIR/checkpoints, item 'state' = {step, params, batch_stats,
opt_state}) and the real train step of radnet.train.segment.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from radnet import models
from radnet.train import checkpoint as ckpt_lib
from radnet.train import segment, transfer

ENC = dict(depth=10, variant="radnet", norm="batch", width=4)
SHAPE = (2, 16, 32, 32, 1)


def _perturb(tree, seed):
    # Distinct values, so "equal to the checkpoint" cannot hold by accident.
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    return treedef.unflatten([np.asarray(l + 0.1 * rng.normal(size=np.shape(l)), np.float32)
                              for l in leaves])


def save_pretraining(workdir, params, batch_stats, model_cfg, step=7):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        # The fields of a real pretraining config.json that inference reads.
        json.dump({"task": "pretrain", "model_name": "radnet", "model": model_cfg,
                   "input": {"volume_shape": list(SHAPE[1:4])}}, f)
    state = {"step": np.int32(step), "params": params, "batch_stats": batch_stats,
             "opt_state": optax.adam(1e-3).init(params)}
    mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    mngr.wait_until_finished()
    mngr.close()


@functools.lru_cache(maxsize=None)
def radnet_init(width=4):
    """Tiny 3D-RADNet variables (cached; NumPy-filled: compiling init is slow on CPU)."""
    model = models.get("radnet")(**dict(ENC, width=width, hidden=8))
    return segment.init_variables(model, SHAPE, seed=1)


@functools.lru_cache(maxsize=None)
def _vnet_init():
    model = models.get("vnet")(**ENC, num_classes=2, decoder_width=4)
    return segment.init_variables(model, SHAPE, seed=5)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    cfg = dict(ENC, hidden=8)
    v = radnet_init()
    params, stats = _perturb(v["params"], 2), _perturb(v["batch_stats"], 3)
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    save_pretraining(workdir, params, stats, cfg)
    return workdir, params, stats


def _vnet_variables(frozen=()):
    # The variables do not depend on frozen_stages (it only switches batch-norm modes).
    model = models.get("vnet")(**ENC, num_classes=2, decoder_width=4, frozen_stages=frozen)
    return model, _vnet_init()


def _flat(tree):
    return ckpt_lib.flatten(tree)


def test_restore_puts_checkpoint_encoder_under_fresh_decoder(pretrained):
    workdir, params, stats = pretrained
    _, fresh = _vnet_variables()
    restored, step = ckpt_lib.restore_subtree(workdir, fresh)
    assert step == 7
    for collection, saved in (("params", params), ("batch_stats", stats)):
        got = _flat(restored[collection]["encoder"])
        want = _flat(saved["encoder"])
        assert got.keys() == want.keys() and got
        for k in want:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=str(k))
    # The decoder is the model's own initialisation, untouched.
    for collection in ("params", "batch_stats"):
        got, want = _flat(restored[collection]["decoder"]), _flat(fresh[collection]["decoder"])
        assert got.keys() == want.keys() and got
        for k in want:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
    # Nothing of the classifier's heads came along.
    assert set(restored["params"]) == {"encoder", "decoder"}


def test_renamed_layer_raises_with_its_name(tmp_path, pretrained):
    _, params, stats = pretrained
    params = jax.tree.map(np.asarray, params)
    params["encoder"]["block2"]["unit1"]["conv1_renamed"] = (
        params["encoder"]["block2"]["unit1"].pop("conv1"))
    workdir = str(tmp_path / "renamed")
    save_pretraining(workdir, params, stats, dict(ENC, hidden=8))
    _, fresh = _vnet_variables()
    with pytest.raises(ckpt_lib.MismatchError) as e:
        ckpt_lib.restore_subtree(workdir, fresh)
    msg = str(e.value)
    assert "missing in checkpoint: params/encoder/block2/unit1/conv1/kernel" in msg
    assert "unexpected in checkpoint: params/encoder/block2/unit1/conv1_renamed/kernel" in msg


def test_misshaped_encoder_lists_every_parameter(tmp_path):
    wide = dict(ENC, width=8, hidden=8)
    v = radnet_init(width=8)
    workdir = str(tmp_path / "wide")
    save_pretraining(workdir, v["params"], v["batch_stats"], wide)
    _, fresh = _vnet_variables()
    with pytest.raises(ckpt_lib.MismatchError) as e:
        ckpt_lib.restore_subtree(workdir, fresh)
    lines = [l for l in str(e.value).splitlines() if "shape mismatch" in l]
    n_encoder = len(_flat(fresh["params"]["encoder"])) + len(_flat(fresh["batch_stats"]["encoder"]))
    assert len(lines) == n_encoder                     # every leaf named, not just the first
    assert any("params/encoder/stem/conv/kernel" in l for l in lines)


def test_freeze_rows():
    assert transfer.frozen_stages("all") == ("stem", "block1", "block2", "block3", "block4")
    assert transfer.frozen_stages("block2") == ("stem", "block1", "block2")
    assert transfer.frozen_stages("none") == transfer.frozen_stages("scratch") == ()
    with pytest.raises(ValueError, match="unknown freeze"):
        transfer.frozen_stages("block5")


# One row per distinct set of frozen stages ("none" and "scratch" freeze nothing alike; they
# differ only in where the encoder's weights come from, which this test does not involve).
_DISTINCT_ROWS = list({transfer.frozen_stages(r): r for r in transfer.FREEZE_ROWS}.values())


@pytest.mark.parametrize("freeze", _DISTINCT_ROWS)
def test_frozen_parameters_bit_identical_after_steps(freeze):
    frozen = transfer.frozen_stages(freeze)
    model, v = _vnet_variables(frozen)
    v = {"params": _perturb(v["params"], 11), "batch_stats": _perturb(v["batch_stats"], 12)}
    tx = transfer.freeze(optax.adam(1e-2), frozen)
    p_labels = transfer.label_tree(v["params"], frozen)
    s_labels = transfer.label_tree(v["batch_stats"], frozen)
    # Eager: the six rows would otherwise compile six VNet train steps (minutes on 2
    # cores); the jitted step runs in test_segment_run.py.
    step = segment.make_train_step(model, p_labels, s_labels, tx, 1.0)
    state = {"step": jnp.zeros((), jnp.int32), "params": v["params"],
             "batch_stats": v["batch_stats"], "opt_state": tx.init(v["params"])}
    rng = np.random.default_rng(0)
    # Two steps: the second already starts from a moved state and non-zero Adam moments,
    # which is what a later step would add; a third only cost eager dispatch time.
    with jax.disable_jit():
        for _ in range(2):
            image = rng.integers(0, 256, SHAPE[:4], dtype=np.uint8)
            batch = {"image": image, "mask": (image > 128).astype(np.uint8)}
            state, metrics = step(state, batch, None)
            assert np.isfinite(float(metrics["loss"]))
    for collection, labels in (("params", p_labels), ("batch_stats", s_labels)):
        before, after = _flat(v[collection]), _flat(state[collection])
        lab = _flat(labels)
        changed = {k for k in before
                   if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
        frozen_keys = {k for k in before if lab[k] == transfer.FROZEN}
        assert not changed & frozen_keys, sorted(changed & frozen_keys)[:3]
        assert all(k[1] in frozen for k in frozen_keys)
        assert len(frozen_keys) == sum(1 for k in before if k[0] == "encoder" and k[1] in frozen)
        if collection == "params":
            # Everything trainable moved (Adam moves every leaf with a gradient).
            trainable = set(before) - frozen_keys
            assert trainable and trainable <= changed, sorted(trainable - changed)[:3]
    # The model itself (not only keep_frozen's copy-back) leaves frozen stages' running
    # statistics alone in train mode: frozen_stages switches their batch norm to the
    # running averages, so the forward pass is the pretrained network's.
    with jax.disable_jit():
        _, updates = model.apply(v, rng.integers(0, 256, SHAPE).astype(np.float32) / 255,
                                 train=True, mutable=["batch_stats"])
    fresh, old, lab = _flat(updates["batch_stats"]), _flat(v["batch_stats"]), _flat(s_labels)
    for k in old:
        if lab[k] == transfer.FROZEN:
            np.testing.assert_array_equal(np.asarray(fresh[k]), np.asarray(old[k]), err_msg=str(k))
    if freeze != "all":  # the stages left to train do update them
        assert any(not np.array_equal(np.asarray(fresh[k]), np.asarray(old[k]))
                   for k in old if lab[k] == transfer.TRAINABLE)
    # The frozen subtrees keep no optimizer state (set_to_zero).
    n_opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
    n_trainable = sum(np.size(x) for k, x in _flat(v["params"]).items()
                      if _flat(p_labels)[k] == transfer.TRAINABLE)
    assert n_opt == 2 * n_trainable + 1       # Adam mu, nu (+ its count)
