"""radnet.models numerics: 3D conv conventions against NumPy, batch norm modes, gradients.

The NumPy reference is written from the definitions (cross-correlation over a
zero-padded volume, kernel ``[kD, kH, kW, C_in, C_out]``, TensorFlow SAME or
PyTorch symmetric padding), not from Flax or XLA.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radnet import models
from radnet.models import resnet3d

EPS = 1e-5  # batch-norm epsilon of radnet.models.common


def key(seed):
    # "rbg" keys keep jitted init fast on CPU (threefry compiles slowly there).
    return jax.random.key(seed, impl="rbg")


# ---------------------------------------------------------------- NumPy reference


def same_padding(n, k, s, d=1):
    """TensorFlow SAME: output ceil(n/s); the odd extra pad goes after."""
    out = -(-n // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
    return (total // 2, total - total // 2)


def np_conv3d(x, w, strides=(1, 1, 1), padding="same", dilation=(1, 1, 1)):
    """x [B, D, H, W, Ci], w [kD, kH, kW, Ci, Co] → [B, D', H', W', Co] (float64)."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    kernel = w.shape[:3]
    if padding == "same":
        pads = [same_padding(n, k, s, d) for n, k, s, d in zip(x.shape[1:4], kernel, strides, dilation)]
    else:  # symmetric, PyTorch
        pads = [(d * (k // 2),) * 2 for k, d in zip(kernel, dilation)]
    xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    out_shape = [(xp.shape[1 + i] - (kernel[i] - 1) * dilation[i] - 1) // strides[i] + 1
                 for i in range(3)]
    out = np.zeros((x.shape[0], *out_shape, w.shape[-1]))
    for a in range(kernel[0]):
        for b in range(kernel[1]):
            for c in range(kernel[2]):
                oa, ob, oc = a * dilation[0], b * dilation[1], c * dilation[2]
                patch = xp[:,
                           oa:oa + strides[0] * (out_shape[0] - 1) + 1:strides[0],
                           ob:ob + strides[1] * (out_shape[1] - 1) + 1:strides[1],
                           oc:oc + strides[2] * (out_shape[2] - 1) + 1:strides[2]]
                out += np.einsum("bdhwi,io->bdhwo", patch, w[a, b, c])
    return out


def np_bn_eval(x, params, stats):
    scale, bias = np.asarray(params["scale"]), np.asarray(params["bias"])
    mean, var = np.asarray(stats["mean"]), np.asarray(stats["var"])
    return (x - mean) / np.sqrt(var + EPS) * scale + bias


def relu(x):
    return np.maximum(x, 0)


def randomise(variables, seed):
    """Replaces every parameter and statistic with random values (var > 0), so
    that a wrong layout, norm or padding cannot pass by symmetry."""
    rng = np.random.default_rng(seed)
    out = {}
    for collection, tree in variables.items():
        def fill(path, leaf):
            name = jax.tree_util.keystr(path)
            if "var" in name:
                return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), jnp.float32)
            if "scale" in name:
                return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
            return jnp.asarray(rng.normal(0, 0.5, leaf.shape), jnp.float32)
        out[collection] = jax.tree_util.tree_map_with_path(fill, tree)
    return out


def init_random(module, x, seed, **kwargs):
    variables = jax.eval_shape(lambda k: module.init(k, x, train=False, **kwargs), key(0))
    return randomise(variables, seed)


def he_variables(module, x, seed):
    """Variables of the module's shapes with He-scaled random kernels, unit norm
    scales, zero biases and fresh statistics (mean 0, var 1).

    Used instead of a jitted ``module.init`` because compiling every
    initialiser costs far more CPU than the test itself (≈15 s for ResNet50).
    """
    shapes = jax.eval_shape(lambda k: module.init(k, x, train=False), key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            fan_in = math.prod(leaf.shape[:-1])
            return jnp.asarray(rng.normal(0, math.sqrt(2 / fan_in), leaf.shape), jnp.float32)
        if name.endswith("['scale']") or name.endswith("['var']"):
            return jnp.ones(leaf.shape, jnp.float32)
        return jnp.zeros(leaf.shape, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


# ---------------------------------------------------------------- conv conventions


@pytest.mark.parametrize("variant", ["radnet", "medicalnet"])
def test_stem_matches_numpy(variant):
    """Radnet stem (3,7,7)/(1,2,2) with SAME padding; medicalnet 7³/2 symmetric.

    H = 10 (even) makes SAME pad asymmetrically (2, 3) while PyTorch pads (3, 3),
    so either variant with the other's convention fails this test.
    """
    x = np.random.default_rng(0).normal(size=(2, 5, 10, 9, 1)).astype(np.float32)
    stem = resnet3d.Stem(variant=variant, width=3)
    variables = init_random(stem, x, seed=1)
    got = np.asarray(stem.apply(variables, x, train=False))

    p, s = variables["params"], variables["batch_stats"]
    if variant == "radnet":
        y = np_conv3d(x, p["conv"]["kernel"], strides=(1, 2, 2), padding="same")
        assert got.shape == (2, 5, 5, 5, 3)
    else:
        y = np_conv3d(x, p["conv"]["kernel"], strides=(2, 2, 2), padding="symmetric")
        assert got.shape == (2, 3, 5, 5, 3)
    assert p["conv"]["kernel"].shape == ((3, 7, 7, 1, 3) if variant == "radnet" else (7, 7, 7, 1, 3))
    expected = relu(np_bn_eval(y, p["norm"], s["norm"]))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_preact_bottleneck_unit_matches_numpy():
    """Radnet unit: pre-activation bottleneck with a projection shortcut (3 → 8 channels)."""
    x = np.random.default_rng(2).normal(size=(2, 4, 5, 6, 3)).astype(np.float32)
    unit = resnet3d.BottleneckUnit(features=2, preact=True, padding_mode="same")
    variables = init_random(unit, x, seed=3)
    got = np.asarray(unit.apply(variables, x, train=False))

    p, s = variables["params"], variables["batch_stats"]
    pre = relu(np_bn_eval(x, p["norm1"], s["norm1"]))
    shortcut = np_conv3d(pre, p["shortcut_conv"]["kernel"])
    y = np_conv3d(pre, p["conv1"]["kernel"])
    y = np_conv3d(relu(np_bn_eval(y, p["norm2"], s["norm2"])), p["conv2"]["kernel"])
    y = np_conv3d(relu(np_bn_eval(y, p["norm3"], s["norm3"])), p["conv3"]["kernel"])
    assert got.shape == (2, 4, 5, 6, 8)
    np.testing.assert_allclose(got, shortcut + y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strides,dilation", [(2, 1), (1, 2)])
def test_postact_basic_unit_matches_numpy(strides, dilation):
    """Medicalnet unit: post-activation basic unit, strided (projection with norm) or dilated."""
    x = np.random.default_rng(4).normal(size=(2, 5, 6, 7, 3)).astype(np.float32)
    unit = resnet3d.BasicUnit(features=4, strides=strides, dilation=dilation, preact=False,
                              padding_mode="symmetric")
    variables = init_random(unit, x, seed=5)
    got = np.asarray(unit.apply(variables, x, train=False))

    p, s = variables["params"], variables["batch_stats"]
    st, dl = (strides,) * 3, (dilation,) * 3
    y = np_conv3d(x, p["conv1"]["kernel"], strides=st, padding="symmetric", dilation=dl)
    y = relu(np_bn_eval(y, p["norm1"], s["norm1"]))
    y = np_bn_eval(np_conv3d(y, p["conv2"]["kernel"], padding="symmetric", dilation=dl),
                   p["norm2"], s["norm2"])
    shortcut = np_bn_eval(np_conv3d(x, p["shortcut_conv"]["kernel"], strides=st,
                                    padding="symmetric"), p["shortcut_norm"], s["shortcut_norm"])
    expected = relu(y + shortcut)
    assert got.shape == expected.shape == ((2, 3, 3, 4, 4) if strides == 2 else (2, 5, 6, 7, 4))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- batch norm modes


def test_batch_norm_train_uses_batch_statistics_and_updates_running_averages():
    x = np.random.default_rng(6).normal(1.0, 2.0, size=(3, 4, 6, 6, 1)).astype(np.float32)
    stem = resnet3d.Stem(variant="radnet", width=3)
    variables = jax.jit(lambda k, x: stem.init(k, x, train=False))(key(7), x)
    assert np.all(np.asarray(variables["batch_stats"]["norm"]["mean"]) == 0)

    out, updates = stem.apply(variables, x, train=True, mutable=["batch_stats"])
    conv = np_conv3d(x, variables["params"]["conv"]["kernel"], strides=(1, 2, 2))
    batch_mean = conv.mean(axis=(0, 1, 2, 3))
    batch_var = conv.var(axis=(0, 1, 2, 3))
    # Running averages: momentum 0.9 from the initial (0, 1).
    np.testing.assert_allclose(updates["batch_stats"]["norm"]["mean"], 0.1 * batch_mean,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["norm"]["var"], 0.9 + 0.1 * batch_var,
                               rtol=1e-4, atol=1e-6)
    p = variables["params"]["norm"]
    expected = relu((conv - batch_mean) / np.sqrt(batch_var + EPS) * np.asarray(p["scale"])
                    + np.asarray(p["bias"]))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

    # Eval: running averages, untouched by the call, and no batch coupling.
    eval_out, eval_state = stem.apply(variables, x, train=False, mutable=["batch_stats"])
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(np.array_equal(a, b)), eval_state["batch_stats"],
        variables["batch_stats"]))
    expected_eval = relu(np_bn_eval(conv, p, variables["batch_stats"]["norm"]))
    np.testing.assert_allclose(eval_out, expected_eval, rtol=1e-4, atol=1e-4)


def _sample0(model, variables, batch, train):
    out = model.apply(variables, batch, train=train, mutable=["batch_stats"])[0]
    return jax.tree_util.tree_map(lambda a: a[0], out)


def test_eval_is_per_sample_and_train_couples_the_batch():
    model = models.get("radnet")(depth=10, width=4, hidden=8)
    rng = np.random.default_rng(8)
    a = rng.normal(size=(2, 16, 32, 32, 1)).astype(np.float32)
    b = a.copy()
    b[1] = rng.normal(size=b.shape[1:])  # same first volume, different second
    variables = he_variables(model, a, seed=9)
    run = jax.jit(_sample0, static_argnums=(0, 3))
    eval_a, eval_b = run(model, variables, a, False), run(model, variables, b, False)
    for head in eval_a:
        np.testing.assert_allclose(eval_a[head], eval_b[head], rtol=1e-5, atol=1e-6)
    train_a, train_b = run(model, variables, a, True), run(model, variables, b, True)
    assert any(not np.allclose(train_a[h], train_b[h], atol=1e-6) for h in train_a)


def test_frozen_stages_keep_inference_batch_norm_inside_a_training_vnet():
    """frozen_stages: the encoder's norms use (and keep) running averages while
    the decoder's norms train on batch statistics."""
    rng = np.random.default_rng(10)
    x = rng.normal(size=(2, 16, 32, 32, 1)).astype(np.float32)
    kwargs = dict(depth=10, width=4, decoder_width=4, num_classes=2)
    frozen = models.get("vnet")(frozen_stages=models.STAGES, **kwargs)
    partly = models.get("vnet")(frozen_stages=("stem", "block1"), **kwargs)
    variables = he_variables(frozen, x, seed=11)

    def train_stats(model):
        return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1])(
            variables, x)["batch_stats"]

    def changed(new, old):
        return {k: not all(np.array_equal(a, b) for a, b in zip(
            jax.tree_util.tree_leaves(new[k]), jax.tree_util.tree_leaves(old[k]))) for k in old}

    old = variables["batch_stats"]
    new = train_stats(frozen)
    assert not any(changed(new["encoder"], old["encoder"]).values())
    assert all(changed(new["decoder"], old["decoder"]).values())
    new = train_stats(partly)
    assert changed(new["encoder"], old["encoder"]) == {
        "stem": False, "block1": False, "block2": True, "block3": True, "block4": True}

    # The frozen encoder treats each volume on its own even in training mode.
    @jax.jit
    def encoder_block4(v, x):
        _, state = frozen.apply(v, x, train=True, capture_intermediates=True,
                                mutable=["intermediates", "batch_stats"])
        return state["intermediates"]["encoder"]["__call__"][0][1]["block4"][0]
    y = x.copy()
    y[1] = rng.normal(size=y.shape[1:])
    np.testing.assert_allclose(encoder_block4(variables, x), encoder_block4(variables, y),
                               rtol=1e-5, atol=1e-6)


def test_pretrained_encoder_drops_into_vnet_by_name():
    """The classifier's encoder variables, placed under the VNet's ``encoder``,
    give the VNet exactly the encoder features the classifier computes."""
    x = np.random.default_rng(1).normal(size=(2, 16, 32, 32, 1)).astype(np.float32)
    common = dict(depth=10, width=4)
    classifier = models.get("radnet")(hidden=8, **common)
    segmenter = models.get("vnet")(num_classes=2, decoder_width=4, **common)
    pretrained = randomise(he_variables(classifier, x, seed=2), seed=2)
    fresh = he_variables(segmenter, x, seed=3)
    merged = {c: {**fresh[c], "encoder": pretrained[c]["encoder"]} for c in fresh}

    @jax.jit
    def encoder_features(variables, x):
        _, state = segmenter.apply(variables, x, train=False, capture_intermediates=True,
                                   mutable=["intermediates"])
        return state["intermediates"]["encoder"]["__call__"][0]

    standalone = models.get("resnet")(**common)
    expected = jax.jit(lambda v, x: standalone.apply(v, x, train=False))(
        {c: pretrained[c]["encoder"] for c in pretrained}, x)
    got = encoder_features(merged, x)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-6)
    for stage in models.STAGES:
        np.testing.assert_allclose(got[1][stage], expected[1][stage], rtol=1e-5, atol=1e-6)
    before = encoder_features(fresh, x)
    assert not np.allclose(before[1]["block4"], got[1]["block4"])


