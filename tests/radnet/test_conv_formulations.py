"""Each convolution formulation of radnet.models.conv against Flax's plain layers.

Every formulation must give the outputs and gradients of ``nn.Conv`` /
``nn.ConvTranspose`` with the very same parameters. Tolerance: the formulations add
the same float32 products in another order, and two orders of a sum of K terms differ
by at most 2·γ_K·Σ|terms| with γ_K = K·ε/(1 − K·ε) (Higham, Accuracy and Stability of
Numerical Algorithms, §3.1), ε = 2^-24. Σ|terms| is computed exactly as the plain
convolution (and its vector-Jacobian product) of |x|, |kernel| and |cotangent|. A
wrong tap, flip, padding or channel order errs by O(Σ|terms|), far above that bound.
"""

import os
import platform
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radnet import models, native
from radnet.models import conv, resnet3d

EPS32 = 2.0 ** -24


def _bound(num_terms, abs_sum):
    gamma = num_terms * EPS32 / (1 - num_terms * EPS32)
    return 2 * gamma * abs_sum


def _rand(rng, shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32) * scale)


def _check_against(plain_fn, fn, x, params, cotangent):
    """Outputs and the gradients w.r.t. the input and every parameter equal the plain
    layer's within the summation-order bound."""
    # One jitted program per side (op-by-op dispatch compiles every primitive apart).
    value_and_vjp = lambda f: jax.jit(lambda x, p, ct: (f(x, p), jax.vjp(f, x, p)[1](ct)))
    y_ref, grads_ref = value_and_vjp(plain_fn)(x, params, cotangent)
    y, grads = value_and_vjp(fn)(x, params, cotangent)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype == jnp.float32
    # Σ|terms| of every output and gradient: the same linear maps applied to absolute values.
    y_abs, grads_abs = value_and_vjp(plain_fn)(jnp.abs(x), jax.tree.map(jnp.abs, params),
                                               jnp.abs(cotangent))
    kernel = params["params"]["kernel"]
    # An output sums taps·C_in products (+ bias); an input gradient taps·F; a kernel
    # gradient one per output position.
    terms_y = int(np.prod(kernel.shape[:-1])) + 1
    num_terms = max(terms_y, int(np.prod(kernel.shape[:3])) * kernel.shape[-1],
                    int(np.prod(y.shape[:-1])))
    np.testing.assert_array_less(np.abs(np.asarray(y - y_ref)),
                                 np.asarray(_bound(terms_y, y_abs)) + 1e-30)
    for g, g_ref, g_abs in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref),
                               jax.tree.leaves(grads_abs)):
        assert g.shape == g_ref.shape
        np.testing.assert_array_less(np.abs(np.asarray(g - g_ref)),
                                     np.asarray(_bound(num_terms, g_abs)) + 1e-30)
    # The bound is not vacuous: the outputs are far from zero compared with it.
    assert float(jnp.max(jnp.abs(y_ref))) > 1e3 * float(jnp.max(_bound(terms_y, y_abs)))


# (input shape [B, D, H, W, C], kernel, padding, bias): maps larger and smaller than the
# kernel (block4 of a 16×64×64 input is 1×2×2), odd and even sizes, the radnet stem kernel,
# MedicalNet's symmetric padding pairs.
CASES = [
    ((2, 4, 6, 5, 3), (3, 3, 3), "SAME", False),
    ((2, 1, 2, 2, 8), (3, 3, 3), "SAME", False),
    ((1, 2, 4, 3, 4), (3, 3, 3), ((1, 1), (1, 1), (1, 1)), True),
    ((1, 3, 9, 8, 2), (3, 7, 7), "SAME", False),
    ((2, 3, 4, 5, 6), (1, 1, 1), "SAME", True),
]


# pointwise is defined for 1×1×1 kernels only (choose() never picks it for others); plain is
# nn.Conv's own lax call.
@pytest.mark.parametrize("formulation,shape,kernel,padding,bias", [
    (f, *case) for case in CASES for f in conv.FORMULATIONS
    if f != "plain" and (f != "pointwise" or case[1] == (1, 1, 1))])
