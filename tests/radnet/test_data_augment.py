"""Label-safe augmentation: jit-able on the device, the same transformation in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radnet import labels
from radnet.data import augment as aug

SHAPE = (4, 3, 5, 6, 1)  # [B, D, H, W, C]
AXIAL, SAGITTAL = labels.VIEW.index("axial"), labels.VIEW.index("sagittal")


def _volume(seed=0):
    return np.random.default_rng(seed).random(SHAPE, dtype=np.float32)


def _only(**overrides):
    """A config with every operation off except ``overrides``."""
    config = aug.default_augment_config()
    for key in ("intensity_scale_prob", "intensity_shift_prob", "gamma_prob", "noise_prob",
                "flip_left_right_prob", "flip_rows_prob", "flip_slices_prob", "translate_prob"):
        config[key] = 0.0
    config.update(overrides)
    return config


def test_default_augment_is_jittable_and_keeps_shape_and_range():
    config = aug.default_augment_config()
    fn = jax.jit(lambda rng, v: aug.augment(rng, v, config))
    volume = jnp.asarray(_volume())
    out = fn(jax.random.key(0), volume)
    assert out.shape == SHAPE and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not np.allclose(out, volume)  # something happened
    np.testing.assert_array_equal(out, fn(jax.random.key(0), volume))  # pure in rng
    assert not np.allclose(out, fn(jax.random.key(1), volume))


def test_disabled_is_identity():
    config = aug.default_augment_config()
    config.enabled = False
    volume = jnp.asarray(_volume())
    assert aug.augment(jax.random.key(0), volume, config) is volume
    np.testing.assert_array_equal(aug.augment_numpy(np.random.default_rng(0), _volume(), config),
                                  _volume())


def test_left_right_flip_uses_the_patient_axis_of_each_view():
    volume = _volume()
    config = _only(flip_left_right_prob=1.0)
    view = np.array([AXIAL, SAGITTAL, -1, labels.VIEW.index("coronal")])
    out = np.asarray(aug.augment(jax.random.key(0), jnp.asarray(volume), config,
                                 view=jnp.asarray(view)))
    np.testing.assert_array_equal(out[0], volume[0][:, :, ::-1])  # axial: columns
    np.testing.assert_array_equal(out[1], volume[1][::-1])        # sagittal: slices
    np.testing.assert_array_equal(out[2], volume[2][:, :, ::-1])  # unknown: columns
    np.testing.assert_array_equal(out[3], volume[3][:, :, ::-1])  # coronal: columns
    no_view = np.asarray(aug.augment(jax.random.key(0), jnp.asarray(volume), config))
    np.testing.assert_array_equal(no_view, volume[:, :, :, ::-1])


def test_flip_probability_is_per_sample():
    volume = np.random.default_rng(1).random((256, 1, 1, 2, 1), dtype=np.float32)
    out = np.asarray(aug.augment(jax.random.key(3), jnp.asarray(volume),
                                 _only(flip_left_right_prob=0.5)))
    flipped = np.all(out == volume[:, :, :, ::-1], axis=(1, 2, 3, 4))
    kept = np.all(out == volume, axis=(1, 2, 3, 4))
    assert np.all(flipped | kept)
    assert 0.35 < flipped.mean() < 0.65


def test_numpy_and_jnp_apply_the_same_parameters():
    config = aug.default_augment_config()
    config.update(flip_rows_prob=0.5, flip_slices_prob=0.5)
    rng = np.random.default_rng(5)
    params = aug._resolve(np, aug._draw(lambda name, shape: rng.random(shape), SHAPE[0], config))
    noise = rng.standard_normal(SHAPE, dtype=np.float32)
    view = np.array([AXIAL, SAGITTAL, AXIAL, SAGITTAL])
    volume = _volume()
    on_host = aug.apply_params(np, volume, params, noise, view)
    on_device = aug.apply_params(jnp, jnp.asarray(volume), jax.tree.map(jnp.asarray, params),
                                 jnp.asarray(noise), jnp.asarray(view))
    np.testing.assert_allclose(np.asarray(on_device), on_host, atol=1e-5)


@pytest.mark.parametrize("backend", ["jnp", "numpy"])
def test_intensity_and_noise_statistics_follow_the_config(backend):
    volume = np.full((512, 2, 4, 4, 1), 0.5, np.float32)

    def run(config):
        if backend == "jnp":
            return np.asarray(aug.augment(jax.random.key(0), jnp.asarray(volume), config))
        return aug.augment_numpy(np.random.default_rng(0), volume, config)

    scaled = run(_only(intensity_scale=0.2, intensity_scale_prob=1.0))[:, 0, 0, 0, 0] / 0.5
    assert 0.8 <= scaled.min() and scaled.max() <= 1.2 and scaled.std() > 0.08
    shifted = run(_only(intensity_shift=0.1, intensity_shift_prob=0.5))[:, 0, 0, 0, 0] - 0.5
    assert np.abs(shifted).max() <= 0.1 + 1e-6
    assert 0.35 < np.mean(shifted != 0) < 0.65  # probability per sample
    gamma = run(_only(gamma=0.5, gamma_prob=1.0))[:, 0, 0, 0, 0]
    assert 0.5 ** 1.5 - 1e-6 <= gamma.min() and gamma.max() <= 0.5 ** (1 / 1.5) + 1e-6
    noisy = run(_only(noise_std=0.04, noise_prob=1.0)) - 0.5
    sample_std = noisy.reshape(512, -1).std(axis=1)
    assert sample_std.max() <= 0.04 * 1.6 and 0.01 < sample_std.mean() < 0.03  # σ ~ U(0, 0.04)


@pytest.mark.parametrize("backend", ["jnp", "numpy"])
def test_translation_moves_each_sample_in_plane_and_zeros_come_in(backend):
    volume = np.random.default_rng(3).random((6, 2, 8, 10, 1), dtype=np.float32) * 0.8 + 0.1
    config = _only(translate=0.3, translate_prob=1.0)
    if backend == "jnp":
        out = np.asarray(aug.augment(jax.random.key(2), jnp.asarray(volume), config))
    else:
        out = aug.augment_numpy(np.random.default_rng(2), volume, config)
    moves = set()
    for v, o in zip(volume, out):
        # the one move (within ±30 %) that explains this sample exactly
        found = [(dr, dc) for dr in range(-3, 4) for dc in range(-3, 4)
                 if np.array_equal(o, np.roll(v, (dr, dc), axis=(1, 2)) * _inside(dr, dc, v.shape))]
        assert len(found) == 1, found
        moves.add(found[0])
    assert len(moves) > 2  # drawn per sample


def _inside(dr, dc, shape):
    _, h, w, _ = shape
    rows = (np.arange(h) - dr >= 0) & (np.arange(h) - dr < h)
    cols = (np.arange(w) - dc >= 0) & (np.arange(w) - dc < w)
    return (rows[:, None] & cols[None, :])[None, :, :, None]


@pytest.mark.parametrize("on_ct", [False, True])
def test_ct_grey_values_are_kept_unless_asked(on_ct):
    # CT numbers are calibrated (the contrast label on CT rests on them): by default the
    # grey-value jitter skips series labelled CT; noise and geometry still apply.
    volume = np.full((4, 2, 4, 4, 1), 0.5, np.float32)
    config = _only(intensity_scale=0.2, intensity_scale_prob=1.0, intensity_shift=0.1,
                   intensity_shift_prob=1.0, gamma=0.5, gamma_prob=1.0, intensity_on_ct=on_ct)
    sequence = np.array([labels.SEQUENCE.index(s) for s in ("CT", "T1-SE", "CT", "T2-SE")])
    out = np.asarray(aug.augment(jax.random.key(0), jnp.asarray(volume), config,
                                 sequence=jnp.asarray(sequence)))
    on_host = aug.augment_numpy(np.random.default_rng(0), volume, config, sequence=sequence)
    for o in (out, on_host):
        changed = [not np.allclose(o[i], 0.5) for i in range(4)]
        assert changed == [on_ct, True, on_ct, True]
    assert aug.default_augment_config().intensity_on_ct is False


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="gamma_prob"):
        aug.augment(jax.random.key(0), jnp.zeros(SHAPE), _only(gamma_prob=1.5))


def test_to_unit_float_adds_the_channel_axis():
    volume = np.array([[[[0, 255]]]], np.uint8)
    out = aug.to_unit_float(volume)
    assert out.shape == (1, 1, 1, 2, 1) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out)[..., 0], [[[[0.0, 1.0]]]])
