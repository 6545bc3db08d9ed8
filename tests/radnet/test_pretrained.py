"""radnet.pretrained, the front door: load a real (tiny) pretraining run, take its encoder,
merge it into another model, freeze stages — and run README's example exactly as printed.

One real run for the module: a TensorStore dataset, radnet.train.pretrain, Orbax checkpoints
at ``<tmp>/runs/demo/pretrain`` (README's path, so its example runs unchanged in that cwd).
"""

from __future__ import annotations

import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import pretrain as pretrain_config
from radnet import labels, models, preprocess, pretrained
from radnet.data import augment, schema
from radnet.train import checkpoint as ckpt_lib

VOLUME_SHAPE = (16, 32, 32)        # the smallest the radnet variant takes (total stride 16×32×32)
SPLITS = {"train": 8, "val": 3}
README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
README_WORKDIR = "runs/demo/pretrain"


def _write_dataset(path: str) -> None:
    rng = np.random.default_rng(0)
    n = sum(SPLITS.values())
    arrays = schema.create(path, n, volume_shape=VOLUME_SHAPE, codec="raw")
    seq = rng.integers(0, len(labels.SEQUENCE), n).astype(np.int8)
    vol = rng.integers(0, 60, (n, *VOLUME_SHAPE)).astype(np.uint8) + (seq * 40)[:, None, None, None].astype(np.uint8)
    arrays["volume"].write(vol).result()
    split = np.concatenate([np.full(k, labels.split_index(s), np.int8) for s, k in SPLITS.items()])
    for name, values in dict(
            sequence=seq, view=rng.integers(0, len(labels.VIEW), n).astype(np.int8),
            contrast=rng.integers(0, 2, n).astype(np.int8),
            coverage=rng.integers(0, 2, (n, len(labels.COVERAGE))).astype(np.int8),
            effective_spacing_mm=rng.uniform(1.0, 10.0, n).astype(np.float32),
            split=split).items():
        arrays[name].write(values).result()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(cwd root, workdir): 4 steps, checkpoints and validation at steps 2 and 4."""
    from radnet.train import pretrain

    root = tmp_path_factory.mktemp("frontdoor")
    dataset = str(root / "dataset")
    _write_dataset(dataset)
    config = pretrain_config.get_config(f"tiny,dataset={dataset}")
    config.train.num_steps = 4
    config.eval.every_steps = 2
    config.checkpoint.every_steps = 2
    config.checkpoint.keep_latest = 2
    # Running statistics = the last batch's, so that after 4 steps inference-mode batch norm
    # (README's example) passes gradients to every stage instead of leaving ReLUs dead.
    config.model.bn_momentum = 0.0
    workdir = str(root / README_WORKDIR)
    assert pretrain.run(config, workdir) in (0, None)
    assert ckpt_lib.steps(workdir) == [2, 4]
    return str(root), workdir


@pytest.fixture(scope="module")
def loaded(run):
    return pretrained.load(run[1])


def _equal_trees(a, b):
    fa, fb = ckpt_lib.flatten(jax.device_get(a)), ckpt_lib.flatten(jax.device_get(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def _volume(batch=2, seed=1):
    return np.random.default_rng(seed).integers(0, 255, (batch, *VOLUME_SHAPE)).astype(np.uint8)


# ----------------------------------------------------------------------------- load

def test_load_reads_the_best_checkpoint_or_the_step_asked(run, loaded):
    _, workdir = run
    best = ckpt_lib.best_step(workdir)
    assert loaded.step == best and loaded.source == workdir
    assert loaded.config.model_name == "radnet" and isinstance(loaded.model, models.RadNet)
    assert tuple(loaded.config.input.volume_shape) == VOLUME_SHAPE
    _, best_variables, _ = ckpt_lib.load_variables(workdir, best)
    _equal_trees(loaded.variables, best_variables)

    by_step = {s: pretrained.load(workdir, step=s) for s in (2, 4)}
    for s, p in by_step.items():
        assert p.step == s
        _equal_trees(p.variables, ckpt_lib.load_variables(workdir, s)[1])
    kernel = lambda p: np.asarray(p.variables["params"]["encoder"]["stem"]["conv"]["kernel"])
    assert not np.array_equal(kernel(by_step[2]), kernel(by_step[4]))   # two trained states

    # apply: uint8 volumes are scaled as in training; outputs are the model's.
    volume = _volume()
    out = loaded.apply(volume)
    direct = loaded.model.apply(loaded.variables, augment.to_unit_float(volume), train=False)
    assert set(out) == set(labels.HEADS)
    for head in labels.HEADS:
        assert np.isfinite(np.asarray(out[head])).all()
        np.testing.assert_array_equal(np.asarray(out[head]), np.asarray(direct[head]))


def test_load_mistakes_are_one_clear_line(run, tmp_path):
    _, workdir = run
    cases = []
    with pytest.raises(FileNotFoundError) as e:
        pretrained.load(str(tmp_path / "nonexistent"))
    cases.append(e)
    assert "nonexistent does not exist" in str(e.value) and "config.json" in str(e.value)

    weights = tmp_path / "encoder.safetensors"   # exported files load (tests/radnet/test_export.py)
    weights.write_bytes(b"\0" * 8)
    with pytest.raises(ValueError) as e:
        pretrained.load(str(weights))
    cases.append(e)
    assert "encoder.safetensors is not a readable safetensors file" in str(e.value)

    other = tmp_path / "weights.pt"
    other.write_bytes(b"\0")
    with pytest.raises(ValueError) as e:
        pretrained.load(str(other))
    cases.append(e)
    assert "(.pt)" in str(e.value)

    with pytest.raises(FileNotFoundError) as e:     # the checkpoints/ folder, not the run
        pretrained.load(os.path.join(workdir, "checkpoints"))
    cases.append(e)
    assert "not a radnet run directory" in str(e.value)

    with pytest.raises(ValueError) as e:
        pretrained.load(workdir, step=3)
    cases.append(e)
    assert "no checkpoint at step 3" in str(e.value) and "[2, 4]" in str(e.value)
    assert all("\n" not in str(c.value) for c in cases)


# ----------------------------------------------------------------------------- encoder

def test_encoder_is_the_runs_encoder(loaded):
    module, variables = loaded.encoder()
    assert isinstance(module, models.ResNet3D)
    assert (module.depth, module.width, module.variant, module.norm) == (10, 8, "radnet", "batch")
    assert module.frozen_stages == ()
    assert set(variables) == {"params", "batch_stats"}
    _equal_trees(variables, {c: loaded.variables[c]["encoder"] for c in variables})

    # The module alone computes what the encoder computes inside the run's model.
    x = augment.to_unit_float(_volume())
    embedding, features = module.apply(variables, x, train=False)
    _, state = loaded.model.apply(loaded.variables, x, train=False, capture_intermediates=True,
                                  mutable=["intermediates"])
    inside, _ = state["intermediates"]["encoder"]["__call__"][0]
    assert embedding.shape == (2, models.resnet3d.output_channels(10, 8))
    np.testing.assert_array_equal(np.asarray(embedding), np.asarray(inside))
    assert set(features) == set(models.STAGES)

    frozen, _ = loaded.encoder(frozen_stages=["stem", "block1"])
    assert frozen.frozen_stages == ("stem", "block1") and frozen.depth == 10
    with pytest.raises(TypeError, match="unknown field"):
        loaded.encoder(heads=3)


# ----------------------------------------------------------------------------- merge

class Backbone(nn.Module):
    encoder: nn.Module

    @nn.compact
    def __call__(self, x, train=False):
        embedding, _ = self.encoder(x, train)
        return nn.Dense(4, name="neck")(embedding)


class Nested(nn.Module):
    """A user model with the encoder deeper down: params/backbone/encoder/…"""
    backbone: nn.Module

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(3, name="head")(self.backbone(x, train))


@pytest.fixture(scope="module")
def nested_init(loaded):
    """Variables of a Nested model around the run's encoder: the model's own tree (names and
    shapes from ``jax.eval_shape`` of its init), random values (no compile needed)."""
    model = Nested(Backbone(loaded.encoder()[0]))
    shapes = jax.eval_shape(model.init, jax.random.key(7), jnp.zeros((1, *VOLUME_SHAPE, 1)))
    rng = np.random.default_rng(7)
    return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), shapes)


def test_merge_encoder_at_a_nested_path(loaded, nested_init):
    _, encoder_variables = loaded.encoder()
    fresh = nested_init
    before = jax.tree.map(np.array, fresh)
    merged = pretrained.merge_encoder(fresh, loaded, at="backbone/encoder")

    _equal_trees(fresh, before)                       # the input is left alone
    for c in ("params", "batch_stats"):
        _equal_trees(merged[c]["backbone"]["encoder"], encoder_variables[c])
    _equal_trees(merged["params"]["head"], fresh["params"]["head"])
    _equal_trees(merged["params"]["backbone"]["neck"], fresh["params"]["backbone"]["neck"])
    assert not np.array_equal(np.asarray(fresh["params"]["backbone"]["encoder"]["stem"]["conv"]["kernel"]),
                              np.asarray(merged["params"]["backbone"]["encoder"]["stem"]["conv"]["kernel"]))
    # Encoder variables given directly merge the same way.
    _equal_trees(pretrained.merge_encoder(fresh, encoder_variables, at="backbone/encoder"), merged)


def test_merge_encoder_names_every_problem_in_one_error(loaded, nested_init):
    variables = nested_init
    flat = ckpt_lib.flatten(variables["params"])
    enc = ("backbone", "encoder")
    del flat[(*enc, "block4", "post_norm", "scale")]                       # pretrained has it
    flat[(*enc, "block2", "unit1", "conv1", "kernel")] = np.zeros((1, 1, 1, 8, 16), np.float32)
    flat[(*enc, "block5", "conv", "kernel")] = np.zeros((3,), np.float32)  # the checkpoint lacks it
    variables = {**variables, "params": traverse_util.unflatten_dict(flat)}
    with pytest.raises(ckpt_lib.MismatchError) as e:
        pretrained.merge_encoder(variables, loaded, at="backbone/encoder")
    message = str(e.value)
    assert "3 problem(s)" in message and f"step {loaded.step}" in message
    assert "missing in pretrained encoder: params/backbone/encoder/block5/conv/kernel (3,)" in message
    assert "unexpected in pretrained encoder: params/backbone/encoder/block4/post_norm/scale (64,)" in message
    assert ("shape mismatch: params/backbone/encoder/block2/unit1/conv1/kernel model (1, 1, 1, 8, 16) "
            "vs pretrained encoder (3, 3, 3, 8, 16)") in message

    with pytest.raises(ckpt_lib.MismatchError, match=r"no params/encoder .* holds \['backbone', 'head'\]"):
        pretrained.merge_encoder(variables, loaded)                        # wrong path


# ----------------------------------------------------------------------------- freeze

def test_freeze_keeps_stages_bit_exact(loaded, nested_init):
    variables = pretrained.merge_encoder(nested_init, loaded, at="backbone/encoder")
    params = variables["params"]
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
    tx = pretrained.freeze(["stem", "block1"], optax.adam(1e-2), at="backbone/encoder")
    state = tx.init(params)
    new = params
    for _ in range(2):
        updates, state = tx.update(grads, state, new)
        new = optax.apply_updates(new, updates)
    enc_old, enc_new = params["backbone"]["encoder"], new["backbone"]["encoder"]
    for stage in ("stem", "block1"):
        _equal_trees(enc_new[stage], enc_old[stage])
    for stage in ("block2", "block3", "block4"):
        assert not np.array_equal(np.asarray(enc_new[stage]["unit1"]["conv1"]["kernel"]),
                                  np.asarray(enc_old[stage]["unit1"]["conv1"]["kernel"]))
    assert not np.array_equal(np.asarray(new["head"]["kernel"]), np.asarray(params["head"]["kernel"]))

    # "all", and tx=None to end a chain.
    tx = optax.chain(optax.sgd(0.1), pretrained.freeze("all", at="backbone/encoder"))
    updates, _ = tx.update(grads, tx.init(params), params)
    after = optax.apply_updates(params, updates)
    _equal_trees(after["backbone"]["encoder"], params["backbone"]["encoder"])
    assert not np.array_equal(np.asarray(after["head"]["kernel"]), np.asarray(params["head"]["kernel"]))

    with pytest.raises(ValueError, match=r"cannot freeze \['block5'\]: encoder stages are"):
        pretrained.freeze(["block5"])
    with pytest.raises(ValueError, match="the params have no encoder"):
        pretrained.freeze("stem").init(params)                     # the encoder is elsewhere


def test_batch_stats_of_frozen_stages_follow_the_modules_frozen_stages(loaded):
    """What docs/pretrained.md says: freeze() fixes parameters; only ResNet3D(frozen_stages)
    keeps a stage's batch statistics in train mode."""
    x = augment.to_unit_float(_volume(seed=3))
    for frozen_stages in ((), ("stem",)):
        module, variables = loaded.encoder(frozen_stages=frozen_stages)
        _, new = module.apply(variables, x, train=True, mutable=["batch_stats"])
        stem_same = np.array_equal(np.asarray(new["batch_stats"]["stem"]["norm"]["mean"]),
                                   np.asarray(variables["batch_stats"]["stem"]["norm"]["mean"]))
        assert stem_same == ("stem" in frozen_stages)
        assert not np.array_equal(np.asarray(new["batch_stats"]["block1"]["unit1"]["norm1"]["mean"]),
                                  np.asarray(variables["batch_stats"]["block1"]["unit1"]["norm1"]["mean"]))


