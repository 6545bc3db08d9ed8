"""The 3D-RADNet classifier: encoder → pooled embedding → dense → five heads.

Paper (section 2.2): a 3D ResNet50, a fully connected layer of 1000 units with
ReLU, then five branches: sequence, view and contrast (softmax), coverage
(sigmoid per region), slice spacing (linear). The heads emit logits; the
softmax/sigmoid live in the losses and metrics. Head sizes come from
``radnet.labels.HEAD_SIZES``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from radnet import labels
from radnet.models import common
from radnet.models.resnet3d import ResNet3D


class RadNetHeads(nn.Module):
    """``embedding [B, C]`` → ``{"sequence": [B,5], …, "slice_spacing": [B]}`` (float32).

    Computed in float32 whatever the encoder's compute dtype: it is a tiny
    fraction of the FLOPs and keeps the logits and the spacing regression exact.
    """

    hidden: int = 1000

    @nn.compact
    def __call__(self, embedding, extra=None):
        dense = lambda n, name: nn.Dense(n, dtype=jnp.float32, param_dtype=jnp.float32, name=name)
        features = embedding.astype(jnp.float32)
        if extra is not None:  # e.g. the intensity histogram (RadNet.intensity_bins)
            features = jnp.concatenate([features, extra.astype(jnp.float32)], axis=-1)
        h = nn.relu(dense(self.hidden, "hidden")(features))
        out = {head: dense(size, head)(h) for head, size in labels.HEAD_SIZES.items()}
        for head in labels.REGRESSION_HEADS:
            out[head] = out[head][..., 0]  # [B, 1] → [B]: one value per volume
        return out


class RadNet(nn.Module):
    """3D-RADNet: :class:`ResNet3D` (``encoder``) + :class:`RadNetHeads` (``heads``).

    ``__call__(x [B, D, H, W, C], train) -> dict`` of float32 logits (spacing in mm).
    Encoder attributes are documented on :class:`ResNet3D`.
    """

    depth: int = 50
    variant: str = "radnet"
    norm: str = "batch"
    width: int = 64
    hidden: int = 1000
    dtype: Any = "float32"
    dilated: bool = False
    frozen_stages: Sequence[str] = ()
    bn_momentum: float = common.BN_MOMENTUM
    intensity_bins: int = 0

    @nn.compact
    def __call__(self, x, train: bool):
        extra = intensity_histogram(x, self.intensity_bins) if self.intensity_bins else None
        embedding, _ = ResNet3D(depth=self.depth, variant=self.variant, norm=self.norm,
                                width=self.width, dtype=self.dtype, dilated=self.dilated,
                                frozen_stages=self.frozen_stages,
                                bn_momentum=self.bn_momentum, name="encoder")(x, train)
        return RadNetHeads(hidden=self.hidden, name="heads")(embedding, extra)


# The histogram's shares as log(share + floor), scaled so that share 0 → −1 and 1 → ~+1.
HISTOGRAM_FLOOR = 1e-3
HISTOGRAM_HALF_RANGE = -math.log(HISTOGRAM_FLOOR) / 2.0


def intensity_histogram(x, bins: int):
    """``x [B, D, H, W, 1]`` in [0, 1] → ``[B, bins]``: the logarithm of the share of
    voxels near each of ``bins`` evenly spaced grey levels, scaled to [−1, 1] (triangular
    bins: a voxel splits between its two nearest centres).

    An input to the heads beside the pooled embedding when ``RadNet.intensity_bins`` > 0:
    in CT, contrast enhancement is a few per cent of the voxels (blood, enhancing organs)
    moved up the grey scale, a whole-volume statistic that a convolutional encoder trained
    on a few hundred series tends to memorise series by rather than learn (docs/predict.md).
    No parameters, no gradient to the input; the logarithm lifts the small shares that
    carry the signal (a square root did not help on the demo: docs/models.md).
    XLA fuses the broadcast into the reduction, so the [B, D, H, W, bins] array is never
    stored.
    """
    x = jax.lax.stop_gradient(x.astype(jnp.float32))[..., 0]
    centres = (jnp.arange(bins, dtype=jnp.float32) + 0.5) / bins
    weight = jnp.maximum(0.0, 1.0 - jnp.abs(x[..., None] - centres) * bins)
    share = jnp.mean(weight, axis=tuple(range(1, x.ndim)))
    return jnp.log(share + HISTOGRAM_FLOOR) / HISTOGRAM_HALF_RANGE + 1.0