# ---------------------------------------------------------------- gradients


# Between them: both unit kinds (bottleneck pre-activation, basic post-activation),
# both variants, both norms, the heads and the decoder.
@pytest.mark.parametrize("name,kwargs,shape", [
    ("radnet", dict(depth=50, variant="radnet", norm="batch", hidden=8), (2, 16, 32, 32, 1)),
    ("vnet", dict(depth=10, variant="medicalnet", dilated=True, norm="group", decoder_width=4,
                  num_classes=2), (1, 8, 16, 16, 1)),
])
def test_gradients_reach_every_parameter(name, kwargs, shape):
    model = models.get(name)(width=4, **kwargs)
    rng = np.random.default_rng(12)
    x = rng.normal(size=shape).astype(np.float32)
    variables = he_variables(model, x, seed=13)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    @jax.jit
    def grads(params, x):
        def loss(params):
            out, _ = model.apply({"params": params, **state}, x, train=True,
                                 mutable=["batch_stats"])
            leaves = jax.tree_util.tree_leaves(out)
            # Fixed random weights so no output's gradient cancels by symmetry.
            return sum(jnp.sum(leaf * jnp.cos(jnp.arange(leaf.size).reshape(leaf.shape)))
                       for leaf in leaves)
        return jax.grad(loss)(params)

    g = grads(params, x)
    flat = jax.tree_util.tree_flatten_with_path(g)[0]
    assert len(flat) == len(jax.tree_util.tree_leaves(params))
    dead = [jax.tree_util.keystr(p) for p, leaf in flat
            if not np.all(np.isfinite(leaf)) or not np.any(np.asarray(leaf) != 0)]
    assert not dead, f"parameters without gradient: {dead}"
    assert math.isfinite(sum(float(np.sum(np.abs(leaf))) for _, leaf in flat))
