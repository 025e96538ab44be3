"""Contiguous train / validation / test segments separated by gaps (no leakage through the HRF)."""

from __future__ import annotations

import numpy as np

from giblet_ds.errors import ConfigError

__all__ = ["make_splits", "min_real_gap"]


def min_real_gap(lag: int) -> int:
    """Smallest gap a real build accepts: the lag plus 10 TRs of HRF tail (REFERENCE.md)."""
    return lag + 10


def make_splits(
    n_trs: int, fractions: tuple[float, float, float], gap: int
) -> dict[str, np.ndarray]:
    """Split ``range(n_trs)`` into contiguous train, val, test index arrays with ``gap`` TRs between.

    The gap TRs belong to no split. Sizes are the fractions of the ``n_trs - 2 * gap`` usable TRs,
    rounded, with train taking the remainder; every split must end up non-empty.
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions):
        raise ConfigError(f"split_fractions must be three positive numbers, got {fractions}")
    if gap < 0:
        raise ConfigError(f"split_gap must be >= 0, got {gap}")
    total = float(sum(fractions))
    usable = n_trs - 2 * gap
    n_val = round(usable * fractions[1] / total)
    n_test = round(usable * fractions[2] / total)
    n_train = usable - n_val - n_test
    if min(n_train, n_val, n_test) < 1:
        raise ConfigError(
            f"{n_trs} TRs cannot hold train/val/test splits {fractions} with gaps of {gap} TRs "
            f"(sizes would be {n_train}/{n_val}/{n_test}); use a longer recording or a smaller gap"
        )
    train = np.arange(0, n_train, dtype=np.int64)
    val_start = n_train + gap
    val = np.arange(val_start, val_start + n_val, dtype=np.int64)
    test_start = val_start + n_val + gap
    test = np.arange(test_start, test_start + n_test, dtype=np.int64)
    return {"train": train, "val": val, "test": test}
