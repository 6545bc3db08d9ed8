"""radnet.train.state.clip_by_global_norm against optax.clip_by_global_norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from radnet.train import state as state_lib


def _tree(scale):
    rng = np.random.default_rng(0)
    return {"a": jnp.asarray(rng.normal(size=(3, 3, 3, 4, 5)) * scale, jnp.float32),
            "b": {"c": jnp.asarray(rng.normal(size=(7,)) * scale, jnp.float32)}}


@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0])
def test_clip_equals_optax(scale):
    grads = _tree(scale)
    norm = float(optax.tree.norm(grads))
    ours, theirs = state_lib.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    got, got_state = jax.jit(ours.update)(grads, ours.init(grads))
    want, want_state = jax.jit(theirs.update)(grads, theirs.init(grads))
    assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        if norm < 1.0:
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))  # passed exactly
        else:
            # one rounding of the scale max/norm, plus optax's own two roundings
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=4e-7, atol=0)
    if norm >= 1.0:
        assert abs(float(optax.tree.norm(got)) - 1.0) < 1e-5


def test_optimizer_state_tree_is_unchanged():
    """Checkpoints written with optax's clip restore into the new optimizer's state."""
    params = _tree(1.0)
    ours = optax.chain(state_lib.clip_by_global_norm(1.0), optax.adam(1e-3))
    theirs = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    assert jax.tree.structure(ours.init(params)) == jax.tree.structure(theirs.init(params))


def test_non_finite_norm_propagates_like_optax():
    grads = {"a": jnp.asarray([1.0, jnp.nan]), "b": jnp.asarray([jnp.inf, 2.0])}
    ours, theirs = state_lib.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    got, _ = ours.update(grads, ours.init(grads))
    want, _ = theirs.update(grads, theirs.init(grads))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.isnan(np.asarray(g)), np.isnan(np.asarray(w)))
