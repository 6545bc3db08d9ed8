"""The 3D-RADNet classifier: encoder → pooled embedding → dense → five heads.

Paper (section 2.2): a 3D ResNet50, a fully connected layer of 1000 units with
ReLU, then five branches: sequence, view and contrast (softmax), coverage
(sigmoid per region), slice spacing (linear). The heads emit logits; the
softmax/sigmoid live in the losses and metrics. Head sizes come from
``radnet.labels.HEAD_SIZES``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
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
    def __call__(self, embedding):
        dense = lambda n, name: nn.Dense(n, dtype=jnp.float32, param_dtype=jnp.float32, name=name)
        h = nn.relu(dense(self.hidden, "hidden")(embedding.astype(jnp.float32)))
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

    @nn.compact
    def __call__(self, x, train: bool):
        embedding, _ = ResNet3D(depth=self.depth, variant=self.variant, norm=self.norm,
                                width=self.width, dtype=self.dtype, dilated=self.dilated,
                                frozen_stages=self.frozen_stages,
                                bn_momentum=self.bn_momentum, name="encoder")(x, train)
        return RadNetHeads(hidden=self.hidden, name="heads")(embedding)