def test_formulation_equals_nn_conv(formulation, shape, kernel, padding, bias):
    rng = np.random.default_rng(sum(shape) + len(formulation))
    x = _rand(rng, shape)
    plain = nn.Conv(5, kernel, padding=padding, use_bias=bias)
    params = plain.init(jax.random.key(0), x)
    if bias:  # a non-zero bias, so its gradient and addition are exercised
        params["params"]["bias"] = _rand(rng, (5,))
    layer = conv.Conv3D(5, kernel, padding=padding, use_bias=bias, formulation=formulation)
    # Same parameter tree, shapes and initial values as nn.Conv under the same key.
    assert jax.tree.map(lambda a: a.shape, layer.init(jax.random.key(0), x)) == \
        jax.tree.map(lambda a: a.shape, params)
    np.testing.assert_array_equal(layer.init(jax.random.key(0), x)["params"]["kernel"],
                                  params["params"]["kernel"])
    y_shape = plain.apply(params, x).shape
    _check_against(lambda x, p: plain.apply(p, x), lambda x, p: layer.apply(p, x), x, params,
                   _rand(rng, y_shape))


def test_strided_pointwise_equals_nn_conv():
    """MedicalNet's stride-2 1×1×1 projection shortcut, subsampled then multiplied."""
    rng = np.random.default_rng(3)
    x = _rand(rng, (2, 5, 6, 4, 3))
    plain = nn.Conv(4, (1, 1, 1), strides=(2, 2, 2), padding=((0, 0),) * 3, use_bias=False)
    params = plain.init(jax.random.key(0), x)
    layer = conv.Conv3D(4, (1, 1, 1), strides=(2, 2, 2), padding=((0, 0),) * 3,
                        use_bias=False, formulation="pointwise")
    _check_against(lambda x, p: plain.apply(p, x), lambda x, p: layer.apply(p, x), x, params,
                   _rand(rng, plain.apply(params, x).shape))


@pytest.mark.parametrize("formulation", ["matmul", "tapwise"])
@pytest.mark.parametrize("factor", [(2, 2, 2), (1, 2, 2)])
def test_up_conv_equals_nn_conv_transpose(factor, formulation):
    rng = np.random.default_rng(sum(factor))
    x = _rand(rng, (2, 2, 3, 4, 6))
    plain = nn.ConvTranspose(5, factor, strides=factor, padding="VALID", use_bias=True)
    params = plain.init(jax.random.key(0), x)
    params["params"]["bias"] = _rand(rng, (5,))
    layer = conv.UpConv3D(5, factor, use_bias=True, formulation=formulation)
    np.testing.assert_array_equal(layer.init(jax.random.key(0), x)["params"]["kernel"],
                                  params["params"]["kernel"])
    _check_against(lambda x, p: plain.apply(p, x), lambda x, p: layer.apply(p, x), x, params,
                   _rand(rng, plain.apply(params, x).shape))


def test_up_conv_choice():
    """tapwise where the kernel outweighs the map (deep decoder levels), matmul on large
    maps (the top level), plain off the CPU."""
    choose = lambda spatial, factor=(2, 2, 2), features=128: conv.choose_transpose(
        spatial, factor, features, allow_rewrites=True)
    assert choose((1, 2, 2)) == "tapwise"                         # up3 at 16×64×64
    assert choose((16, 32, 32), (1, 2, 2), 16) == "matmul"        # the top level
    assert conv.choose_transpose((1, 2, 2), (2, 2, 2), 128, allow_rewrites=False) == "plain"


@pytest.mark.parametrize("formulation", ["auto", "plain", "im2col", "onednn"])
def test_conv_over_several_inputs_equals_nn_conv_over_their_concatenation(formulation):
    """Conv3D(x, skip): the kernel spans the concatenated channels (nn.Conv's parameters
    over jnp.concatenate([x, skip])) and the result, with the gradients of both inputs and
    of the kernel, is nn.Conv's on the concatenation."""
    if formulation == "onednn" and not native.available():
        pytest.skip("radnet/native not built (checked by test_onednn_library_is_built_here)")
    rng = np.random.default_rng(17)
    x, skip = _rand(rng, (1, 3, 6, 5, 4)), _rand(rng, (1, 3, 6, 5, 1))
    both = jnp.concatenate([x, skip], axis=-1)
    plain = nn.Conv(5, (3, 3, 3), use_bias=True)
    params = plain.init(jax.random.key(0), both)
    params["params"]["bias"] = _rand(rng, (5,))
    layer = conv.Conv3D(5, (3, 3, 3), use_bias=True, formulation=formulation)
    assert jax.tree.map(lambda a: a.shape, layer.init(jax.random.key(0), x, skip)) == \
        jax.tree.map(lambda a: a.shape, params)
    _check_against(lambda xs, p: plain.apply(p, xs),
                   lambda xs, p: layer.apply(p, xs[..., :4], xs[..., 4:]), both, params,
                   _rand(rng, (1, 3, 6, 5, 5)))
    with pytest.raises(ValueError, match="one spatial shape"):
        layer.apply(params, x, skip[:, :2])


