"""Small images for the dashboard at each validation, in numpy only (no report code in training):
the per-voxel r map as a mosaic of axial slices, and ground-truth vs reconstructed video frames."""

from __future__ import annotations

import numpy as np

__all__ = ["frame_pair", "r_map_mosaic"]


def r_map_mosaic(
    r: np.ndarray, mask: np.ndarray, *, n_slices: int = 12, vmax: float = 0.5
) -> np.ndarray:
    """(H, W, 3) uint8: per-voxel r (V,) put back in the mask volume, ``n_slices`` axial slices in
    a row of 2 x n_slices/2, blue (negative) - white (0) - red (positive), clipped at +-vmax;
    outside the brain mid grey. Up is anterior."""
    volume = np.zeros(mask.shape, np.float32)
    volume[mask] = r
    zs = np.flatnonzero(mask.any(axis=(0, 1)))
    picks: list[int] = []
    if len(zs):
        picks = np.linspace(zs[0], zs[-1], n_slices + 2)[1:-1].round().astype(int).tolist()
    tiles = []
    for z in picks:
        value = np.clip(volume[:, :, z] / vmax, -1.0, 1.0).T[::-1]  # rows: y (anterior up)
        inside = mask[:, :, z].T[::-1]
        rgb = np.ones((*value.shape, 3), np.float32)
        pos, neg = np.clip(value, 0, 1), np.clip(-value, 0, 1)
        rgb[..., 1] -= pos + neg
        rgb[..., 2] -= pos
        rgb[..., 0] -= neg
        rgb[~inside] = 0.5
        tiles.append(rgb)
    if not tiles:
        return np.zeros((1, 1, 3), np.uint8)
    half = (len(tiles) + 1) // 2
    rows = [np.concatenate(tiles[:half], 1), np.concatenate(tiles[half:] or tiles[:1], 1)]
    width = max(row.shape[1] for row in rows)
    rows = [
        np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=0.5)
        for row in rows
    ]
    image = np.concatenate(rows, 0)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def frame_pair(true: np.ndarray, predicted: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, 2W + 2, 3) uint8: the true last frame of the TR window | its reconstruction."""
    t = np.asarray(true, np.float32).reshape(height, width, 3)
    p = np.asarray(predicted, np.float32).reshape(height, width, 3)
    gap = np.ones((height, 2, 3), np.float32)
    return (np.clip(np.concatenate([t, gap, p], 1), 0, 1) * 255).astype(np.uint8)
