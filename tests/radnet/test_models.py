"""radnet.models: shapes, parameter counts, registry, errors, encoder paths.

Shape and count checks trace with ``jax.eval_shape`` (no compilation), so every
depth and variant is covered in a few seconds on CPU.
"""

import math

import jax
import jax.numpy as jnp
import pytest

from configs import pretrain
from radnet import labels, models
from radnet.models import resnet3d

TINY = (2, 16, 32, 32, 1)  # [B, D, H, W, C]


def _init_shapes(model, shape, **kwargs):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(lambda k, x: model.init(k, x, train=False, **kwargs),
                          jax.random.key(0), x)


def _apply_shapes(model, shape, train=False):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)

    def run(k, x):
        variables = model.init(k, x, train=False)
        if train:
            return model.apply(variables, x, train=True, mutable=["batch_stats"])[0]
        return model.apply(variables, x, train=False)

    return jax.eval_shape(run, jax.random.key(0), x)


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def _paths(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): leaf.shape for path, leaf in flat}


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("variant", ["radnet", "medicalnet"])
@pytest.mark.parametrize("depth", [10, 18, 34, 50, 101])
def test_encoder_shapes_every_depth_and_variant(depth, variant):
    width = 4
    encoder = models.get("resnet")(depth=depth, variant=variant, width=width)
    embedding, features = _apply_shapes(encoder, TINY, train=True)
    expansion = 4 if depth >= 50 else 1
    assert embedding.shape == (2, 8 * width * expansion)
    assert embedding.dtype == jnp.float32
    strides = models.stage_strides(variant)
    channels = {"stem": width, "block1": width * expansion, "block2": 2 * width * expansion,
                "block3": 4 * width * expansion, "block4": 8 * width * expansion}
    assert set(features) == set(models.STAGES)
    for stage, feature in features.items():
        spatial = tuple(max(n // s, 1) for n, s in zip(TINY[1:4], strides[stage]))
        assert feature.shape == (2, *spatial, channels[stage]), stage


def test_encoder_shapes_at_paper_size():
    """48×192×192 → 3×6×6 after block4 in the radnet variant (stride 16, 32, 32)."""
    encoder = models.get("resnet")(depth=10, width=4)
    _, features = _apply_shapes(encoder, (1, 48, 192, 192, 1))
    assert features["stem"].shape[1:4] == (48, 96, 96)
    assert features["block4"].shape[1:4] == (3, 6, 6)


def test_medicalnet_dilated_keeps_stride_8():
    encoder = models.get("resnet")(depth=18, variant="medicalnet", dilated=True, width=4)
    _, features = _apply_shapes(encoder, (1, 16, 32, 32, 1))
    assert features["block2"].shape[1:4] == (2, 4, 4)
    assert features["block3"].shape[1:4] == (2, 4, 4)
    assert features["block4"].shape[1:4] == (2, 4, 4)


@pytest.mark.parametrize("variant", ["radnet", "medicalnet"])
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_radnet_heads_shapes(variant, norm):
    model = models.get("radnet")(depth=18, variant=variant, norm=norm, width=4, hidden=16)
    out = _apply_shapes(model, TINY, train=True)
    expected = {"sequence": (2, 5), "view": (2, 3), "contrast": (2, 2), "coverage": (2, 9),
                "slice_spacing": (2,)}
    assert {k: v.shape for k, v in out.items()} == expected
    assert set(out) == set(labels.HEADS)
    assert all(v.dtype == jnp.float32 for v in out.values())


def test_intensity_histogram_against_a_per_voxel_count():
    """The heads' histogram input (radnet.models.heads.intensity_histogram) against a plain
    NumPy count: each voxel gives 1 − d to its nearest centre and d to the next one (d its
    distance in bin widths), nothing where it sits beyond the outer centres."""
    import numpy as np

    from radnet.models import heads

    bins = 8
    x = np.random.default_rng(0).random((2, 4, 5, 6, 1)).astype(np.float32)
    x[1, :2] = 0.0  # many voxels in the outermost half-bin
    expected = np.zeros((2, bins))
    pos = x[..., 0] * bins - 0.5  # position in bin widths from the first centre
    for b in range(2):
        for p in pos[b].ravel():
            lo = int(np.floor(p))
            for k, w in ((lo, 1.0 - (p - lo)), (lo + 1, p - lo)):
                if 0 <= k < bins:
                    expected[b, k] += w
    expected /= pos[0].size
    got = np.asarray(heads.intensity_histogram(jnp.asarray(x), bins))
    np.testing.assert_allclose(got, np.log(expected + 1e-3) / (np.log(1e3) / 2) + 1.0, atol=1e-5)
    assert got[1, 0] > got[0, 0]
    grad = jax.grad(lambda v: heads.intensity_histogram(v, bins).sum())(jnp.asarray(x))
    assert not np.any(np.asarray(grad)), "no gradient flows to the input"


def test_intensity_bins_widen_the_hidden_layer_only():
    plain = _init_shapes(models.get("radnet")(depth=10, width=4, hidden=16), TINY)
    with_hist = _init_shapes(
        models.get("radnet")(depth=10, width=4, hidden=16, intensity_bins=32), TINY)
    plain, with_hist = _paths(plain), _paths(with_hist)
    key = "['params']['heads']['hidden']['kernel']"
    assert with_hist[key] == (plain[key][0] + 32, 16)
    assert {k: v for k, v in with_hist.items() if k != key} == \
        {k: v for k, v in plain.items() if k != key}


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    model = models.get("radnet")(depth=10, width=4, hidden=8, dtype="bfloat16")
    variables = _init_shapes(model, TINY)
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    out = _apply_shapes(model, TINY, train=True)
    assert all(v.dtype == jnp.float32 for v in out.values())
    _, features = _apply_shapes(models.get("resnet")(depth=10, width=4, dtype="bfloat16"), TINY)
    assert features["block2"].dtype == jnp.bfloat16


@pytest.mark.parametrize("variant,dilated,shape", [
    ("radnet", False, (2, 16, 32, 32, 1)),       # total stride (16, 32, 32)
    ("radnet", False, (1, 32, 64, 32, 1)),
    ("medicalnet", False, (1, 32, 32, 64, 1)),   # total stride 32
    ("medicalnet", True, (1, 8, 16, 24, 1)),     # total stride 8
])
def test_vnet_returns_per_voxel_logits(variant, dilated, shape):
    model = models.get("vnet")(depth=10, variant=variant, dilated=dilated, width=4,
                               decoder_width=4, num_classes=3)
    assert _apply_shapes(model, shape, train=True).shape == (*shape[:4], 3)
    assert _apply_shapes(model, shape).dtype == jnp.float32


@pytest.mark.parametrize("variant,dilated,shape,axis", [
    ("radnet", False, (1, 16, 32, 48, 1), "W=48 is not a multiple of 32"),
    ("radnet", False, (1, 24, 32, 32, 1), "D=24 is not a multiple of 16"),
    ("medicalnet", False, (1, 16, 32, 32, 1), "D=16 is not a multiple of 32"),
    ("medicalnet", True, (1, 12, 16, 16, 1), "D=12 is not a multiple of 8"),
])
def test_vnet_clear_error_when_not_multiple_of_total_stride(variant, dilated, shape, axis):
    model = models.get("vnet")(depth=10, variant=variant, dilated=dilated, width=4,
                               decoder_width=4)
    with pytest.raises(ValueError, match="total stride") as err:
        _init_shapes(model, shape)
    assert axis in str(err.value)
    assert "Pad or crop" in str(err.value)


# ---------------------------------------------------------------- config and registry


def test_get_builds_from_the_pretrain_config():
    config = pretrain.get_config("tiny")
    model = models.get(config.model_name)(**config.model)
    assert isinstance(model, models.RadNet)
    out = _apply_shapes(model, TINY)
    assert out["coverage"].shape == (2, len(labels.COVERAGE))


def test_get_unknown_model_names_the_known_ones():
    with pytest.raises(KeyError, match="radnet"):
        models.get("unet")
    assert models.get("resnet") is models.ResNet3D
    assert models.get("vnet") is models.VNet


@pytest.mark.parametrize("kwargs,message", [
    (dict(depth=42), "unsupported ResNet depth 42"),
    (dict(variant="densenet"), "unknown ResNet variant"),
    (dict(norm="layer"), "unknown norm"),
    (dict(dilated=True), "dilated=True exists only"),
    (dict(frozen_stages=("block5",)), "not encoder stages"),
    (dict(dtype="int8"), "unknown compute dtype"),
])
def test_bad_config_is_a_clear_error(kwargs, message):
    model = models.get("radnet")(**{"depth": 10, "width": 4, "hidden": 8, **kwargs})
    with pytest.raises(ValueError, match=message):
        _init_shapes(model, TINY)


def test_bad_input_rank_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\[B, D, H, W, C\]"):
        _init_shapes(models.get("resnet")(depth=10, width=4), (16, 32, 32, 1))


# ---------------------------------------------------------------- parameter counts


def test_parameter_count_resnet50_radnet_variant_by_hand():
    """3D-RADNet ResNet50, width 64, 1 input channel, pre-activation units.

    Convs have no bias; every norm has scale + bias (2·C). A pre-activation
    bottleneck unit c_in → m → 4m holds norm1 2·c_in, conv1 c_in·m,
    norm2 2m, conv2 27m², norm3 2m, conv3 4m², plus a 1×1×1 projection
    c_in·4m (no norm) in the first unit of a stage, where channels change.
    """
    stem = 3 * 7 * 7 * 1 * 64 + 2 * 64                                      # 9_536
    # block1, m = 64: unit1 (c_in 64, projection 64→256) + 2 units (c_in 256)
    block1 = (2 * 64 + 64 * 64 + 2 * 64 + 27 * 64 * 64 + 2 * 64 + 4 * 64 * 64 + 64 * 256
              + 2 * (2 * 256 + 256 * 64 + 2 * 64 + 27 * 64 * 64 + 2 * 64 + 4 * 64 * 64))
    assert block1 == 147_840 + 2 * 144_128 == 436_096
    # block2, m = 128: unit1 (c_in 256, projection 256→512) + 3 units (c_in 512)
    block2 = (2 * 256 + 256 * 128 + 2 * 128 + 27 * 128 ** 2 + 2 * 128 + 4 * 128 ** 2 + 256 * 512
              + 3 * (2 * 512 + 512 * 128 + 2 * 128 + 27 * 128 ** 2 + 2 * 128 + 4 * 128 ** 2))
    assert block2 == 672_768 + 3 * 574_976 == 2_397_696
    # block3, m = 256: unit1 (c_in 512, projection 512→1024) + 5 units (c_in 1024)
    block3 = (2 * 512 + 512 * 256 + 2 * 256 + 27 * 256 ** 2 + 2 * 256 + 4 * 256 ** 2
              + 512 * 1024
              + 5 * (2 * 1024 + 1024 * 256 + 2 * 256 + 27 * 256 ** 2 + 2 * 256 + 4 * 256 ** 2))
    assert block3 == 2_689_024 + 5 * 2_296_832 == 14_173_184
    # block4, m = 512: unit1 (c_in 1024, projection 1024→2048) + 2 units (c_in 2048)
    # + the final norm (post_norm) over 2048 channels
    block4 = (2 * 1024 + 1024 * 512 + 2 * 512 + 27 * 512 ** 2 + 2 * 512 + 4 * 512 ** 2
              + 1024 * 2048
              + 2 * (2 * 2048 + 2048 * 512 + 2 * 512 + 27 * 512 ** 2 + 2 * 512 + 4 * 512 ** 2)
              + 2 * 2048)
    assert block4 == 10_752_000 + 2 * 9_181_184 + 4_096 == 29_118_464
    heads = (2048 * 1000 + 1000) + (1000 * 20 + 20)   # dense 1000, then 5+3+2+9+1 outputs
    expected = {"stem": stem, "block1": block1, "block2": block2, "block3": block3,
                "block4": block4}
    assert sum(expected.values()) + heads == 48_203_996

    model = models.get("radnet")(depth=50, variant="radnet", width=64, hidden=1000)
    params = _init_shapes(model, (1, 16, 32, 32, 1))["params"]
    assert {k: _count(v) for k, v in params["encoder"].items()} == expected
    assert _count(params["heads"]) == heads
    assert _count(params) == 48_203_996


def test_parameter_count_resnet50_medicalnet_variant_by_hand():
    """MedicalNet-style ResNet50, width 64, 1 input channel, post-activation units.

    A bottleneck unit c_in → m → 4m holds conv1 c_in·m, norm1 2m, conv2 27m²,
    norm2 2m, conv3 4m², norm3 2·4m, plus in the first unit of a stage a
    projection conv c_in·4m with its norm 2·4m. 46.16 M encoder parameters, the
    size usually quoted for Med3D's resnet_50.
    """
    stem = 7 * 7 * 7 * 1 * 64 + 2 * 64                                      # 22_080
    block1 = (64 * 64 + 2 * 64 + 27 * 64 ** 2 + 2 * 64 + 4 * 64 ** 2 + 8 * 64 + 64 * 256 + 8 * 64
              + 2 * (256 * 64 + 2 * 64 + 27 * 64 ** 2 + 2 * 64 + 4 * 64 ** 2 + 8 * 64))
    assert block1 == 148_736 + 2 * 144_128 == 436_992
    block2 = (256 * 128 + 2 * 128 + 27 * 128 ** 2 + 2 * 128 + 4 * 128 ** 2 + 8 * 128
              + 256 * 512 + 8 * 128
              + 3 * (512 * 128 + 2 * 128 + 27 * 128 ** 2 + 2 * 128 + 4 * 128 ** 2 + 8 * 128))
    assert block2 == 674_304 + 3 * 574_976 == 2_399_232
    block3 = (512 * 256 + 2 * 256 + 27 * 256 ** 2 + 2 * 256 + 4 * 256 ** 2 + 8 * 256
              + 512 * 1024 + 8 * 256
              + 5 * (1024 * 256 + 2 * 256 + 27 * 256 ** 2 + 2 * 256 + 4 * 256 ** 2 + 8 * 256))
    assert block3 == 2_692_096 + 5 * 2_296_832 == 14_176_256
    block4 = (1024 * 512 + 2 * 512 + 27 * 512 ** 2 + 2 * 512 + 4 * 512 ** 2 + 8 * 512
              + 1024 * 2048 + 8 * 512
              + 2 * (2048 * 512 + 2 * 512 + 27 * 512 ** 2 + 2 * 512 + 4 * 512 ** 2 + 8 * 512))
    assert block4 == 10_758_144 + 2 * 9_181_184 == 29_120_512
    expected = {"stem": stem, "block1": block1, "block2": block2, "block3": block3,
                "block4": block4}
    assert sum(expected.values()) == 46_155_072
    heads = (2048 * 1000 + 1000) + (1000 * 20 + 20)

    model = models.get("radnet")(depth=50, variant="medicalnet", width=64, hidden=1000)
    params = _init_shapes(model, (1, 32, 32, 32, 1))["params"]
    assert {k: _count(v) for k, v in params["encoder"].items()} == expected
    assert _count(params) == 46_155_072 + heads == 48_224_092
    # Dilation changes no parameter.
    dilated = models.get("resnet")(depth=50, variant="medicalnet", dilated=True, width=64)
    assert _count(_init_shapes(dilated, (1, 32, 32, 32, 1))["params"]) == 46_155_072


def test_group_norm_has_no_batch_stats():
    variables = _init_shapes(models.get("radnet")(depth=10, width=4, hidden=8, norm="group"), TINY)
    assert "batch_stats" not in variables
    batch = _init_shapes(models.get("radnet")(depth=10, width=4, hidden=8, norm="batch"), TINY)
    assert _count(variables["params"]) == _count(batch["params"])


# ---------------------------------------------------------------- encoder paths


@pytest.mark.parametrize("variant,shape", [("radnet", (1, 16, 32, 32, 1)),
                                           ("medicalnet", (1, 32, 32, 32, 1))])
def test_encoder_paths_identical_in_classifier_and_vnet(variant, shape):
    common = dict(depth=18, variant=variant, width=4)
    classifier = _init_shapes(models.get("radnet")(hidden=8, **common), shape)
    segmenter = _init_shapes(models.get("vnet")(num_classes=2, decoder_width=4, **common), shape)
    encoder = _init_shapes(models.get("resnet")(**common), shape)
    for collection in ("params", "batch_stats"):
        paths = _paths(classifier[collection]["encoder"])
        assert paths == _paths(segmenter[collection]["encoder"])
        assert paths == _paths(encoder[collection])
        assert {p.split("]")[0] + "]" for p in paths} == {f"['{s}']" for s in models.STAGES}
    assert set(classifier["params"]) == {"encoder", "heads"}
    assert set(segmenter["params"]) == {"encoder", "decoder"}


def test_stage_strides_match_encoder():
    for variant, dilated in [("radnet", False), ("medicalnet", False), ("medicalnet", True)]:
        assert models.total_stride(variant, dilated) == resnet3d.stage_strides(
            variant, dilated)["block4"]
    assert models.total_stride("radnet") == (16, 32, 32)
    assert models.total_stride("medicalnet") == (32, 32, 32)
    assert models.total_stride("medicalnet", True) == (8, 8, 8)


def test_input_smaller_than_the_total_stride_is_a_clear_error():
    import jax
    import jax.numpy as jnp
    from radnet import models
    model = models.get("radnet")(depth=10, width=4, hidden=8)
    x = jnp.zeros((1, 8, 16, 16, 1), jnp.float32)
    with pytest.raises(ValueError, match="too small for this encoder"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