def test_choice_follows_shapes_and_backend(monkeypatch):
    # Without oneDNN (RADNET_CONV=xla, or the library not built): the XLA rewrites.
    choose = lambda spatial, k=(3, 3, 3), s=(1, 1, 1), d=(1, 1, 1), **kw: conv.choose(
        spatial, k, s, d, allow_rewrites=True, allow_onednn=False, **kw)
    assert choose((8, 32, 32)) == "depth_folded"        # block1 of a 16×64×64 input
    assert choose((1, 2, 2)) == "im2col"                # block4: a map smaller than the kernel
    assert choose((8, 32, 32), (1, 1, 1)) == "pointwise"
    assert choose((8, 32, 32), s=(2, 2, 2)) == "plain"  # strided 3×3×3: plain
    assert choose((8, 32, 32), d=(2, 2, 2)) == "plain"  # dilated (Med3D): plain
    # With oneDNN: every float32 undilated convolution but the smallest maps.
    choose1 = lambda spatial, k=(3, 3, 3), s=(1, 1, 1), d=(1, 1, 1), **kw: conv.choose(
        spatial, k, s, d, allow_rewrites=True, allow_onednn=True, **kw)
    assert choose1((8, 32, 32)) == "onednn"
    assert choose1((6, 6, 6)) == "onednn"               # block3 of 48×96×96: 216 voxels
    assert choose1((3, 6, 6)) == "im2col"               # 108 voxels: im2col is faster
    assert choose1((1, 2, 2)) == "im2col"
    assert choose1((8, 32, 32), (1, 1, 1)) == "onednn"
    # 1×1×1 on a small map: oneDNN would reorder the whole kernel per call for a tiny
    # product (block4's 2048×1024 kernels at 1×2×2); XLA's matrix product reads it once.
    assert choose1((1, 2, 2), (1, 1, 1)) == "pointwise"
    assert choose1((2, 4, 4), (1, 1, 1), s=(2, 2, 2)) == "pointwise"
    assert choose1((8, 32, 32), s=(2, 2, 2)) == "onednn"
    assert choose1((48, 96, 96), (3, 7, 7), s=(1, 2, 2)) == "onednn"   # the radnet stem
    assert choose1((8, 32, 32), d=(2, 2, 2)) == "plain"  # dilation: not wired to oneDNN
    assert choose1((8, 32, 32), dtype=jnp.bfloat16) == "depth_folded"  # oneDNN: float32 only
    assert conv.choose((8, 32, 32), (3, 3, 3), (1, 1, 1), (1, 1, 1),
                       allow_rewrites=False) == "plain"  # GPU/TPU
    monkeypatch.setenv(conv.ENV_VAR, "plain")
    assert conv.choose((8, 32, 32), (3, 3, 3), (1, 1, 1), (1, 1, 1)) == "plain"
    monkeypatch.setenv(conv.ENV_VAR, "xla")
    expected = "depth_folded" if jax.default_backend() == "cpu" else "plain"
    assert conv.choose((8, 32, 32), (3, 3, 3), (1, 1, 1), (1, 1, 1)) == expected
    monkeypatch.setenv(conv.ENV_VAR, "auto")
    if jax.default_backend() == "cpu":
        expected = "onednn" if native.available() else "depth_folded"
    assert conv.choose((8, 32, 32), (3, 3, 3), (1, 1, 1), (1, 1, 1)) == expected


@pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux",
                    reason="the onednn-cpu-gomp wheels exist for x86-64 Linux only")