# ----------------------------------------------------------------------------- README

def _readme_example() -> str:
    text = open(README, encoding="utf-8").read()
    section = text.split("## Use radnet in your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README's 'Use radnet in your own model' has no ```python block"
    return blocks[0]


def test_readme_example_runs_as_printed(run, loaded, monkeypatch):
    code = _readme_example()
    assert len(code.strip().splitlines()) <= 12
    assert f'"{README_WORKDIR}"' in code
    root, _ = run
    monkeypatch.chdir(root)                            # where runs/demo/pretrain exists
    namespace = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102  (the README, verbatim)

    p, model, x = namespace["p"], namespace["model"], namespace["x"]
    assert p.step == loaded.step
    before = namespace["variables"]["params"]          # merged, before the two steps
    after = namespace["params"]
    # merge: the whole pretrained encoder (params and batch statistics) is in the model.
    _equal_trees({c: namespace["variables"][c]["encoder"] for c in ("params", "batch_stats")},
                 loaded.encoder()[1])
    # freeze: stem and block1 bit-identical to the checkpoint after two steps ...
    for stage in ("stem", "block1"):
        _equal_trees(after["encoder"][stage], loaded.variables["params"]["encoder"][stage])
    # ... though their gradients are not zero: freeze() held them ...
    grads = namespace["grad"](before)["encoder"]         # the example's compiled gradient
    for stage in ("stem", "block1"):
        assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads[stage])), stage
    # ... while the rest of the encoder and the new head moved.
    for stage in ("block2", "block3", "block4"):
        assert not np.array_equal(np.asarray(after["encoder"][stage]["unit1"]["conv1"]["kernel"]),
                                  np.asarray(before["encoder"][stage]["unit1"]["conv1"]["kernel"]))
    head_init = model.init(jax.random.key(0), x)["params"]["head"]
    _equal_trees(before["head"], head_init)
    assert not np.array_equal(np.asarray(after["head"]["kernel"]), np.asarray(head_init["kernel"]))
    loss = jax.jit(namespace["loss"])                    # compiled once: eager would dispatch op by op
    loss_after = np.asarray(loss(after))
    assert np.isfinite(loss_after)
    assert float(loss_after) < float(loss(before))


