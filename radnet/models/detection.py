"""Universal lesion detector: the radnet encoder on a slab of CT slices + an anchor-free
dense head (CenterNet-style: Zhou et al. 2019, "Objects as points").

Input ``[B, S, H, W, C]``: the key slice and its context slices (S = 2k+1, 3DCE-style, Yan
et al. 2018), in-plane resampled to a fixed mm per pixel. The encoder is radnet's 3D
ResNet (variant ``radnet``) under the same parameter names (``encoder/stem``,
``encoder/block1`` … ``encoder/block4``), so a pretrained encoder drops in unchanged; the
only difference from ``ResNet3D.__call__`` is the max-pooling, which halves the slice
axis only while it has at least 2 slices (a 3-slice slab is fused into one after the stem,
where ResNet3D's pooling would leave 0 slices) and always halves the rows and columns.
Each stage's map is averaged over its remaining slices; a top-down path (1×1 lateral
convs, nearest up-sampling, sum; FPN-style) brings block4 … block1 to block1's stride
(4 pixels), and the head predicts per cell:

    heatmap  [B, H/4, W/4, 1]   logit of "a lesion centre is here" (focal loss)
    size     [B, H/4, W/4, 2]   log of the box width and height in cells
    offset   [B, H/4, W/4, 2]   sub-cell position of the centre, in cells

radnet.detection.decode turns them into boxes; radnet/train/detect.py trains them.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from radnet.models import common, resnet3d

STRIDE = 4          # block1's in-plane stride: stem (2) × the pool after it (2)
HEAT_PRIOR = 0.01   # initial heatmap probability (the focal-loss bias init of RetinaNet)


class SlabEncoder(nn.Module):
    """``[B, S, H, W, C]`` → ``{"stem", "block1" … "block4"}`` feature maps, parameters named
    as :class:`radnet.models.ResNet3D`'s (``radnet`` variant)."""

    depth: int = 50
    norm: str = "batch"
    width: int = 64
    dtype: Any = "float32"
    frozen_stages: Sequence[str] = ()
    bn_momentum: float = common.BN_MOMENTUM

    @nn.compact
    def __call__(self, x, train: bool):
        resnet3d.check_config(self.depth, "radnet", self.norm, False, self.frozen_stages)
        kind, units = resnet3d.DEPTHS[self.depth]
        stage_train = {s: bool(train) and s not in self.frozen_stages for s in resnet3d.STAGES}
        shared = dict(norm=self.norm, dtype=self.dtype, bn_momentum=self.bn_momentum)

        def pool(t):
            d = 2 if t.shape[1] >= 2 else 1
            return nn.max_pool(t, (d, 2, 2), strides=(d, 2, 2), padding="VALID")

        features = {}
        h = resnet3d.Stem(variant="radnet", width=self.width, name="stem", **shared)(
            x, stage_train["stem"])
        features["stem"] = h
        h = pool(h)
        for i, name in enumerate(resnet3d.STAGES[1:]):
            if i > 0:
                h = pool(h)
            if 0 in h.shape[1:4]:
                raise ValueError(f"slab {tuple(x.shape[1:4])} is too small: {name} gets "
                                 f"{tuple(h.shape[1:4])}; rows and columns need ≥ 64 pixels")
            h = resnet3d.Stage(kind=kind, num_units=units[i], features=self.width * 2 ** i,
                               preact=True, post_norm=name == "block4", padding_mode="same",
                               name=name, **shared)(h, stage_train[name])
            features[name] = h
        return features


class LesionDetector(nn.Module):
    """Encoder (``encoder``) + top-down neck and CenterNet head (``head``).

    ``__call__(x [B, S, H, W, C], train) -> {"heatmap", "size", "offset"}`` (float32,
    shapes in the module docstring). H and W must be multiples of 64 (block4's stride);
    ``hidden`` is accepted and ignored, so a pretraining run's model fields can be passed.
    """

    depth: int = 50
    variant: str = "radnet"
    norm: str = "batch"
    width: int = 64
    dtype: Any = "float32"
    frozen_stages: Sequence[str] = ()
    bn_momentum: float = common.BN_MOMENTUM
    neck_width: int = 64
    head_width: int = 64
    hidden: int | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        if x.ndim != 5:
            raise ValueError(f"LesionDetector expects [B, S, H, W, C] input, got {x.shape}")
        if self.variant != "radnet":
            raise ValueError(f"LesionDetector supports the radnet encoder variant, not "
                             f"{self.variant!r}")
        if x.shape[2] % 64 or x.shape[3] % 64:
            raise ValueError(f"slab rows and columns {tuple(x.shape[2:4])} must be multiples "
                             "of 64 (the encoder's in-plane stride); pad or resize the slab")
        features = SlabEncoder(depth=self.depth, norm=self.norm, width=self.width,
                               dtype=self.dtype, frozen_stages=self.frozen_stages,
                               bn_momentum=self.bn_momentum, name="encoder")(x, train)
        return DetectionHead(neck_width=self.neck_width, head_width=self.head_width,
                             norm=self.norm, dtype=self.dtype, bn_momentum=self.bn_momentum,
                             name="head")(features, train)


class DetectionHead(nn.Module):
    neck_width: int = 64
    head_width: int = 64
    norm: str = "batch"
    dtype: Any = "float32"
    bn_momentum: float = common.BN_MOMENTUM

    @nn.compact
    def __call__(self, features, train: bool):
        dtype = common.compute_dtype(self.dtype)
        conv = lambda f, k, name, **kw: nn.Conv(f, (k, k), padding="SAME", dtype=dtype,
                                                param_dtype=jnp.float32, name=name, **kw)
        top = None
        for name in ("block4", "block3", "block2", "block1"):
            f = jnp.mean(features[name].astype(dtype), axis=1)      # slices → [B, h, w, C]
            lateral = conv(self.neck_width, 1, f"lateral_{name}")(f)
            if top is not None:
                b, h, w, c = lateral.shape
                top = jax.image.resize(top, (b, h, w, c), "nearest")
                lateral = lateral + top
            top = lateral
        y = conv(self.neck_width, 3, "smooth", use_bias=False)(top)
        y = nn.relu(common.make_norm(self.norm, train, name="smooth_norm", dtype=dtype,
                                     momentum=self.bn_momentum)(y))
        out = {}
        prior = -jnp.log((1 - HEAT_PRIOR) / HEAT_PRIOR)
        for name, channels in (("heatmap", 1), ("size", 2), ("offset", 2)):
            t = nn.relu(conv(self.head_width, 3, f"{name}_conv")(y))
            bias_init = (nn.initializers.constant(prior) if name == "heatmap"
                         else nn.initializers.zeros)
            out[name] = conv(channels, 1, f"{name}_out", bias_init=bias_init)(t).astype(
                jnp.float32)
        return out
