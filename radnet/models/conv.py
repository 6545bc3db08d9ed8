"""3D convolutions with the parameters of ``nn.Conv`` / ``nn.ConvTranspose`` and a
formulation picked for the backend and the static shapes.

Why: XLA:CPU runs the 3D convolutions of a 3D ResNet 2–4× slower than the same
arithmetic written another way (measured, docs/performance.md):

- ``pointwise`` — a 1×1×1 convolution is a matrix product over channels
  (``[B·D·H·W, C] @ [C, F]``); its backward pass is two more products, where
  XLA:CPU's convolution backward copies and transposes the kernel first.
- ``depth_folded`` — a stride-1 k×k×k convolution as one 2D convolution: the kd
  depth taps are folded into the input channels (kd shifted copies of the input,
  ``[B·D, H, W, kd·C]``) against the kernel read as ``[kh, kw, kd·C, F]``. XLA:CPU's
  2D convolutions are far better tuned than its 3D ones.
- ``im2col`` — when the feature map is no larger than the kernel along some axis
  (block3/block4 of a 16×64×64 input are 2×4×4 and 1×2×2), XLA:CPU swaps the
  operands and reverses the whole kernel (28 MB at block4) on every call. Here the
  taps that cannot reach the map are trimmed from the kernel and the rest is one
  matrix product of the patches (``[B·D·H·W, taps·C] @ [taps·C, F]``).
- ``onednn`` — oneDNN's convolution (the library under PyTorch's CPU convolutions)
  through XLA FFI custom calls (radnet/native): forward, input gradient and kernel
  gradient, each 1.5–10× faster than XLA:CPU's at ResNet shapes. Used for every float32
  convolution without dilation on the CPU when the library is built (``make venv`` builds
  it) except on maps of ≤ 128 voxels, where ``im2col`` (k×k×k) and ``pointwise`` (1×1×1)
  are faster; the XLA formulations above are the fallback.
- ``plain`` — ``lax.conv_general_dilated``, what ``nn.Conv`` runs; used for strided or
  dilated k×k×k convolutions and on every backend but the CPU.

Every formulation computes the same sum of products as the plain convolution (only
the order of the float32 additions differs); tests/radnet/test_conv_formulations.py
checks outputs and gradients of each against ``nn.Conv`` / ``nn.ConvTranspose``.

The choice is made once, at trace time, from the static shapes and
``jax.default_backend()``: on GPU and TPU every layer takes the plain path (cuDNN and
the TPU compiler handle 3D convolutions well; the rewrites would only add copies).
``RADNET_CONV=plain`` in the environment forces the plain path everywhere (to
compare, or to rule the rewrites out when chasing a numerical question);
``RADNET_CONV=xla`` keeps the XLA rewrites but not oneDNN. ``onednn`` is differentiable
once (a ``custom_vjp``); a second derivative or ``jax.jvp`` through it needs
``RADNET_CONV=xla``.

Parameters: ``kernel`` ``[kd, kh, kw, C_in, F]`` (and ``bias`` ``[F]``) exactly as
``nn.Conv`` / ``nn.ConvTranspose`` (``transpose_kernel=False``) create them, under the
same module name, so checkpoints, exports and the MONAI/MedicalNet converters see the
same tree.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

FORMULATIONS: tuple[str, ...] = ("plain", "pointwise", "depth_folded", "im2col", "onednn")
TRANSPOSE_FORMULATIONS: tuple[str, ...] = ("plain", "matmul", "tapwise")
ENV_VAR = "RADNET_CONV"

# im2col materialises taps × the input; above this many output voxels per volume the
# depth-folded form is cheaper (measured crossover between 2×4×4 and 4×8×8 maps).
IM2COL_MAX_VOXELS = 512
# Against oneDNN the crossover is lower: im2col wins on 3×6×6 (108 voxels) and below,
# oneDNN from 6×6×6 (216) up (forward and train, B=1–2, 256–512 channels, measured).
XLA_BEATS_ONEDNN_MAX_VOXELS = 128
# The same bound sends 1×1×1 convolutions on small maps to ``pointwise``: oneDNN reorders the
# whole kernel into its blocked layout at every call, and for block4's 2048×1024 kernels on a
# 1×2×2 map that reorder (1–2.3 ms each, ONEDNN_VERBOSE) outweighs the product itself; the VNet
# step at 16×64×64 went 0.32 → 0.29 s (two A/B pairs, docs/performance.md).

_DN3 = ("NDHWC", "DHWIO", "NDHWC")
_DN2 = ("NHWC", "HWIO", "NHWC")


def rewrites_allowed() -> bool:
    """The CPU formulations may be used: the CPU backend and ``RADNET_CONV`` not ``plain``."""
    if os.environ.get(ENV_VAR, "auto").lower() == "plain":
        return False
    return jax.default_backend() == "cpu"


def onednn_available() -> bool:
    """oneDNN's convolutions may be used: CPU backend, ``RADNET_CONV`` not ``plain`` or
    ``xla``, and radnet/native built."""
    if not rewrites_allowed() or os.environ.get(ENV_VAR, "auto").lower() == "xla":
        return False
    from radnet import native  # noqa: PLC0415
    return native.available()


def reachable_taps(size: int, kernel: int, pad_low: int) -> tuple[int, int]:
    """First and last kernel tap (inclusive) of a stride-1 convolution that touches at
    least one of ``size`` input positions, given ``pad_low`` zeros before them.

    Output ``o`` reads input ``o + t - pad_low`` at tap ``t``; with ``o`` and the input
    both in ``[0, size)`` that is possible only for ``t - pad_low`` in ``(-size, size)``.
    """
    return max(0, pad_low - size + 1), min(kernel - 1, pad_low + size - 1)


def choose(spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
           dilation: Sequence[int], allow_rewrites: bool | None = None,
           pads: Sequence[tuple[int, int]] | None = None, dtype: Any = jnp.float32,
           allow_onednn: bool | None = None) -> str:
    """The formulation for a convolution over a ``spatial`` (D, H, W) map; ``pads``: the
    explicit (low, high) pads when known (the rewrites need size-keeping padding);
    ``dtype``: the compute dtype (oneDNN's path is float32 only)."""
    if allow_rewrites is None:
        allow_rewrites = rewrites_allowed()
    if not allow_rewrites:
        return "plain"
    kernel, strides, dilation = tuple(kernel), tuple(strides), tuple(dilation)
    if 0 in tuple(spatial):
        return "plain"  # an empty map: the caller reports it (ResNet3D names the stage)
    if allow_onednn is None:
        allow_onednn = onednn_available()
    onednn = (allow_onednn and jnp.dtype(dtype) == jnp.float32 and dilation == (1, 1, 1)
              and (pads is None or all(lo >= 0 and hi >= 0 for lo, hi in pads)))
    voxels = spatial[0] * spatial[1] * spatial[2]
    if kernel == (1, 1, 1):
        return "onednn" if onednn and voxels > XLA_BEATS_ONEDNN_MAX_VOXELS else "pointwise"
    xla_rewrite = (strides == (1, 1, 1) and dilation == (1, 1, 1)
                   and all(k % 2 == 1 for k in kernel)
                   and (pads is None or _keeps_size(kernel, pads)))
    if xla_rewrite and voxels <= (XLA_BEATS_ONEDNN_MAX_VOXELS if onednn
                                  else IM2COL_MAX_VOXELS):
        return "im2col"
    if onednn:
        return "onednn"
    return "depth_folded" if xla_rewrite else "plain"


def _same_pads(spatial, kernel, strides, dilation, padding):
    """Explicit (low, high) pads per axis for ``padding`` = "SAME", "VALID" or pairs."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding {padding!r}: use 'SAME', 'VALID' or (low, high) pairs")
        window = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
        return [tuple(p) for p in jax.lax.padtype_to_pads(spatial, window, strides,
                                                           padding.upper())]
    return [tuple(int(v) for v in p) for p in padding]


def _keeps_size(kernel, pads) -> bool:
    return all(lo + hi == k - 1 for k, (lo, hi) in zip(kernel, pads))


def depth_folded(x: jnp.ndarray, kernel: jnp.ndarray, depth_pad: tuple[int, int],
                 hw_strides: Sequence[int], hw_padding: Any) -> jnp.ndarray:
    """A convolution with stride 1 along D, ``depth_pad`` zeros around D, as one 2D
    convolution: the kd depth taps folded into the input channels (kd shifted copies,
    ``[B·D, H, W, kd·C]``) against the kernel read as ``[kh, kw, kd·C, F]``. Output depth
    = input depth + sum(depth_pad) − kd + 1. (Also the radnet stem's ``SliceFoldedConv``.)"""
    kd, kh, kw, c, f = kernel.shape
    xp = jnp.pad(x, ((0, 0), tuple(depth_pad), (0, 0), (0, 0), (0, 0)))
    d = xp.shape[1] - kd + 1
    b = x.shape[0]
    folded = jnp.concatenate([xp[:, i:i + d] for i in range(kd)], axis=-1)
    folded = folded.reshape(b * d, *x.shape[2:4], kd * c)
    k2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kd * c, f)
    y = jax.lax.conv_general_dilated(folded, k2, tuple(hw_strides), hw_padding,
                                     dimension_numbers=_DN2)
    return y.reshape(b, d, *y.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn_conv3d(x, kernel, strides, pads):
    from radnet import native  # noqa: PLC0415
    return native.conv3d_forward(x, kernel, strides, pads)


def _onednn_conv3d_fwd(x, kernel, strides, pads):
    return _onednn_conv3d(x, kernel, strides, pads), (x, kernel)


def _onednn_conv3d_bwd(strides, pads, residuals, dy):
    from radnet import native  # noqa: PLC0415
    x, kernel = residuals
    return (native.conv3d_backward_data(dy, kernel, x.shape, strides, pads),
            native.conv3d_backward_weights(x, dy, kernel.shape, strides, pads))


_onednn_conv3d.defvjp(_onednn_conv3d_fwd, _onednn_conv3d_bwd)


def conv3d(x: jnp.ndarray, kernel: jnp.ndarray, strides=(1, 1, 1), dilation=(1, 1, 1),
           padding: Any = "SAME", formulation: str = "plain") -> jnp.ndarray:
    """``x [B, D, H, W, C]`` ⊛ ``kernel [kd, kh, kw, C, F]`` → ``[B, D', H', W', F]``,
    the numbers of ``lax.conv_general_dilated`` computed by ``formulation``."""
    strides, dilation = tuple(strides), tuple(dilation)
    spatial, ksize = x.shape[1:4], kernel.shape[:3]
    pads = _same_pads(spatial, ksize, strides, dilation, padding)
    if formulation == "plain":
        return jax.lax.conv_general_dilated(x, kernel, strides, pads, rhs_dilation=dilation,
                                            dimension_numbers=_DN3)
    if formulation == "onednn":
        if dilation != (1, 1, 1) or x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
            raise ValueError(f"onednn needs float32 and no dilation, got {x.dtype}/"
                             f"{kernel.dtype} dilation {dilation}")
        return _onednn_conv3d(x, kernel, strides, tuple(tuple(p) for p in pads))
    if formulation == "pointwise":
        if ksize != (1, 1, 1):
            raise ValueError(f"pointwise needs a 1×1×1 kernel, got {ksize}")
        xp = jnp.pad(x, ((0, 0), *pads, (0, 0))) if any(p != (0, 0) for p in pads) else x
        xs = xp[:, ::strides[0], ::strides[1], ::strides[2]]
        return jnp.einsum("bdhwc,cf->bdhwf", xs, kernel[0, 0, 0])
    if strides != (1, 1, 1) or dilation != (1, 1, 1) or not _keeps_size(ksize, pads):
        raise ValueError(f"{formulation} needs stride 1, no dilation and size-keeping padding, "
                         f"got strides {strides} dilation {dilation} padding {pads}")
    # Trim the taps that only ever meet padding (a map smaller than the kernel).
    reach = [reachable_taps(n, k, lo) for n, k, (lo, _) in zip(spatial, ksize, pads)]
    kernel = kernel[tuple(slice(a, b + 1) for a, b in reach)]
    pads = [(lo - a, hi - (k - 1 - b)) for (lo, hi), k, (a, b) in zip(pads, ksize, reach)]
    kd, kh, kw, c, f = kernel.shape
    b, d, h, w, _ = x.shape
    if formulation == "depth_folded":
        return depth_folded(x, kernel, pads[0], (1, 1), pads[1:])
    if formulation == "im2col":
        xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
        patches = jnp.concatenate([xp[:, i:i + d, j:j + h, l:l + w]
                                   for i in range(kd) for j in range(kh) for l in range(kw)],
                                  axis=-1)
        y = jnp.dot(patches.reshape(b * d * h * w, kd * kh * kw * c),
                    kernel.reshape(kd * kh * kw * c, f))
        return y.reshape(b, d, h, w, f)
    raise ValueError(f"unknown convolution formulation {formulation!r}; use one of "
                     f"{FORMULATIONS}")


def conv_transpose3d(x: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int],
                     formulation: str = "plain") -> jnp.ndarray:
    """``nn.ConvTranspose(kernel_size=strides, strides=strides, padding="VALID")``:
    ``x [B, d, h, w, C]``, ``kernel [fd, fh, fw, C, F]`` → ``[B, d·fd, h·fh, w·fw, F]``.

    ``matmul``: kernel = stride means the output blocks do not overlap; output voxel
    ``(i·f + r)`` is ``x[i] @ kernel[f - 1 - r]`` (``lax.conv_transpose`` does not flip
    the kernel, so the taps run backwards). One product ``[B·d·h·w, C] @ [C, f³·F]``
    instead of a convolution over an input dilated with f³−1 zeros per voxel.
    """
    strides = tuple(strides)
    if formulation == "plain":
        return jax.lax.conv_transpose(x, kernel, strides, "VALID", dimension_numbers=_DN3)
    if formulation == "tapwise":
        return _tapwise_up(x, kernel, strides)
    if formulation != "matmul":
        raise ValueError(f"unknown transposed-convolution formulation {formulation!r}; use "
                         f"one of {TRANSPOSE_FORMULATIONS}")
    fd, fh, fw, c, f = kernel.shape
    if (fd, fh, fw) != strides:
        raise ValueError(f"matmul needs kernel = strides, got kernel {(fd, fh, fw)} strides "
                         f"{strides}")
    b, d, h, w, _ = x.shape
    flipped = kernel[::-1, ::-1, ::-1]
    y = jnp.einsum("bdhwc,xyzcf->bdxhywzf", x, flipped)
    return y.reshape(b, d * fd, h * fh, w * fw, f)


def choose_transpose(spatial: Sequence[int], factor: Sequence[int], features: int,
                     allow_rewrites: bool | None = None) -> str:
    """The formulation of a non-overlapping up-convolution (kernel = stride = ``factor``)
    of a ``spatial`` map to ``features`` channels: ``tapwise`` where the kernel outweighs the
    map (taps·F > voxels: the deep decoder levels), else ``matmul``; ``plain`` off the CPU."""
    if allow_rewrites is None:
        allow_rewrites = rewrites_allowed()
    if not allow_rewrites:
        return "plain"
    taps = factor[0] * factor[1] * factor[2]
    return "tapwise" if taps * features > spatial[0] * spatial[1] * spatial[2] else "matmul"


def _tapwise_up(x: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int]) -> jnp.ndarray:
    """:func:`conv_transpose3d` as one product per kernel tap, ``[N, C] @ kernel[t]``, the
    kernel read in place (``[taps, C, F]`` is its own layout): ``matmul``'s single product
    needs the kernel as ``[C, taps·F]``, a transposed copy of the kernel forward and of its
    gradient backward — on the deep decoder levels (2048×128×8 kernel, 1×2×2 map) those
    copies cost more than the product (measured: docs/performance.md). The map is tiny
    there, so it is broadcast over the taps; the taps are put in place (and in reverse,
    as ``lax.conv_transpose`` runs them) on the output."""
    fd, fh, fw, c, f = kernel.shape
    if (fd, fh, fw) != tuple(strides):
        raise ValueError(f"tapwise needs kernel = strides, got kernel {(fd, fh, fw)} strides "
                         f"{tuple(strides)}")
    b, d, h, w, _ = x.shape
    taps = fd * fh * fw
    xs = jnp.broadcast_to(x.reshape(1, b * d * h * w, c), (taps, b * d * h * w, c))
    y = jax.lax.dot_general(xs, kernel.reshape(taps, c, f), (((2,), (1,)), ((0,), (0,))))
    y = y.reshape(fd, fh, fw, b, d, h, w, f)[::-1, ::-1, ::-1]
    y = jnp.transpose(y, (3, 4, 0, 5, 1, 6, 2, 7))
    return y.reshape(b, d * fd, h * fh, w * fw, f)