def test_onednn_library_is_built_here():
    """`make venv` builds radnet/native; a silent fall-back to XLA's convolutions would
    make every CPU step 2–5× slower, so the test environment must have it."""
    assert native.available(), f"{native.LIBRARY} missing: run `python -m radnet.native`"


_READS_KERNEL_IN_PLACE = """
import sys
import jax, numpy as np
from radnet import native
for c in (16, 17, 1):
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8, c)).astype(np.float32)
    k = np.random.default_rng(1).standard_normal((3, 3, 3, c, 16)).astype(np.float32)
    pads = ((1, 1),) * 3
    print("case", c, flush=True)
    y = jax.jit(lambda x, k: native.conv3d_forward(x, k, (1, 1, 1), pads))(x, k)
    ref = jax.lax.conv_general_dilated(x, k, (1, 1, 1), pads,
                                       dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    print("max_err", float(np.max(np.abs(np.asarray(y) - np.asarray(ref)))), flush=True)
"""


def test_onednn_forward_reads_the_kernel_in_place():
    """The forward primitive takes radnet's [kd, kh, kw, C, F] kernel as it is where oneDNN
    has a direct kernel for that layout (ONEDNN_VERBOSE shows no weights reorder: 16 and 17
    input channels); a 1-channel input (the stem) keeps the blocked layout and its reorder.
    Either way the result is the convolution. (One subprocess for the three cases.)"""
    if not native.available():
        pytest.skip("radnet/native not built (checked by test_onednn_library_is_built_here)")
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    done = subprocess.run([sys.executable, "-c", _READS_KERNEL_IN_PLACE], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cases, current = {}, None
    for line in done.stdout.splitlines():
        if line.startswith("case "):
            current = cases.setdefault(int(line.split()[1]), {"conv": [], "reorder": []})
        elif line.startswith("max_err"):
            current["err"] = float(line.split()[1])
        elif line.startswith("onednn_verbose") and ",exec," in line and current is not None:
            for kind in ("convolution", "reorder"):
                if f",{kind}," in line:
                    current["conv" if kind == "convolution" else "reorder"].append(line)
    assert sorted(cases) == [1, 16, 17]
    for c, reorders in ((16, False), (17, False), (1, True)):
        got = cases[c]
        assert len(got["conv"]) == 1 and ",forward_training," in got["conv"][0], (c, got)
        assert bool(got["reorder"]) == reorders, (c, got["reorder"])
        assert got["err"] < 1e-3  # 27·C products of N(0,1) terms: order differences ~1e-5


def test_native_build_failure_is_one_line_and_exit_2(tmp_path):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"))
    done = subprocess.run([sys.executable, "-m", "radnet.native"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not built" in lines[0] and "no-such-compiler" in lines[0]


# Strided and asymmetrically padded convolutions (oneDNN takes them; the XLA rewrites do
# not): TensorFlow SAME with stride 2 on even sizes pads (0, 1), MedicalNet's strided
# 7×7×7 stem pads (3, 3), the radnet stem (3, 7, 7) with stride (1, 2, 2), VALID.
STRIDED = [
    ((2, 6, 8, 7, 3), (3, 3, 3), (2, 2, 2), "SAME"),
    ((1, 8, 9, 8, 1), (7, 7, 7), (2, 2, 2), ((3, 3), (3, 3), (3, 3))),
    ((1, 4, 12, 10, 1), (3, 7, 7), (1, 2, 2), "SAME"),
    ((2, 5, 6, 7, 3), (3, 3, 3), (1, 1, 1), "VALID"),
    ((2, 5, 6, 4, 3), (1, 1, 1), (2, 2, 2), "SAME"),
]


@pytest.mark.parametrize("shape,kernel,strides,padding", STRIDED)
def test_onednn_strided_and_padded_equal_nn_conv(shape, kernel, strides, padding):
    if not native.available():
        pytest.skip("radnet/native not built (checked by test_onednn_library_is_built_here)")
    rng = np.random.default_rng(sum(shape) + sum(strides))
    x = _rand(rng, shape)
    plain = nn.Conv(4, kernel, strides=strides, padding=padding, use_bias=False)
    params = plain.init(jax.random.key(0), x)
    layer = conv.Conv3D(4, kernel, strides=strides, padding=padding, use_bias=False,
                        formulation="onednn")
    _check_against(lambda x, p: plain.apply(p, x), lambda x, p: layer.apply(p, x), x, params,
                   _rand(rng, plain.apply(params, x).shape))


def test_stem_is_the_same_with_onednn_and_depth_folding(monkeypatch):
    """The radnet stem (SliceFoldedConv) takes oneDNN when built, the folded 2D
    convolution otherwise: same parameter, both equal to nn.Conv."""
    rng = np.random.default_rng(11)
    x = _rand(rng, (2, 4, 12, 10, 1))
    plain = nn.Conv(6, (3, 7, 7), strides=(1, 2, 2), padding="SAME", use_bias=False)
    params = plain.init(jax.random.key(0), x)
    stem = resnet3d.SliceFoldedConv(6, (3, 7, 7), (1, 2, 2))
    ct = _rand(rng, plain.apply(params, x).shape)
    for setting in ("auto", "xla"):
        monkeypatch.setenv(conv.ENV_VAR, setting)
        _check_against(lambda x, p: plain.apply(p, x), lambda x, p: stem.apply(p, x), x,
                       params, ct)


def test_model_same_with_and_without_rewrites(monkeypatch):
    """A whole network: the same parameters and the same outputs whether its layers take
    the CPU formulations or the plain path (RADNET_CONV=plain). A VNet on a ResNet10
    encoder at 16×64×64 meets them all: depth_folded (block1, 8×16×16), im2col (block2–4,
    down to 1×2×2), pointwise (shortcuts, logits), matmul and tapwise up-convolutions, the
    top level's conv1 over two inputs. (Gradients are
    checked per layer above, where a rigorous bound exists; through a network in training
    mode batch norm amplifies reordering differences by the inverse of tiny batch
    variances, so a whole-network gradient comparison would need a loose, unjustified
    tolerance.)"""
    model = models.VNet(depth=10, width=4, decoder_width=2)
    x = jax.random.uniform(jax.random.key(1), (1, 16, 64, 64, 1))

    def run():
        # "rbg" keys: a jitted init with threefry keys compiles for a minute on CPU.
        variables = jax.jit(lambda: model.init(jax.random.key(0, impl="rbg"), x,
                                               train=False))()
        return variables, jax.jit(lambda v: model.apply(v, x, train=False))(variables)

    monkeypatch.setenv(conv.ENV_VAR, "auto")
    fast_vars, fast_out = run()
    monkeypatch.setenv(conv.ENV_VAR, "plain")
    plain_vars, plain_out = run()
    assert jax.tree.structure(fast_vars) == jax.tree.structure(plain_vars)
    for a, b in zip(jax.tree.leaves(fast_vars), jax.tree.leaves(plain_vars)):
        np.testing.assert_array_equal(a, b)
    # ~25 layers each within a few ε·Σ|terms| (above); 1e-4 of the output scale leaves a
    # wide margin for that and is ~10^3 below the error of any wrong formulation.
    scale = float(jnp.max(jnp.abs(plain_out)))
    assert scale > 0
    np.testing.assert_allclose(np.asarray(fast_out), np.asarray(plain_out), atol=1e-4 * scale,
                               rtol=0)


def test_padding_that_shrinks_the_map_takes_the_plain_path(monkeypatch):
    """depth_folded and im2col assume output size = input size; VALID padding must not
    reach them (without oneDNN auto falls back to plain) and asking for them by name is an
    error. (oneDNN takes any padding: test_onednn_strided_and_padded_equal_nn_conv.)"""
    monkeypatch.setenv(conv.ENV_VAR, "xla")
    x = _rand(np.random.default_rng(5), (1, 5, 6, 7, 3))
    plain = nn.Conv(4, (3, 3, 3), padding="VALID")
    params = plain.init(jax.random.key(0), x)
    np.testing.assert_array_equal(conv.Conv3D(4, (3, 3, 3), padding="VALID").apply(params, x),
                                  plain.apply(params, x))
    with pytest.raises(ValueError, match="size-keeping padding"):
        conv.Conv3D(4, (3, 3, 3), padding="VALID", formulation="im2col").apply(params, x)


def test_onednn_under_explicit_sharding_keeps_the_batch_axis():
    """Evaluation shards its batch over an explicit mesh (jax.make_mesh's default axis
    type); a custom call's result must say how it is sharded, or joining it with
    batch-sharded values (the heads' histogram features) is a sharding type error."""
    if not native.available():
        pytest.skip("radnet/native not built (checked by test_onednn_library_is_built_here)")
    mesh = jax.make_mesh((1,), ("data",))
    x = jax.device_put(_rand(np.random.default_rng(2), (2, 4, 6, 5, 3)),
                       jax.sharding.NamedSharding(mesh, jax.P("data")))
    layer = conv.Conv3D(4, (3, 3, 3), use_bias=False, formulation="onednn")
    params = layer.init(jax.random.key(0), x)

    def f(p, x):
        y = layer.apply(p, x)
        return jnp.concatenate([y.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3))], axis=-1)

    with jax.set_mesh(mesh):
        out = jax.jit(f)(params, x)
        grads = jax.jit(jax.grad(lambda p, x: f(p, x).sum()))(params, x)
    assert out.shape == (2, 7)
    plain = nn.Conv(4, (3, 3, 3), use_bias=False)
    ref = jnp.concatenate([plain.apply(params, x).mean(axis=(1, 2, 3)),
                           x.mean(axis=(1, 2, 3))], axis=-1)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)
    assert grads["params"]["kernel"].shape == (3, 3, 3, 3, 4)


