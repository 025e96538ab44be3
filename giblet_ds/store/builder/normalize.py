"""Per-voxel z-scoring with statistics from training TRs only (no validation leakage)."""

from __future__ import annotations

import numpy as np

__all__ = ["zscore_train"]

_MIN_STD = 1e-6
_ROW_BLOCK = 64  # rows z-scored at a time: a float64 block of 64 x V (42 MB at V = 83,138)


def zscore_train(
    series: np.ndarray, train: np.ndarray, *, inplace: bool = False, block: int = 4096
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-score ``series`` (T, V) per voxel with the mean and std of rows ``train``.

    Returns ``(zscored float32, mean float32, std float32)``. Voxels that are constant over the
    training TRs get std 1 (they z-score to 0 instead of dividing by zero); a mask built from
    the data excludes them anyway. Statistics are taken in float64 over ``block`` voxels at a
    time; with ``inplace`` (and a float32 ``series``) the result overwrites ``series``, so a
    Sherlock subject (1,976 x 83,138) needs no second copy.
    """
    data = np.asarray(series, dtype=np.float32)
    if not inplace or data is not series:
        data = data.copy()
    train = np.asarray(train, dtype=np.int64)
    n_voxels = data.shape[1]
    mean = np.empty(n_voxels, dtype=np.float64)
    std = np.empty(n_voxels, dtype=np.float64)
    for first in range(0, n_voxels, block):
        rows = data[train, first : first + block].astype(np.float64)
        mean[first : first + block] = rows.mean(axis=0)
        std[first : first + block] = rows.std(axis=0)
    std = np.where(std < _MIN_STD, 1.0, std)
    mean32, std32 = mean.astype(np.float32), std.astype(np.float32)
    for first in range(0, data.shape[0], _ROW_BLOCK):  # in place: no full-size temporaries
        part = data[first : first + _ROW_BLOCK].astype(np.float64)
        data[first : first + _ROW_BLOCK] = (part - mean) / std
    return data, mean32, std32
