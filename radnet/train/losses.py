"""The 3D-RADNet multitask loss and its per-head statistics.

Paper (MIDL 2020, 2.2): softmax cross-entropy for sequence, view and contrast, sigmoid
cross-entropy for the coverage regions, root-mean-squared error for the slice spacing.
Labels that could not be mined are -1 (NaN for the spacing) and are masked out, so a
series with an unknown contrast still teaches the other heads.

Everything here is a pure jnp function of ``[B, ...]`` arrays; the sums and counts are
returned separately so that evaluation can add them across batches and processes
before dividing (a padded last batch then counts each real sample exactly once).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from radnet import labels


def head_statistics(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                    sample_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Per-head sums and counts over the valid samples of one batch.

    Args:
      outputs: model outputs, ``{"sequence": [B, 5], "view": [B, 3], "contrast": [B, 2],
        "coverage": [B, 9], "slice_spacing": [B]}`` (logits; spacing in mm).
      batch: labels, ``sequence/view/contrast`` int [B] (-1 unknown), ``coverage``
        int [B, 9] (-1 unknown), ``effective_spacing_mm`` float [B] (NaN unknown).
      sample_mask: bool [B]; False for padding rows (evaluation), None = all real.

    Returns:
      ``{f"{head}/loss_sum", f"{head}/count", f"{head}/correct"}`` for the class heads;
      coverage: ``loss_sum`` and ``count`` over known (sample, region) entries,
      ``exact`` / ``exact_count`` over samples with all regions known;
      slice_spacing: ``sq_err_sum``, ``abs_err_sum`` (mm) and ``count``.
    """
    first = next(iter(outputs.values()))
    if sample_mask is None:
        sample_mask = jnp.ones(first.shape[0], bool)
    sample_mask = sample_mask.astype(bool)
    stats = {}
    for head in labels.CLASS_HEADS:
        logits = outputs[head].astype(jnp.float32)
        target = batch[head].astype(jnp.int32)
        valid = sample_mask & (target >= 0)
        safe = jnp.where(valid, target, 0)
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
        stats[f"{head}/loss_sum"] = jnp.sum(jnp.where(valid, xent, 0.0))
        stats[f"{head}/count"] = jnp.sum(valid).astype(jnp.float32)
        hit = jnp.argmax(logits, axis=-1) == safe
        stats[f"{head}/correct"] = jnp.sum(valid & hit).astype(jnp.float32)

    logits = outputs["coverage"].astype(jnp.float32)
    target = batch["coverage"].astype(jnp.int32)
    valid = sample_mask[:, None] & (target >= 0)
    bce = optax.sigmoid_binary_cross_entropy(logits, jnp.clip(target, 0, 1).astype(jnp.float32))
    stats["coverage/loss_sum"] = jnp.sum(jnp.where(valid, bce, 0.0))
    stats["coverage/count"] = jnp.sum(valid).astype(jnp.float32)
    row_known = jnp.all(valid, axis=-1)
    row_exact = jnp.all((logits > 0) == (target == 1), axis=-1)
    stats["coverage/exact"] = jnp.sum(row_known & row_exact).astype(jnp.float32)
    stats["coverage/exact_count"] = jnp.sum(row_known).astype(jnp.float32)

    pred_mm = outputs["slice_spacing"].astype(jnp.float32).reshape(-1)
    true_mm = batch[labels.SLICE_SPACING_TARGET].astype(jnp.float32)
    valid = sample_mask & jnp.isfinite(true_mm)
    err_mm = jnp.where(valid, pred_mm - jnp.where(valid, true_mm, 0.0), 0.0)
    stats["slice_spacing/sq_err_sum"] = jnp.sum(err_mm ** 2)
    stats["slice_spacing/abs_err_sum"] = jnp.sum(jnp.abs(err_mm))
    stats["slice_spacing/count"] = jnp.sum(valid).astype(jnp.float32)
    return stats


def _safe_div(num, den):
    return jnp.where(den > 0, num / jnp.maximum(den, 1.0), 0.0)


def head_losses(stats: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-head losses from summed statistics: mean cross-entropies and the spacing RMSE (mm).

    A head with no labelled sample in the batch has loss 0 (and no gradient), not NaN.
    """
    out = {}
    for head in tuple(labels.CLASS_HEADS) + tuple(labels.MULTILABEL_HEADS):
        out[head] = _safe_div(stats[f"{head}/loss_sum"], stats[f"{head}/count"])
    count = stats["slice_spacing/count"]
    mse = _safe_div(stats["slice_spacing/sq_err_sum"], count)
    # sqrt has an infinite slope at 0; the floor keeps the gradient finite when the
    # predictions are exact or no sample is labelled.
    out["slice_spacing"] = jnp.where(count > 0, jnp.sqrt(jnp.maximum(mse, 1e-12)), 0.0)
    return out


def total_loss(losses: Mapping[str, jax.Array], weights: Mapping[str, float]) -> jax.Array:
    """Weighted sum over the five heads; ``weights`` must name every head."""
    missing = set(labels.HEADS) - set(weights)
    if missing:
        raise KeyError(f"config.loss_weights lacks heads {sorted(missing)}")
    return sum(float(weights[h]) * losses[h] for h in labels.HEADS)


def multitask_loss(outputs, batch, weights, sample_mask=None):
    """→ (scalar loss, per-head losses, statistics) for one batch."""
    stats = head_statistics(outputs, batch, sample_mask)
    losses = head_losses(stats)
    return total_loss(losses, weights), losses, stats


def summarize(stats: Mapping[str, float]) -> dict[str, float]:
    """Summed statistics (host floats, possibly over many batches) → readable metrics.

    ``{head}/loss`` and ``{head}/accuracy`` for class heads, ``coverage/loss`` and
    ``coverage/exact_match``, ``slice_spacing/rmse_mm`` and ``slice_spacing/mae_mm``.
    Metrics of a head without any labelled sample are left out, not reported as 0.
    """
    def div(a, b):
        return float(stats[a]) / float(stats[b]) if float(stats[b]) > 0 else None

    out = {}
    for head in labels.CLASS_HEADS:
        out[f"{head}/loss"] = div(f"{head}/loss_sum", f"{head}/count")
        out[f"{head}/accuracy"] = div(f"{head}/correct", f"{head}/count")
    out["coverage/loss"] = div("coverage/loss_sum", "coverage/count")
    out["coverage/exact_match"] = div("coverage/exact", "coverage/exact_count")
    mse = div("slice_spacing/sq_err_sum", "slice_spacing/count")
    out["slice_spacing/rmse_mm"] = None if mse is None else mse ** 0.5
    out["slice_spacing/mae_mm"] = div("slice_spacing/abs_err_sum", "slice_spacing/count")
    return {k: v for k, v in out.items() if v is not None}
