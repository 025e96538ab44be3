"""Alignment: every modality cropped to the common number of whole TRs, never time-warped.

Stimulus TR ``t`` covers ``[t * tr, (t + 1) * tr)`` of the movie; it is paired with fMRI volume
``t + lag`` (the haemodynamic delay), so a store of T TRs uses volumes ``lag .. lag + T - 1``.
"""

from __future__ import annotations

import math

from giblet_ds.errors import StoreError

__all__ = ["whole_trs", "common_trs"]


def whole_trs(duration_s: float, tr: float) -> int:
    """Number of complete TR windows in ``duration_s`` seconds (a partial last TR is dropped)."""
    return max(0, math.floor(duration_s / tr + 1e-9))


def common_trs(*, video: int, audio: int, fmri_volumes: int, lag: int) -> dict[str, int]:
    """TRs each source can fill and the common count ``n_trs`` (their minimum).

    fMRI can pair ``fmri_volumes - lag`` stimulus TRs. Raises when nothing is left.
    """
    counts = {"video": video, "audio": audio, "fmri": fmri_volumes - lag}
    n_trs = min(counts.values())
    if n_trs < 1:
        raise StoreError(
            "inputs",
            "no TR is covered by every modality after the lag",
            expected="at least 1 TR",
            actual=counts,
        )
    return {**counts, "n_trs": n_trs}
