"""Per-voxel z-scoring with statistics from training TRs only (no validation leakage)."""

from __future__ import annotations

import numpy as np

__all__ = ["zscore_train"]

_MIN_STD = 1e-6


def zscore_train(
    series: np.ndarray, train: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-score ``series`` (T, V) per voxel with the mean and std of rows ``train``.

    Returns ``(zscored float32, mean float32, std float32)``. Voxels that are constant over the
    training TRs get std 1 (they z-score to 0 instead of dividing by zero); a mask built from
    the data excludes them anyway.
    """
    data = np.asarray(series, dtype=np.float32)
    rows = data[np.asarray(train, dtype=np.int64)].astype(np.float64)
    mean = rows.mean(axis=0)
    std = rows.std(axis=0)
    std = np.where(std < _MIN_STD, 1.0, std)
    zscored = ((data - mean) / std).astype(np.float32)
    return zscored, mean.astype(np.float32), std.astype(np.float32)