def max_pool(x: jnp.ndarray, window: Sequence[int], strides: Sequence[int],
             padding: Any = "VALID", allow_rewrites: bool | None = None) -> jnp.ndarray:
    """``nn.max_pool`` on ``[B, D, H, W, C]``. On the CPU a non-overlapping VALID pool
    (window = strides, radnet's 2×2×2) is a max over a reshaped view: XLA:CPU computes
    ``nn.max_pool``'s gradient with a windowed arg-max over index arrays (~400 ms of a
    1.2 s ResNet50 step at 48×96×96, B=2, measured), where the reshaped max's gradient is
    one fused elementwise pass. Same outputs; the same gradient except where a window holds
    tied maxima, which this form shares equally and ``nn.max_pool`` gives to one of them
    (both are gradients of the max; ties of non-zero activations are rare)."""
    window, strides = tuple(window), tuple(strides)
    if allow_rewrites is None:
        allow_rewrites = rewrites_allowed()
    if not (allow_rewrites and window == strides and isinstance(padding, str)
            and padding.upper() == "VALID" and x.ndim == 5):
        return nn.max_pool(x, window, strides=strides, padding=padding)
    b, c = x.shape[0], x.shape[-1]
    out = [n // k for n, k in zip(x.shape[1:4], window)]
    x = x[:, :out[0] * window[0], :out[1] * window[1], :out[2] * window[2]]
    from radnet.train import sharding  # noqa: PLC0415
    shape = (b, out[0], window[0], out[1], window[1], out[2], window[2], c)
    x = jax.lax.reshape(x, shape, out_sharding=sharding.traced_batch_sharding(x, len(shape)))
    return x.max(axis=(2, 4, 6))


def _kernel_and_bias(module: nn.Module, x: jnp.ndarray, window: tuple[int, ...],
                     in_features: int | None = None):
    """``kernel`` [*window, C_in, F] (C_in: ``in_features`` or ``x``'s channels) and ``bias``
    [F] (None without ``use_bias``) declared as ``nn.Conv`` / ``nn.ConvTranspose`` declare
    them, and the compute dtype."""
    c_in = x.shape[-1] if in_features is None else in_features
    kernel = module.param("kernel", module.kernel_init, window + (c_in, module.features),
                          module.param_dtype)
    bias = (module.param("bias", module.bias_init, (module.features,), module.param_dtype)
            if module.use_bias else None)
    return kernel, bias, module.dtype or jnp.result_type(x, kernel)


class Conv3D(nn.Module):
    """Drop-in for ``nn.Conv`` on ``[B, D, H, W, C]`` with the formulation of :func:`choose`.

    Same parameters (``kernel`` [kd, kh, kw, C, F], ``bias`` [F]) and initialisers as
    ``nn.Conv``. ``padding``: "SAME", "VALID" or three (low, high) pairs.
    ``formulation``: "auto" (default: :func:`choose`) or one of :data:`FORMULATIONS`.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1, 1)
    kernel_dilation: Sequence[int] = (1, 1, 1)
    padding: Any = "SAME"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.linear.default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()
    formulation: str = "auto"

    @nn.compact
    def __call__(self, x, *more):
        """``x`` [B, D, H, W, C]; ``more``: further inputs of the same spatial shape whose
        channels follow ``x``'s in the kernel, as if concatenated on the channel axis (the
        parameters are those of ``nn.Conv`` over the concatenation). The convolution is then
        computed per input and summed: the concatenation is never materialised, and an input
        that needs no gradient (the network's own input) costs no input-gradient
        convolution."""
        parts = (x, *more)
        for part in parts:
            if part.ndim != 5 or part.shape[:4] != x.shape[:4]:
                raise ValueError(f"Conv3D expects [B, D, H, W, C] inputs of one spatial shape, "
                                 f"got shapes {[p.shape for p in parts]}")
        ksize = tuple(self.kernel_size)
        channels = [part.shape[-1] for part in parts]
        kernel, bias, dtype = _kernel_and_bias(self, x, ksize, sum(channels))
        pads = _same_pads(x.shape[1:4], ksize, self.strides, self.kernel_dilation,
                          self.padding)
        y, start = None, 0
        for part, c in zip(parts, channels):
            formulation = self.formulation
            if formulation == "auto":
                formulation = choose(x.shape[1:4], ksize, self.strides, self.kernel_dilation,
                                     pads=pads, dtype=dtype)
            k = kernel if len(parts) == 1 else kernel[..., start:start + c, :]
            term = conv3d(part.astype(dtype), k.astype(dtype), self.strides,
                          self.kernel_dilation, pads, formulation)
            y = term if y is None else y + term
            start += c
        return y if bias is None else y + bias.astype(dtype)


class UpConv3D(nn.Module):
    """Drop-in for ``nn.ConvTranspose(features, factor, strides=factor, padding="VALID")``:
    the non-overlapping up-sampling of the VNet decoder. Same ``kernel``
    [fd, fh, fw, C, F] (and ``bias``). ``formulation``: "auto" (:func:`choose_transpose`:
    ``tapwise`` or ``matmul`` on the CPU, ``plain`` elsewhere) or one of
    :data:`TRANSPOSE_FORMULATIONS`.
    """

    features: int
    factor: Sequence[int]
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.linear.default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()
    formulation: str = "auto"

    @nn.compact
    def __call__(self, x):
        if x.ndim != 5:
            raise ValueError(f"UpConv3D expects [B, D, H, W, C], got shape {x.shape}")
        factor = tuple(self.factor)
        kernel, bias, dtype = _kernel_and_bias(self, x, factor)
        formulation = self.formulation
        if formulation == "auto":
            formulation = choose_transpose(x.shape[1:4], factor, self.features)
        y = conv_transpose3d(x.astype(dtype), kernel.astype(dtype), factor, formulation)
        return y if bias is None else y + bias.astype(dtype)
