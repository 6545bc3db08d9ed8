"""Slice-group classifier: the radnet encoder on a slab + a sector-conditioned head.

``SliceGroupNet(x [B, D, H, W, C], sector [B] int, train) -> logits [B, 3]`` (float32;
non-nodule / benign / malignant). The encoder (``encoder``, a :class:`ResNet3D`, so a
pretraining run's encoder restores into it) embeds the slab; the head (``head``) is

- ``embedding``: one MLP over [embedding, learned sector embedding] — the sectors share
  what they have in common and the sector shifts the decision;
- ``per_sector``: one linear classifier per sector on a shared hidden layer, each sector
  trained only by its own groups — the report's independent per-sector models (with the
  encoder shared instead of one ResNet per sector).

The slab's embedding is ``pool`` over the encoder's block4 map: ``mean`` (the encoder's own
embedding), or ``meanmax`` (mean and maximum side by side: a nodule fills a few voxels of a
slab, and the spatial maximum keeps it from being averaged away), layer-normalised.

``sector=None`` means sector 0 (the trainer initialises the model from an image alone).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from radnet.models import common
from radnet.models.resnet3d import ResNet3D

HEADS = ("embedding", "per_sector")
POOLS = ("mean", "meanmax")
NUM_CLASSES = 3


class SectorHead(nn.Module):
    head: str = "embedding"
    sector_num: int = 5
    sector_dim: int = 16
    hidden: int = 128

    @nn.compact
    def __call__(self, embedding, sector):
        dense = lambda n, name: nn.Dense(n, dtype=jnp.float32, param_dtype=jnp.float32, name=name)
        h = embedding.astype(jnp.float32)
        if self.head == "embedding":
            e = nn.Embed(self.sector_num, self.sector_dim, name="sector_embedding")(sector)
            h = nn.relu(dense(self.hidden, "hidden")(jnp.concatenate([h, e], axis=-1)))
            return dense(NUM_CLASSES, "logits")(h)
        if self.head == "per_sector":
            h = nn.relu(dense(self.hidden, "hidden")(h))
            all_logits = dense(NUM_CLASSES * self.sector_num, "logits")(h)
            all_logits = all_logits.reshape(*h.shape[:-1], self.sector_num, NUM_CLASSES)
            return jnp.take_along_axis(all_logits, sector[:, None, None], axis=1)[:, 0]
        raise ValueError(f"head={self.head!r}; choose one of {HEADS}")


class SliceGroupNet(nn.Module):
    depth: int = 50
    variant: str = "radnet"
    norm: str = "batch"
    width: int = 64
    dtype: Any = "float32"
    dilated: bool = False
    frozen_stages: Sequence[str] = ()
    bn_momentum: float = common.BN_MOMENTUM
    head: str = "embedding"
    sector_num: int = 5
    sector_dim: int = 16
    hidden: int = 128
    pool: str = "meanmax"

    @nn.compact
    def __call__(self, x, sector=None, train: bool = False):
        if sector is None:
            sector = jnp.zeros((x.shape[0],), jnp.int32)
        embedding, features = ResNet3D(depth=self.depth, variant=self.variant, norm=self.norm,
                                width=self.width, dtype=self.dtype, dilated=self.dilated,
                                frozen_stages=self.frozen_stages,
                                bn_momentum=self.bn_momentum, name="encoder")(x, train)
        if self.pool == "meanmax":
            top = jnp.max(features["block4"].astype(jnp.float32), axis=(1, 2, 3))
            embedding = jnp.concatenate([embedding, top], axis=-1)
        elif self.pool != "mean":
            raise ValueError(f"pool={self.pool!r}; choose one of {POOLS}")
        # The spatial maximum runs far larger than the mean; without a norm the first
        # steps drive the logits to confident mistakes (measured: loss ~3 at step 60).
        embedding = nn.LayerNorm(dtype=jnp.float32, param_dtype=jnp.float32,
                                 name="embedding_norm")(embedding)
        return SectorHead(self.head, self.sector_num, self.sector_dim, self.hidden,
                          name="head")(embedding, jnp.asarray(sector, jnp.int32))
