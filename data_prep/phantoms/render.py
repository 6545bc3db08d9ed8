"""Sampling a patient's label grid onto a series' voxel grid, noise, bias and quantisation.

A series' voxel (k, r, c) lies at ``P_k + c·Δc·row_cos + r·Δr·col_cos`` (DICOM PS3.3
C.7.6.2.1.1, ``PixelSpacing = [Δr, Δc]``). Axis-aligned series are sampled separably
(linear interpolation along each axis, cheap); oblique ones with ``scipy.ndimage``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from data_prep.phantoms import anatomy


def _axis_weights(coords: np.ndarray, origin: float, spacing: float, n: int):
    """Lower index and upper weight of linear interpolation on a padded grid axis.

    The grid is padded by one voxel of air on each side; coordinates beyond the grid
    land on the padding (air).
    """
    f = (coords - origin) / spacing + 1.0           # +1: the padding voxel
    f = np.clip(f, 0.0, n + 1.0 - 1e-6)
    i0 = np.floor(f).astype(np.int64)
    i0 = np.minimum(i0, n)                           # i0 + 1 ≤ n + 1
    return i0, (f - i0).astype(np.float32)


def _lerp_axis(v: np.ndarray, axis: int, i0: np.ndarray, w: np.ndarray) -> np.ndarray:
    a = np.take(v, i0, axis=axis)
    b = np.take(v, i0 + 1, axis=axis)
    shape = [1] * v.ndim
    shape[axis] = len(w)
    w = w.reshape(shape)
    return a * (1 - w) + b * w


def voxel_points(origin0, row_cos, col_cos, normal, offsets, rows, cols, dr, dc):
    """Per-axis position terms: first-slice corner + k, r, c contributions [.., 3]."""
    ks = np.asarray(offsets, np.float64)[:, None] * np.asarray(normal)[None]
    rs = np.arange(rows)[:, None] * dr * np.asarray(col_cos)[None]
    cs = np.arange(cols)[:, None] * dc * np.asarray(row_cos)[None]
    return np.asarray(origin0, np.float64), ks, rs, cs


def sample(grid: anatomy.LabelGrid, table: np.ndarray, body_origin_lps, corner0, row_cos, col_cos,
           normal, offsets, rows: int, cols: int, dr: float, dc: float,
           outside_value: float) -> np.ndarray:
    """Values of ``table[label]`` interpolated at every voxel: float32 [n, rows, cols].

    ``corner0`` is the LPS centre of pixel (0, 0) of the slice at offset 0 along ``normal``;
    slice k lies at ``corner0 + offsets[k]·normal``.
    """
    vol = np.asarray(table, np.float32)[grid.labels]
    vol = np.pad(vol, 1, constant_values=outside_value)      # [nz+2, ny+2, nx+2]
    p0 = np.asarray(corner0, np.float64) - np.asarray(body_origin_lps, np.float64)
    vecs = [np.asarray(normal, float), np.asarray(col_cos, float), np.asarray(row_cos, float)]
    steps = [np.asarray(offsets, float), np.arange(rows) * dr, np.arange(cols) * dc]
    aligned = all(np.count_nonzero(np.abs(v) > 1e-9) == 1 for v in vecs)
    if aligned:
        # grid axis order is (z, y, x) = body axes (2, 1, 0)
        out = vol
        grid_axis_of = []
        for v, s in zip(vecs, steps):
            body_axis = int(np.argmax(np.abs(v)))
            coords = p0[body_axis] + s * v[body_axis]
            grid_axis = 2 - body_axis
            n = grid.shape[grid_axis]
            i0, w = _axis_weights(coords, grid.origin[body_axis], grid.spacing_mm, n)
            out = _lerp_axis(out, grid_axis, i0, w)
            grid_axis_of.append(grid_axis)
        # out axes are grid axes (z, y, x); reorder to (slice, row, col)
        return np.ascontiguousarray(np.transpose(out, grid_axis_of)).astype(np.float32)
    # Oblique: full trilinear sampling.
    k = steps[0][:, None, None, None] * vecs[0]
    r = steps[1][None, :, None, None] * vecs[1]
    c = steps[2][None, None, :, None] * vecs[2]
    pts = p0 + k + r + c                                   # [n, rows, cols, 3] body frame
    idx = [(pts[..., 2 - g] - grid.origin[2 - g]) / grid.spacing_mm + 1.0 for g in range(3)]
    return ndimage.map_coordinates(vol, idx, order=1, mode="constant", cval=outside_value,
                                   prefilter=False).astype(np.float32)


def positions_lps(corner0, row_cos, col_cos, normal, offsets, rows, cols, dr, dc):
    """LPS coordinates of all voxels as three broadcastable arrays' sum: [n, rows, cols, 3]."""
    k = np.asarray(offsets, float)[:, None, None, None] * np.asarray(normal, float)
    r = (np.arange(rows) * dr)[None, :, None, None] * np.asarray(col_cos, float)
    c = (np.arange(cols) * dc)[None, None, :, None] * np.asarray(row_cos, float)
    return np.asarray(corner0, float) + k + r + c
