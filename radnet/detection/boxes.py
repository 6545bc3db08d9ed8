"""Boxes ``[N, 4]`` as ``x1, y1, x2, y2`` (pixels; x along columns, y along rows): overlap
measures, greedy non-maximum suppression, RECIST-style box making.

Hand-written in NumPy: the project's dependencies (jax, optax, scipy) have no box overlap or
NMS, and these run on the host after the device has produced scores (a few hundred boxes per
slice at most).
"""

from __future__ import annotations

import numpy as np


def as_boxes(boxes) -> np.ndarray:
    """Any array-like of boxes → float64 ``[N, 4]`` (an empty input gives ``[0, 4]``)."""
    out = np.asarray(boxes, np.float64).reshape(-1, 4)
    return out


def area(boxes) -> np.ndarray:
    b = as_boxes(boxes)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def intersection(a, b) -> np.ndarray:
    """``[N, M]`` intersection areas of boxes ``a [N, 4]`` and ``b [M, 4]``."""
    a, b = as_boxes(a), as_boxes(b)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    return np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)


def iou(a, b) -> np.ndarray:
    """``[N, M]`` intersection over union (0 where both boxes are empty)."""
    inter = intersection(a, b)
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def iobb(pred, gt) -> np.ndarray:
    """``[N, M]`` intersection over the *predicted* box's area (DeepLesion's IoBB: a
    detection inside a lesion's box counts even when the box is larger)."""
    inter = intersection(pred, gt)
    a = area(pred)[:, None]
    return np.where(a > 0, inter / np.where(a > 0, a, 1), 0.0)


OVERLAPS = {"iou": iou, "iobb": iobb}


def nms(boxes, scores, iou_threshold: float, max_output: int | None = None) -> np.ndarray:
    """Indices of the boxes kept by greedy NMS, highest score first: a box is dropped when
    its IoU with an already kept box exceeds ``iou_threshold``."""
    b = as_boxes(boxes)
    s = np.asarray(scores, np.float64).reshape(-1)
    order = np.argsort(-s, kind="stable")
    keep: list[int] = []
    areas = area(b)
    while order.size and (max_output is None or len(keep) < max_output):
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        inter = intersection(b[i:i + 1], b[rest])[0]
        union = areas[i] + areas[rest] - inter
        overlap = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
        order = rest[overlap <= iou_threshold]
    return np.asarray(keep, np.int64)


def recist_box(points, dilate_px: float, shape_hw: tuple[int, int] | None = None) -> np.ndarray:
    """DeepLesion's box of a RECIST measurement: the tight box of the end points
    ``[[x, y], ...]`` grown by ``dilate_px`` on every side, clipped to the image
    ``(rows, columns)`` when given."""
    p = np.asarray(points, np.float64).reshape(-1, 2)
    box = np.array([p[:, 0].min() - dilate_px, p[:, 1].min() - dilate_px,
                    p[:, 0].max() + dilate_px, p[:, 1].max() + dilate_px])
    if shape_hw is not None:
        rows, cols = shape_hw
        box[[0, 2]] = np.clip(box[[0, 2]], 0, cols - 1)
        box[[1, 3]] = np.clip(box[[1, 3]], 0, rows - 1)
    return box