# ----------------------------------------------------------------------------- predict, embed

def test_predict_and_embed_are_the_models_outputs(loaded):
    volume = _volume(batch=3)
    out = loaded.predict(volume)
    logits = loaded.apply(volume)
    assert set(out) == set(labels.HEADS)
    for head in labels.CLASS_HEADS:
        assert out[head].shape == (3, labels.HEAD_SIZES[head])
        np.testing.assert_allclose(out[head], jax.nn.softmax(logits[head]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["coverage"], jax.nn.sigmoid(logits["coverage"]), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(out["slice_spacing"], logits["slice_spacing"], rtol=1e-5)
    encoder, variables = loaded.encoder()
    pooled = encoder.apply(variables, augment.to_unit_float(volume), train=False)[0]
    embedding = loaded.embed(volume)
    assert embedding.dtype == np.float32 and embedding.shape == (3, pooled.shape[1])
    # jitted against op-by-op: float32 rounding, relative to the embedding's scale
    np.testing.assert_allclose(embedding, pooled, atol=1e-5 * float(np.abs(pooled).max()))
    with pytest.raises(ValueError, match="expected uint8 volumes"):
        loaded.predict(volume.astype(np.float32))


def test_a_run_without_a_preprocessing_record_says_what_it_assumes(loaded, caplog):
    """This module's run trains on a dataset that no build made (no build attributes): the
    builder's defaults at the run's volume shape, and a warning saying so."""
    assert "preprocessing" not in loaded.config.input
    with caplog.at_level("WARNING"):
        options = pretrained.volume_options(loaded.config, "old-run")
    assert options == preprocess.VolumeOptions(volume_shape=VOLUME_SHAPE)
    assert any("old-run records no preprocessing" in r.getMessage() for r in caplog.records)


def test_the_volume_spec_travels_in_an_exported_file(run, tmp_path):
    from radnet import export

    _, workdir = run
    spec = {"volume_shape": list(VOLUME_SHAPE), "normalise": "window", "window_level": 50.0,
            "window_width": 350.0, "min_slices": 8}
    copy = tmp_path / "run"
    import shutil
    shutil.copytree(workdir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["input"]["preprocessing"] = spec
    (copy / "config.json").write_text(json.dumps(config))
    expected = preprocess.VolumeOptions(volume_shape=VOLUME_SHAPE, normalise="window",
                                        window_level=50.0, window_width=350.0, min_slices=8)
    assert pretrained.load(str(copy)).volume_options == expected
    out = str(tmp_path / "r.safetensors")
    export.export(str(copy), out)
    from_file = pretrained.load(out)
    assert from_file.volume_options == expected
    volume = _volume()
    np.testing.assert_array_equal(from_file.embed(volume), pretrained.load(str(copy)).embed(volume))