@pytest.mark.parametrize("shape", [(2, 6, 8, 4, 3), (1, 5, 7, 9, 2)])  # even; odd (VALID drops)
def test_max_pool_reshaped_equals_nn_max_pool(shape):
    """The CPU form of radnet's 2×2×2 pool: outputs identical; gradients identical on
    maps without ties, and with tied maxima each window passes on the same total."""
    rng = np.random.default_rng(sum(shape))
    x = _rand(rng, shape)
    ref = lambda x: nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2), padding="VALID")
    fast = lambda x: conv.max_pool(x, (2, 2, 2), (2, 2, 2), "VALID", allow_rewrites=True)
    y, y_ref = jax.jit(fast)(x), jax.jit(ref)(x)
    np.testing.assert_array_equal(y, y_ref)
    ct = _rand(rng, y.shape)
    grad = lambda f, x: jax.jit(lambda x: jax.vjp(f, x)[1](ct)[0])(x)
    np.testing.assert_array_equal(grad(fast, x), grad(ref, x))
    # Ties (a ReLU'd map with flat regions): per window, the gradient sums agree.
    tied = jnp.round(jnp.maximum(x, 0) * 2) / 2
    g, g_ref = grad(fast, tied), grad(ref, tied)
    window_sum = lambda g: jax.jit(
        lambda g: g[:, :shape[1] // 2 * 2, :shape[2] // 2 * 2, :shape[3] // 2 * 2].reshape(
            shape[0], shape[1] // 2, 2, shape[2] // 2, 2, shape[3] // 2, 2, shape[4]
        ).sum(axis=(2, 4, 6)))(g)
    np.testing.assert_allclose(window_sum(g), window_sum(g_ref), rtol=1e-6, atol=1e-6)
    assert int(jnp.sum((g != g_ref))) > 0  # the tie case is exercised
    # Elsewhere than the CPU (allow_rewrites False), nn.max_pool itself.
    np.testing.assert_array_equal(
        conv.max_pool(x, (2, 2, 2), (2, 2, 2), "VALID", allow_rewrites=False), y_ref)


def test_max_pool_under_explicit_sharding():
    """The reshaped pool under evaluation's explicit batch sharding (a general reshape must
    state its output sharding there)."""
    mesh = jax.make_mesh((1,), ("data",))
    x = jax.device_put(_rand(np.random.default_rng(4), (2, 4, 6, 4, 3)),
                       jax.sharding.NamedSharding(mesh, jax.P("data")))
    fast = jax.jit(lambda x: conv.max_pool(x, (2, 2, 2), (2, 2, 2), "VALID",
                                           allow_rewrites=True))
    with jax.set_mesh(mesh):
        y = fast(x)
    np.testing.assert_array_equal(
        y, nn.max_pool(jnp.asarray(np.asarray(x)), (2, 2, 2), strides=(2, 2, 2)))
