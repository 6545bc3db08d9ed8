"""Building blocks shared by the encoders and decoders: dtypes, norms, conv padding.

Shapes follow the channels-last layout of the whole project: activations are
``[B, D, H, W, C]`` and convolution kernels ``[kD, kH, kW, C_in, C_out]``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

NORMS: tuple[str, ...] = ("batch", "group")

# Batch-norm defaults follow PyTorch/MedicalNet (running = 0.9 running + 0.1 batch,
# eps 1e-5) rather than Keras (0.99, 1e-3): 3D batches are small, so running
# statistics must track the weights quickly enough to be usable in evaluation.
BN_MOMENTUM = 0.9
NORM_EPSILON = 1e-5
GROUP_NORM_GROUPS = 32

# He-normal over fan-out: the usual ResNet initialisation (variance kept through
# the ReLUs of a deep stack).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def compute_dtype(dtype: Any) -> jnp.dtype:
    """Config dtype (a string such as ``"bfloat16"``, or a dtype) → jnp dtype."""
    if isinstance(dtype, str):
        allowed = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
        if dtype not in allowed:
            raise ValueError(f"unknown compute dtype {dtype!r}; use one of {sorted(allowed)}")
        return jnp.dtype(allowed[dtype])
    return jnp.dtype(dtype)


def triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    """An int or a 3-sequence → a (D, H, W) tuple."""
    if isinstance(value, int):
        return (value, value, value)
    out = tuple(int(v) for v in value)
    if len(out) != 3:
        raise ValueError(f"expected 3 values (D, H, W), got {value!r}")
    return out  # type: ignore[return-value]


def conv_padding(kernel: Sequence[int], dilation: Sequence[int], mode: str):
    """Padding argument for ``nn.Conv``.

    ``"same"``: TensorFlow/Keras SAME (the 3D-RADNet reference code); for a
    stride-2 layer on an even size the extra padded row goes at the end.
    ``"symmetric"``: PyTorch style, ``dilation * (k // 2)`` on both sides (the
    MedicalNet/MONAI convention, so their weights line up voxel for voxel).
    Both give an output size of ``ceil(n / stride)`` for odd kernels.
    """
    if mode == "same":
        return "SAME"
    if mode == "symmetric":
        return [(d * (k // 2), d * (k // 2)) for k, d in zip(kernel, dilation)]
    raise ValueError(f"unknown padding mode {mode!r}; use 'same' or 'symmetric'")


def group_count(channels: int) -> int:
    """Groups of group norm: the largest divisor of ``channels`` ≤ 32 that leaves
    at least 2 channels per group (32 for every layer of a width-64 network).

    Why not one channel per group for narrow layers: on a deep feature map
    reduced to 1×1×1 voxel a single-channel group normalises to exactly 0 and
    passes no signal or gradient.
    """
    if channels < 2:
        return 1
    return max(g for g in range(1, min(GROUP_NORM_GROUPS, channels // 2) + 1)
               if channels % g == 0)


def make_norm(kind: str, train: bool, *, name: str, dtype: Any,
              momentum: float = BN_MOMENTUM) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """A normalisation layer over the channel axis, created in the caller's scope.

    ``kind="batch"``: statistics in the ``batch_stats`` collection, batch
    statistics when ``train`` else running averages. ``kind="group"``:
    per-sample statistics (no ``batch_stats``) over :func:`group_count` groups;
    better than batch norm for the 1–2 volumes per device of 3D training.
    """
    if kind == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=momentum,
                            epsilon=NORM_EPSILON, dtype=dtype, name=name)
    if kind == "group":
        def group_norm(x):
            groups = group_count(x.shape[-1])
            return nn.GroupNorm(num_groups=groups, epsilon=NORM_EPSILON, dtype=dtype,
                                name=name)(x)
        return group_norm
    raise ValueError(f"unknown norm {kind!r}; use one of {NORMS}")
