"""3D ResNet encoders: the 3D-RADNet variant (default) and a MedicalNet-style variant.

Input ``[B, D, H, W, C]`` (C = 1 for CT/MR). The encoder returns the pooled
embedding ``[B, C_out]`` (float32) and the feature map of every stage, keyed
``stem``, ``block1`` … ``block4``, which the VNet decoder uses as skips.

Parameter tree (identical wherever the encoder is used, so pretrained weights
drop in by name)::

    encoder/stem/{conv,norm}
    encoder/block{1..4}/unit{1..n}/{norm1,conv1,…,shortcut_conv[,shortcut_norm]}
    encoder/block4/post_norm            (radnet variant only)

Variants
--------
``radnet`` — the network of the 3D-RADNet reference code (Du & Vardhanabhuti,
MIDL 2020; github.com/du1388/3d-radnet, Keras): stem conv (3,7,7) stride
(1,2,2) → norm → ReLU → max-pool 2; stages of pre-activation units
(norm → ReLU → conv); max-pool 2 between stages; a final norm → ReLU after the
last stage. Total stride (16, 32, 32): a 48×192×192 volume ends at 3×6×6.
Deliberate differences from that code, so the family is a standard
pre-activation ResNet (He et al. 2016, "Identity mappings"): convolutions
have no bias (a norm follows each), and the shortcut is the identity unless
the channel count changes, where it is a 1×1×1 conv of the pre-activated input
(the reference code puts a norm → ReLU → 1×1×1 conv on every shortcut).

``medicalnet`` — the Med3D/MONAI ResNet (Chen et al. 2019): stem conv 7×7×7
stride 2 → norm → ReLU → max-pool 3 stride 2; post-activation units (conv →
norm → ReLU, ReLU after the residual sum); projection shortcut (1×1×1 conv +
norm) where shape changes; stride-2 stages 2–4 (total stride 32), or with
``dilated=True`` Med3D's segmentation layout: stages 3 and 4 keep stride 1 with
dilation 2 and 4 (total stride 8). Padding is PyTorch-symmetric. Three options
reproduce every layout of MONAI's ``ResNet`` (radnet.interop converts its weights):
``stem_stride`` (MONAI's ``conv1_t_stride``: 2 as Med3D, 1 as MONAI's default),
``shortcut_bias`` (MONAI's ``bias_downsample``: a bias on the projection conv) and
``shortcut_type`` (``"B"``: projection conv + norm; ``"A"``: Med3D's parameter-free
shortcut, the input subsampled by the stride with zero channels appended). Their
defaults are the layout above, so existing parameter trees are unchanged.

Depths: 10, 18, 34 (basic units: two 3×3×3 convs) and 50, 101, 152, 200
(bottleneck units 1×1×1 → 3×3×3 → 1×1×1, ×4 output channels).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from radnet.models import common, conv

STAGES: tuple[str, ...] = ("stem", "block1", "block2", "block3", "block4")
VARIANTS: tuple[str, ...] = ("radnet", "medicalnet")

# depth → (unit kind, units per stage)
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


SHORTCUT_TYPES: tuple[str, ...] = ("B", "A")


def check_config(depth: int, variant: str, norm: str, dilated: bool = False,
                 frozen_stages: Sequence[str] = (), stem_stride: int = 2,
                 shortcut_type: str = "B", shortcut_bias: bool = False) -> None:
    """Raises a ValueError naming the bad field for an impossible encoder config."""
    if depth not in DEPTHS:
        raise ValueError(f"unsupported ResNet depth {depth!r}; use one of {sorted(DEPTHS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown ResNet variant {variant!r}; use one of {VARIANTS}")
    if norm not in common.NORMS:
        raise ValueError(f"unknown norm {norm!r}; use one of {common.NORMS}")
    if dilated and variant != "medicalnet":
        raise ValueError("dilated=True exists only for variant='medicalnet' (Med3D layout)")
    unknown = [s for s in frozen_stages if s not in STAGES]
    if unknown:
        raise ValueError(f"frozen_stages {unknown} are not encoder stages; stages are {STAGES}")
    if stem_stride not in (1, 2):
        raise ValueError(f"stem_stride={stem_stride!r}; use 1 or 2")
    if shortcut_type not in SHORTCUT_TYPES:
        raise ValueError(f"shortcut_type={shortcut_type!r}; use one of {SHORTCUT_TYPES}")
    if variant != "medicalnet" and (stem_stride, shortcut_type, shortcut_bias) != (2, "B", False):
        raise ValueError("stem_stride, shortcut_type and shortcut_bias exist only for "
                         "variant='medicalnet' (MONAI/Med3D layouts)")
    if shortcut_bias and shortcut_type != "B":
        raise ValueError("shortcut_bias=True needs shortcut_type='B' (type A has no conv)")


def stage_strides(variant: str = "radnet", dilated: bool = False,
                  stem_stride: int = 2) -> dict[str, tuple[int, int, int]]:
    """Cumulative (D, H, W) stride of each stage's feature map w.r.t. the input
    (``stem_stride``: medicalnet only)."""
    if variant == "radnet":
        stem = (1, 2, 2)
        steps = [(2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)]  # pool after stem, pools between stages
    elif variant == "medicalnet":
        stem = (stem_stride,) * 3
        late = (1, 1, 1) if dilated else (2, 2, 2)
        steps = [(2, 2, 2), (2, 2, 2), late, late]
    else:
        raise ValueError(f"unknown ResNet variant {variant!r}; use one of {VARIANTS}")
    out = {"stem": stem}
    current = stem
    for name, step in zip(STAGES[1:], steps):
        current = tuple(c * s for c, s in zip(current, step))
        out[name] = current
    return out  # type: ignore[return-value]


def output_channels(depth: int, width: int) -> int:
    """Channels of the block4 feature map and of the pooled embedding."""
    kind, _ = DEPTHS[depth]
    return 8 * width * EXPANSION[kind]


def _conv(features, kernel, *, strides=1, dilation=1, padding_mode, dtype, name, use_bias=False):
    kernel, strides, dilation = common.triple(kernel), common.triple(strides), common.triple(dilation)
    # conv.Conv3D: nn.Conv's parameters, a formulation fast on XLA:CPU (radnet/models/conv.py).
    return conv.Conv3D(features, kernel_size=kernel, strides=strides, kernel_dilation=dilation,
                       padding=common.conv_padding(kernel, dilation, padding_mode),
                       use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                       kernel_init=common.conv_init, name=name)


def _shortcut(x, features, strides, shortcut_type, shortcut_bias, conv, norm):
    """The post-activation projection shortcut. ``"B"``: 1×1×1 conv (+ bias when
    ``shortcut_bias``) → norm. ``"A"`` (Med3D resnet18/34): ``x`` subsampled by ``strides``
    (a 1×1×1 average pool) with zero channels appended up to ``features``; no parameters."""
    if shortcut_type == "A":
        sd, sh, sw = strides
        y = x[:, ::sd, ::sh, ::sw, :]
        return jnp.pad(y, ((0, 0),) * 4 + ((0, features - y.shape[-1]),))
    return norm("shortcut_norm")(conv("shortcut_conv", features, strides, shortcut_bias)(x))


class SliceFoldedConv(nn.Module):
    """A SAME conv with stride 1 along D, computed as a 2D conv over (H, W).

    The kd depth taps are folded into the input channels (kd shifted copies of the
    input), so ``[B, D, H, W, C]`` becomes ``[B·D, H, W, kd·C]`` and one 2D conv with the
    (kh, kw, kd·C, F) kernel gives the same numbers as the 3D conv. Why: XLA:CPU runs a
    3D conv with few input channels (the 1-channel stem) ~10× slower than the equal 2D
    conv. The parameter is the same ``kernel`` [kd, kh, kw, C, F] as ``nn.Conv``'s, so
    checkpoints are interchangeable.
    """

    features: int
    kernel: Sequence[int]
    strides: Sequence[int]
    dtype: Any = "float32"

    @nn.compact
    def __call__(self, x):
        kd, kh, kw = self.kernel
        sd, sh, sw = self.strides
        if sd != 1 or kd % 2 != 1:
            raise ValueError(f"depth folding needs stride 1 and an odd depth kernel, got "
                             f"kernel {tuple(self.kernel)} strides {tuple(self.strides)}")
        kernel = self.param("kernel", common.conv_init, (kd, kh, kw, x.shape[-1],
                                                         self.features), jnp.float32)
        if conv.choose(x.shape[1:4], self.kernel, self.strides, (1, 1, 1),
                       dtype=x.dtype) == "onednn":
            # oneDNN's convolution beats the folded 2D one here too (kernel gradient
            # 5×, measured on the 48×96×96 stem): same parameter, same numbers.
            return conv.conv3d(x, kernel.astype(x.dtype), self.strides, (1, 1, 1), "SAME",
                               "onednn")
        return conv.depth_folded(x, kernel.astype(x.dtype), (kd // 2, kd // 2), (sh, sw),
                                 "SAME")


class Stem(nn.Module):
    """First conv → norm → ReLU. ``[B, D, H, W, C]`` → ``[B, D/sd, H/sh, W/sw, width]``."""

    variant: str = "radnet"
    width: int = 64
    norm: str = "batch"
    dtype: Any = "float32"
    bn_momentum: float = common.BN_MOMENTUM
    stride: int = 2          # medicalnet only (MONAI's conv1_t_stride)

    @nn.compact
    def __call__(self, x, train: bool):
        dtype = common.compute_dtype(self.dtype)
        if self.variant == "radnet":
            kernel, strides, padding = (3, 7, 7), (1, 2, 2), "same"
        elif self.variant == "medicalnet":
            kernel, strides, padding = (7, 7, 7), (self.stride,) * 3, "symmetric"
        else:
            raise ValueError(f"unknown ResNet variant {self.variant!r}; use one of {VARIANTS}")
        if self.variant == "radnet":
            x = SliceFoldedConv(self.width, kernel, strides, dtype=dtype, name="conv")(
                x.astype(dtype))
        else:
            x = _conv(self.width, kernel, strides=strides, padding_mode=padding, dtype=dtype,
                      name="conv")(x.astype(dtype))
        x = common.make_norm(self.norm, train, name="norm", dtype=dtype,
                             momentum=self.bn_momentum)(x)
        return nn.relu(x)


class BasicUnit(nn.Module):
    """Two 3×3×3 convs and a shortcut; ``features`` output channels.

    ``preact=True`` (radnet): ``x + conv(relu(norm(conv(relu(norm(x))))))``.
    ``preact=False`` (medicalnet): ``relu(shortcut(x) + norm(conv(relu(norm(conv(x))))))``.
    """

    features: int
    strides: Sequence[int] | int = 1
    dilation: int = 1
    preact: bool = True
    norm: str = "batch"
    padding_mode: str = "same"
    dtype: Any = "float32"
    bn_momentum: float = common.BN_MOMENTUM
    shortcut_type: str = "B"       # post-activation (medicalnet) only
    shortcut_bias: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        dtype = common.compute_dtype(self.dtype)
        strides = common.triple(self.strides)
        needs_projection = x.shape[-1] != self.features or strides != (1, 1, 1)
        norm = lambda name: common.make_norm(self.norm, train, name=name, dtype=dtype,
                                             momentum=self.bn_momentum)
        conv = lambda name, k, s=1: _conv(self.features, k, strides=s, dilation=self.dilation,
                                          padding_mode=self.padding_mode, dtype=dtype, name=name)
        if self.preact:
            pre = nn.relu(norm("norm1")(x))
            shortcut = conv("shortcut_conv", 1, strides)(pre) if needs_projection else x
            y = conv("conv1", 3, strides)(pre)
            y = conv("conv2", 3)(nn.relu(norm("norm2")(y)))
            return shortcut + y
        y = nn.relu(norm("norm1")(conv("conv1", 3, strides)(x)))
        y = norm("norm2")(conv("conv2", 3)(y))
        shortcut = x
        if needs_projection:
            shortcut = _shortcut(
                x, self.features, strides, self.shortcut_type, self.shortcut_bias,
                lambda name, f, s, bias: _conv(f, 1, strides=s, padding_mode=self.padding_mode,
                                               dtype=dtype, name=name, use_bias=bias), norm)
        return nn.relu(shortcut + y)


class BottleneckUnit(nn.Module):
    """1×1×1 (``features``) → 3×3×3 (``features``, strided) → 1×1×1 (4·``features``) + shortcut."""

    features: int
    strides: Sequence[int] | int = 1
    dilation: int = 1
    preact: bool = True
    norm: str = "batch"
    padding_mode: str = "same"
    dtype: Any = "float32"
    bn_momentum: float = common.BN_MOMENTUM
    shortcut_type: str = "B"       # post-activation (medicalnet) only
    shortcut_bias: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        dtype = common.compute_dtype(self.dtype)
        strides = common.triple(self.strides)
        out_features = self.features * EXPANSION["bottleneck"]
        needs_projection = x.shape[-1] != out_features or strides != (1, 1, 1)
        norm = lambda name: common.make_norm(self.norm, train, name=name, dtype=dtype,
                                             momentum=self.bn_momentum)

        def conv(name, features, k, s=1, bias=False):
            # Dilation applies to the 3×3×3 conv only (Med3D), a no-op on 1×1×1 kernels.
            return _conv(features, k, strides=s, dilation=self.dilation if k == 3 else 1,
                         padding_mode=self.padding_mode, dtype=dtype, name=name, use_bias=bias)

        if self.preact:
            pre = nn.relu(norm("norm1")(x))
            shortcut = (conv("shortcut_conv", out_features, 1, strides)(pre)
                        if needs_projection else x)
            y = conv("conv1", self.features, 1)(pre)
            y = conv("conv2", self.features, 3, strides)(nn.relu(norm("norm2")(y)))
            y = conv("conv3", out_features, 1)(nn.relu(norm("norm3")(y)))
            return shortcut + y
        y = nn.relu(norm("norm1")(conv("conv1", self.features, 1)(x)))
        y = nn.relu(norm("norm2")(conv("conv2", self.features, 3, strides)(y)))
        y = norm("norm3")(conv("conv3", out_features, 1)(y))
        shortcut = x
        if needs_projection:
            shortcut = _shortcut(x, out_features, strides, self.shortcut_type, self.shortcut_bias,
                                 lambda name, f, s, bias: conv(name, f, 1, s, bias), norm)
        return nn.relu(shortcut + y)


class Stage(nn.Module):
    """``num_units`` residual units; the first one carries the stride/projection."""

    kind: str
    num_units: int
    features: int
    strides: Sequence[int] | int = 1
    dilation: int = 1
    preact: bool = True
    post_norm: bool = False
    norm: str = "batch"
    padding_mode: str = "same"
    dtype: Any = "float32"
    bn_momentum: float = common.BN_MOMENTUM
    shortcut_type: str = "B"       # post-activation (medicalnet) only
    shortcut_bias: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        unit_cls = BasicUnit if self.kind == "basic" else BottleneckUnit
        for i in range(self.num_units):
            x = unit_cls(features=self.features, strides=self.strides if i == 0 else 1,
                         dilation=self.dilation, preact=self.preact, norm=self.norm,
                         padding_mode=self.padding_mode, dtype=self.dtype,
                         bn_momentum=self.bn_momentum, shortcut_type=self.shortcut_type,
                         shortcut_bias=self.shortcut_bias, name=f"unit{i + 1}")(x, train)
        if self.post_norm:
            # Pre-activation stacks leave the last sum un-normalised; this is the
            # reference code's final norm → ReLU before pooling.
            dtype = common.compute_dtype(self.dtype)
            x = nn.relu(common.make_norm(self.norm, train, name="post_norm", dtype=dtype,
                                         momentum=self.bn_momentum)(x))
        return x


class ResNet3D(nn.Module):
    """3D ResNet encoder.

    Attributes:
      depth: 10, 18, 34, 50, 101 (also 152, 200).
      variant: ``"radnet"`` (paper, default) or ``"medicalnet"``.
      norm: ``"batch"`` (paper) or ``"group"``.
      width: base width (64 in the paper); stage widths are width × (1, 2, 4, 8)
        (× 4 output channels for bottlenecks).
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"``; parameters are
        always float32 and the pooled embedding is returned in float32.
      dilated: medicalnet only, Med3D's stride-1 dilated stages 3 and 4.
      frozen_stages: stage names (``stem``, ``block1`` …) whose batch norm always
        uses its running averages and never updates them, even when
        ``train=True``: the inference-mode batch norm of a frozen pretrained
        encoder inside a model whose other layers train. (The optimizer must
        also leave those parameters alone; that is the trainer's job.)
      bn_momentum: running-average momentum of batch norm.
      stem_stride, shortcut_type, shortcut_bias: medicalnet only, the MONAI ``ResNet``
        arguments ``conv1_t_stride``, ``shortcut_type`` and ``bias_downsample``
        (defaults: Med3D's 2, "B", False; docs/interop.md).

    ``__call__(x [B, D, H, W, C], train) -> (embedding [B, C_out] float32,
    {"stem": …, "block1": …, …, "block4": …})`` with feature maps
    ``[B, D/sd, H/sh, W/sw, C_stage]`` in the compute dtype (strides from
    :func:`stage_strides`).
    """

    depth: int = 50
    variant: str = "radnet"
    norm: str = "batch"
    width: int = 64
    dtype: Any = "float32"
    dilated: bool = False
    frozen_stages: Sequence[str] = ()
    bn_momentum: float = common.BN_MOMENTUM
    stem_stride: int = 2
    shortcut_type: str = "B"
    shortcut_bias: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        check_config(self.depth, self.variant, self.norm, self.dilated, self.frozen_stages,
                     self.stem_stride, self.shortcut_type, self.shortcut_bias)
        if x.ndim != 5:
            raise ValueError(f"ResNet3D expects [B, D, H, W, C] input, got shape {x.shape}")
        kind, units = DEPTHS[self.depth]
        stage_train = {s: bool(train) and s not in self.frozen_stages for s in STAGES}
        shared = dict(norm=self.norm, dtype=self.dtype, bn_momentum=self.bn_momentum)

        features = {}
        h = Stem(variant=self.variant, width=self.width, stride=self.stem_stride, name="stem",
                 **shared)(
            x, stage_train["stem"])
        features["stem"] = h
        radnet = self.variant == "radnet"
        if radnet:
            # Reference code: MaxPool3D(2) 'valid' after the stem and between stages.
            # conv.max_pool: nn.max_pool, with a gradient fast on XLA:CPU.
            pool = lambda t: conv.max_pool(t, (2, 2, 2), (2, 2, 2), "VALID")
        else:
            pool = lambda t: nn.max_pool(t, (3, 3, 3), strides=(2, 2, 2),
                                         padding=((1, 1), (1, 1), (1, 1)))
        h = pool(h)
        for i, name in enumerate(STAGES[1:]):
            if radnet:
                if i > 0:
                    h = pool(h)
                strides, dilation = 1, 1
            elif self.dilated and i >= 2:
                strides, dilation = 1, 2 ** (i - 1)  # block3: 2, block4: 4 (Med3D)
            else:
                strides, dilation = (1 if i == 0 else 2), 1
            h = Stage(kind=kind, num_units=units[i], features=self.width * 2 ** i,
                      strides=strides, dilation=dilation, preact=radnet,
                      post_norm=radnet and name == "block4",
                      padding_mode="same" if radnet else "symmetric",
                      shortcut_type=self.shortcut_type, shortcut_bias=self.shortcut_bias,
                      name=name, **shared)(h, stage_train[name])
            features[name] = h
            if 0 in h.shape[1:4]:
                # 'valid' pooling of an axis of size 1 leaves 0 voxels: the mean would be NaN.
                total = stage_strides(self.variant, self.dilated, self.stem_stride)["block4"]
                raise ValueError(
                    f"input (D, H, W) = {tuple(x.shape[1:4])} is too small for this encoder: "
                    f"{name} is left with {tuple(h.shape[1:4])} voxels; each axis needs at "
                    f"least its total stride {total}")
        embedding = jnp.mean(h.astype(jnp.float32), axis=(1, 2, 3))
        return embedding, features
