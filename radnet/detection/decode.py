"""The dense head's training targets (host, NumPy) and its decoding into scored boxes.

Boxes are ``x1, y1, x2, y2`` in input pixels; the head's grid has ``stride`` pixels per cell.
Targets follow CenterNet: a Gaussian peak (value 1 at the centre cell) per box on the
heatmap, with sigma = ``sigma_fraction`` × the box's smaller side in cells (at least
``min_sigma``); at each centre cell the log width and height in cells and the centre's
sub-cell offset.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from radnet.detection import boxes as box_lib


def centernet_targets(boxes: np.ndarray, valid: np.ndarray, grid_hw: tuple[int, int],
                      stride: int, sigma_fraction: float = 0.15,
                      min_sigma: float = 0.6) -> dict[str, np.ndarray]:
    """``boxes [M, 4]``, ``valid [M]`` → ``heatmap [h, w]``, ``center_index [M]`` (row-major
    cell index), ``log_size [M, 2]``, ``offset [M, 2]``, ``box_mask [M]`` (float32)."""
    h, w = grid_hw
    m = len(boxes)
    heatmap = np.zeros((h, w), np.float32)
    index = np.zeros(m, np.int32)
    log_size = np.zeros((m, 2), np.float32)
    offset = np.zeros((m, 2), np.float32)
    mask = np.zeros(m, np.float32)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    for i in range(m):
        if not valid[i]:
            continue
        x1, y1, x2, y2 = np.asarray(boxes[i], np.float32) / stride
        bw, bh = max(x2 - x1, 1e-3), max(y2 - y1, 1e-3)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        ix, iy = int(np.clip(np.floor(cx), 0, w - 1)), int(np.clip(np.floor(cy), 0, h - 1))
        sigma = max(min_sigma, sigma_fraction * min(bw, bh))
        g = np.exp(-((xx - ix) ** 2 + (yy - iy) ** 2) / (2 * sigma ** 2))
        heatmap = np.maximum(heatmap, g)
        index[i] = iy * w + ix
        log_size[i] = np.log([bw, bh])
        offset[i] = (cx - ix, cy - iy)
        mask[i] = 1.0
    return {"heatmap": heatmap, "center_index": index, "log_size": log_size,
            "offset": offset, "box_mask": mask}


def topk_peaks(outputs: dict, k: int) -> dict[str, jax.Array]:
    """On the device: the ``k`` highest local maxima (3×3) of each image's heatmap →
    ``scores [B, k]``, ``boxes [B, k, 4]`` in cells."""
    heat = jax.nn.sigmoid(outputs["heatmap"][..., 0])                    # [B, h, w]
    pooled = jax.lax.reduce_window(heat, -jnp.inf, jax.lax.max, (1, 3, 3), (1, 1, 1), "SAME")
    peaks = jnp.where(heat == pooled, heat, 0.0)
    b, h, w = heat.shape
    scores, index = jax.lax.top_k(peaks.reshape(b, h * w), k)
    iy, ix = index // w, index % w
    take = lambda a: jnp.take_along_axis(a.reshape(b, h * w, -1), index[..., None], axis=1)
    size = jnp.exp(take(outputs["size"]))
    off = take(outputs["offset"])
    cx, cy = ix + off[..., 0], iy + off[..., 1]
    boxes = jnp.stack([cx - size[..., 0] / 2, cy - size[..., 1] / 2,
                       cx + size[..., 0] / 2, cy + size[..., 1] / 2], axis=-1)
    return {"scores": scores, "boxes": boxes}


def to_detections(scores: np.ndarray, boxes_cells: np.ndarray, stride: int,
                  image_hw: tuple[int, int], nms_iou: float, max_detections: int,
                  min_score: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One image's peaks → (boxes [N, 4] in pixels, clipped; scores [N]) after NMS."""
    keep = scores > min_score
    boxes = np.asarray(boxes_cells, np.float64)[keep] * stride
    s = np.asarray(scores, np.float64)[keep]
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, image_hw[1])
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, image_hw[0])
    kept = box_lib.nms(boxes, s, nms_iou, max_detections)
    return boxes[kept], s[kept]
