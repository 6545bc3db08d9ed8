"""FROC evaluation of lesion detection, the DeepLesion protocol (Yan et al. 2018; 3DCE).

    result = radnet.detection.froc(predictions, ground_truth)
    result["sensitivity"][4.0]        # sensitivity at 4 false positives per image

The walk: every prediction of every image, sorted by score (highest first; ties keep
image order, then the order within the image). A prediction marks as found every
not-yet-found ground-truth box of its image whose overlap with it is ≥ the threshold;
it is a false positive when its overlap with every ground-truth box of its image is below
the threshold (a second hit on an already found box is neither). After each prediction
the walk records (false positives / number of images, found / number of boxes). The
sensitivity at ``f`` FPs per image is the sensitivity at the last point of the walk whose
FPs per image ≤ ``f`` (0 when there is none).

Overlap: ``"iou"`` (intersection over union) or ``"iobb"`` (intersection over the
predicted box's area, DeepLesion's alternative criterion).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from radnet.detection import boxes as box_lib

DEFAULT_FPS = (0.5, 1, 2, 4, 8, 16)


def _walk(predictions, ground_truth, iou_threshold: float, criterion: str):
    """(fps per image [P], found flags per walk step, found_at [G] = walk index at which each
    ground-truth box was found or -1, total boxes)."""
    if len(predictions) != len(ground_truth):
        raise ValueError(f"predictions cover {len(predictions)} images, ground_truth "
                         f"{len(ground_truth)}; give one entry per image to both")
    if criterion not in box_lib.OVERLAPS:
        raise ValueError(f"criterion={criterion!r}; choose one of {sorted(box_lib.OVERLAPS)}")
    overlap_fn = box_lib.OVERLAPS[criterion]
    gt = [box_lib.as_boxes(g) for g in ground_truth]
    offsets = np.cumsum([0] + [len(g) for g in gt])
    image_of, score, overlaps = [], [], []
    for i, (pred, g) in enumerate(zip(predictions, gt)):
        pboxes, pscores = pred
        pboxes = box_lib.as_boxes(pboxes)
        pscores = np.asarray(pscores, np.float64).reshape(-1)
        if len(pboxes) != len(pscores):
            raise ValueError(f"image {i}: {len(pboxes)} boxes but {len(pscores)} scores")
        image_of.extend([i] * len(pboxes))
        score.extend(pscores.tolist())
        ov = overlap_fn(pboxes, g) if len(g) else np.zeros((len(pboxes), 0))
        overlaps.extend(list(ov))
    order = np.argsort(-np.asarray(score, np.float64), kind="stable")
    found_at = np.full(int(offsets[-1]), -1, np.int64)
    fps = np.zeros(len(order), np.float64)
    found = np.zeros(len(order), np.int64)
    n_fp = n_found = 0
    for step, p in enumerate(order):
        i = image_of[p]
        hits = np.flatnonzero(overlaps[p] >= iou_threshold)
        if hits.size == 0:
            n_fp += 1
        else:
            for h in hits + offsets[i]:
                if found_at[h] < 0:
                    found_at[h] = step
                    n_found += 1
        fps[step] = n_fp / max(len(gt), 1)
        found[step] = n_found
    return fps, found, found_at, int(offsets[-1])


def _last_index_within(fps: np.ndarray, f: float) -> int:
    """Index of the last walk point with FPs per image ≤ f, -1 when there is none."""
    return int(np.searchsorted(fps, f + 1e-12, side="right")) - 1  # fps never decreases


def froc(predictions: Sequence[tuple[Any, Any]], ground_truth: Sequence[Any],
         fps_per_image: Sequence[float] = DEFAULT_FPS, iou_threshold: float = 0.5,
         criterion: str = "iou", groups: Sequence[Sequence[Any]] | None = None) -> dict:
    """FROC by the DeepLesion protocol (module docstring).

    Args:
      predictions: per image ``(boxes [N, 4] as x1, y1, x2, y2, scores [N])``.
      ground_truth: per image (same order) ``boxes [M, 4]``.
      fps_per_image: the FP rates to report.
      iou_threshold: the overlap a hit needs.
      criterion: ``"iou"`` or ``"iobb"``.
      groups: optional, per image a label for each ground-truth box (lesion type, size
        bin …): sensitivities are then also reported per label, with the false
        positives of all images (as the papers' per-type tables).

    Returns ``{"sensitivity": {f: value}, "fps": [P], "sensitivities": [P],
    "mean_sensitivity": mean over fps_per_image, "num_images", "num_lesions",
    "num_predictions", "by_group": {label: {"sensitivity": {f: v}, "num_lesions": n}}}``.
    """
    fps, found, found_at, total = _walk(predictions, ground_truth, iou_threshold, criterion)
    sens_curve = found / total if total else np.zeros(len(found))
    sensitivity = {}
    for f in fps_per_image:
        k = _last_index_within(fps, float(f))
        sensitivity[f] = float(sens_curve[k]) if k >= 0 else 0.0
    result = {"sensitivity": sensitivity, "fps": fps, "sensitivities": sens_curve,
              "mean_sensitivity": float(np.mean(list(sensitivity.values()))),
              "num_images": len(ground_truth), "num_lesions": total,
              "num_predictions": int(len(fps)), "criterion": criterion,
              "iou_threshold": float(iou_threshold)}
    if groups is not None:
        labels = np.asarray([l for g in groups for l in g], dtype=object)
        if len(labels) != total:
            raise ValueError(f"groups label {len(labels)} boxes; ground_truth holds {total}")
        by_group = {}
        for label in sorted(set(labels.tolist()), key=str):
            mine = labels == label
            row = {}
            for f in fps_per_image:
                k = _last_index_within(fps, float(f))
                hit = (found_at[mine] >= 0) & (found_at[mine] <= k)
                row[f] = float(hit.mean()) if k >= 0 else 0.0
            by_group[label] = {"sensitivity": row, "num_lesions": int(mine.sum())}
        result["by_group"] = by_group
    return result


SIZE_BINS_MM = (10.0, 30.0)


def size_bin(diameter_mm: float, edges: Sequence[float] = SIZE_BINS_MM) -> str:
    """A lesion's long-axis diameter → ``"<10mm"``, ``"10-30mm"``, ``">=30mm"`` (edges in mm)."""
    edges = list(edges)
    if diameter_mm < edges[0]:
        return f"<{edges[0]:g}mm"
    for lo, hi in zip(edges, edges[1:]):
        if diameter_mm < hi:
            return f"{lo:g}-{hi:g}mm"
    return f">={edges[-1]:g}mm"


def format_table(results: dict[str, dict], fps_per_image: Sequence[float] = DEFAULT_FPS) -> str:
    """Markdown table like the papers': one row per method, sensitivity (%) at each FP rate."""
    head = "| Method | " + " | ".join(f"{f:g}" for f in fps_per_image) + " | mean |"
    rule = "|---|" + "---|" * (len(fps_per_image) + 1)
    lines = ["Sensitivity (%) at FPs per image", "", head, rule]
    for name, r in results.items():
        cells = [f"{100 * r['sensitivity'][f]:.1f}" for f in fps_per_image]
        mean = 100 * float(np.mean([r["sensitivity"][f] for f in fps_per_image]))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.1f} |")
    return "\n".join(lines)


def plot_froc(results: dict[str, dict], path: str,
              fps_per_image: Sequence[float] = DEFAULT_FPS) -> None:
    """The FROC curves (sensitivity against FPs per image, log x) of ``results`` to a PNG."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    lo, hi = min(fps_per_image), max(fps_per_image)
    for name, r in results.items():
        fps, sens = np.asarray(r["fps"]), np.asarray(r["sensitivities"])
        grid = np.geomspace(lo / 2, hi, 200)
        curve = [sensitivity_at(fps, sens, x) for x in grid]
        ax.plot(grid, curve, label=name)
        ax.plot(list(r["sensitivity"]), list(r["sensitivity"].values()), "o", ms=3,
                color=ax.lines[-1].get_color())
    ax.set_xscale("log")
    ax.set_xticks(list(fps_per_image), [f"{f:g}" for f in fps_per_image])
    ax.set_xlabel("false positives per image")
    ax.set_ylabel("sensitivity")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sensitivity_at(fps: np.ndarray, sens: np.ndarray, f: float) -> float:
    """The sensitivity of a walk at ``f`` FPs per image (last point ≤ f; 0 when none)."""
    k = _last_index_within(np.asarray(fps), f)
    return float(sens[k]) if k >= 0 else 0.0
