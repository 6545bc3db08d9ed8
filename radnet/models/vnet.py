"""VNet-style segmentation network on the 3D ResNet encoder.

Milletari et al. 2016 (V-Net), as used by 3D-RADNet for the liver transfer:
the encoder's stage feature maps are the skip connections; each decoder level
up-samples with a transposed convolution (kernel = stride = the ratio of the two
stages' strides), concatenates the skip, and applies two 3×3×3 convs with a
residual connection. A last level returns to input resolution (its skip is
the input itself) and a 1×1×1 conv gives per-voxel logits.

The encoder is the same :class:`ResNet3D` module under the same name
(``encoder``) as in :class:`radnet.models.heads.RadNet`, so the pretrained
``params["encoder"]`` and ``batch_stats["encoder"]`` drop in unchanged.

Frozen encoder: set ``frozen_stages=("stem", "block1", …)``: those stages'
batch norms then run on their running averages (and leave them untouched)
while the decoder's norms train. Freezing the parameters themselves is done
in the optimizer (e.g. ``optax.multi_transform`` with ``set_to_zero`` on the
frozen subtrees).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from radnet.models import common, conv, resnet3d

# Decoder levels from deep to shallow: (module name, skip stage, width multiple).
DECODER_LEVELS: tuple[tuple[str, str, int], ...] = (
    ("up3", "block3", 8),
    ("up2", "block2", 4),
    ("up1", "block1", 2),
    ("up0", "stem", 1),
)


# The top level's skip is the network's input (1 channel, no gradient): its conv1 runs as
# two convolutions summed rather than one over a 17-channel concatenation, on the CPU
# (VNet step 0.298 vs 0.308 s, in-process A/B: docs/performance.md).
SPLIT_INPUT_SKIP = True


def total_stride(variant: str = "radnet", dilated: bool = False) -> tuple[int, int, int]:
    """(D, H, W) stride of the deepest feature map: input sizes must be multiples of it."""
    return resnet3d.stage_strides(variant, dilated)["block4"]


def check_input_shape(spatial: Sequence[int], variant: str = "radnet", dilated: bool = False):
    """Raises ValueError unless every spatial size is a multiple of the total stride.

    Why: the skips must line up exactly with the up-sampled maps; a size that
    is not a multiple would be rounded by the strided layers and could not be
    restored to the input size.
    """
    stride = total_stride(variant, dilated)
    bad = [(axis, n, s) for axis, n, s in zip("DHW", spatial, stride) if n % s]
    if bad:
        detail = "; ".join(f"{axis}={n} is not a multiple of {s}" for axis, n, s in bad)
        nearest = tuple(-(-n // s) * s for n, s in zip(spatial, stride))
        raise ValueError(
            f"VNet input [D, H, W] = {tuple(spatial)} must be a multiple of the encoder's total "
            f"stride {stride} (variant={variant!r}, dilated={dilated}): {detail}. "
            f"Pad or crop the volume, e.g. to {nearest}.")


class UpLevel(nn.Module):
    """Up-sample ``x`` by ``factor``, concatenate ``skip``, two convs, residual sum.

    ``x [B, d, h, w, C]``, ``skip [B, d·fd, h·fh, w·fw, C_skip]`` →
    ``[B, d·fd, h·fh, w·fw, features]``.
    """

    features: int
    factor: Sequence[int]
    norm: str = "batch"
    dtype: Any = "float32"
    bn_momentum: float = common.BN_MOMENTUM
    split_skip: bool = False

    @nn.compact
    def __call__(self, x, skip, train: bool):
        dtype = common.compute_dtype(self.dtype)
        factor = common.triple(self.factor)
        norm = lambda name: common.make_norm(self.norm, train, name=name, dtype=dtype,
                                             momentum=self.bn_momentum)
        # Conv3D / UpConv3D: the parameters of nn.Conv / nn.ConvTranspose, formulations
        # fast on XLA:CPU (radnet/models/conv.py).
        conv3 = lambda name: conv.Conv3D(self.features, (3, 3, 3), padding="SAME",
                                         use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                                         kernel_init=common.conv_init, name=name)
        up = conv.UpConv3D(self.features, factor, use_bias=False, dtype=dtype,
                           param_dtype=jnp.float32, kernel_init=common.conv_init,
                           name="upconv")(x)
        up = nn.relu(norm("upnorm")(up))
        if up.shape[1:4] != skip.shape[1:4]:
            raise ValueError(f"decoder level: up-sampled map {up.shape[1:4]} does not match "
                             f"its skip {skip.shape[1:4]}")
        if self.split_skip:
            # conv1 over [up, skip] as two convolutions summed: same kernel, no concatenation,
            # and no input gradient for a skip that needs none (the network's input).
            y = conv3("conv1")(up, skip.astype(dtype))
        else:
            y = conv3("conv1")(jnp.concatenate([up, skip.astype(dtype)], axis=-1))
        y = nn.relu(norm("norm1")(y))
        y = norm("norm2")(conv3("conv2")(y))
        return nn.relu(y + up)


class VNet(nn.Module):
    """Encoder (``encoder``) + VNet decoder (``decoder``).

    ``__call__(x [B, D, H, W, C], train) -> logits [B, D, H, W, num_classes]``
    (float32). D, H, W must be multiples of :func:`total_stride` (radnet
    variant: (16, 32, 32)); otherwise a ValueError says which axis and the
    nearest valid size.

    Attributes beyond the encoder's (see :class:`ResNet3D`): ``num_classes``;
    ``decoder_width``: channels of the finest decoder levels, ×2, ×4, ×8 going
    deeper (16 as in V-Net). ``hidden`` is accepted and ignored so one model
    config can serve the classifier and the segmenter.
    """

    depth: int = 50
    variant: str = "radnet"
    norm: str = "batch"
    width: int = 64
    num_classes: int = 2
    decoder_width: int = 16
    dtype: Any = "float32"
    dilated: bool = False
    frozen_stages: Sequence[str] = ()
    bn_momentum: float = common.BN_MOMENTUM
    hidden: int | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        if x.ndim != 5:
            raise ValueError(f"VNet expects [B, D, H, W, C] input, got shape {x.shape}")
        resnet3d.check_config(self.depth, self.variant, self.norm, self.dilated,
                              self.frozen_stages)
        check_input_shape(x.shape[1:4], self.variant, self.dilated)
        _, features = resnet3d.ResNet3D(
            depth=self.depth, variant=self.variant, norm=self.norm, width=self.width,
            dtype=self.dtype, dilated=self.dilated, frozen_stages=self.frozen_stages,
            bn_momentum=self.bn_momentum, name="encoder")(x, train)
        return VNetDecoder(num_classes=self.num_classes, width=self.decoder_width,
                           variant=self.variant, dilated=self.dilated, norm=self.norm,
                           dtype=self.dtype, bn_momentum=self.bn_momentum,
                           name="decoder")(x, features, train)


class VNetDecoder(nn.Module):
    """Stage features (+ the input as the finest skip) → logits ``[B, D, H, W, num_classes]``."""

    num_classes: int
    width: int = 16
    variant: str = "radnet"
    dilated: bool = False
    norm: str = "batch"
    dtype: Any = "float32"
    bn_momentum: float = common.BN_MOMENTUM

    @nn.compact
    def __call__(self, x, features, train: bool):
        strides = resnet3d.stage_strides(self.variant, self.dilated)
        shared = dict(norm=self.norm, dtype=self.dtype, bn_momentum=self.bn_momentum)
        h, deeper = features["block4"], "block4"
        for name, skip, multiple in DECODER_LEVELS:
            factor = tuple(a // b for a, b in zip(strides[deeper], strides[skip]))
            h = UpLevel(self.width * multiple, factor, name=name, **shared)(
                h, features[skip], train)
            deeper = skip
        # On the CPU only (conv.py's rule: elsewhere the plain layers).
        split = SPLIT_INPUT_SKIP and conv.rewrites_allowed()
        h = UpLevel(self.width, strides["stem"], name="top", split_skip=split,
                    **shared)(h, x, train)
        logits = conv.Conv3D(self.num_classes, (1, 1, 1), dtype=jnp.float32,
                             param_dtype=jnp.float32, name="logits")(h.astype(jnp.float32))
        return logits
