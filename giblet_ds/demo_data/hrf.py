"""A causal haemodynamic response function on the TR grid, and causal convolution with it.

REFERENCE.md: the seed trimmed a centred convolution so features led the stimulus by ~6 TRs. Here
the kernel is sampled at ``k * tr`` for ``k >= 0`` and output ``t`` only sees inputs ``<= t``: an
impulse at TR t peaks about 6 s (4 TRs at 1.5 s) later and never before t.
"""

from __future__ import annotations

import numpy as np

__all__ = ["glover_hrf", "convolve_causal"]


def glover_hrf(tr: float, duration_s: float = 32.0) -> np.ndarray:
    """Glover (1999) double-gamma HRF sampled at ``0, tr, 2 tr, ...`` up to ``duration_s``,
    scaled to sum to 1 (a sustained input of 1 settles at 1).

    Peak at 5.4 s, undershoot at 10.8 s (ratio 0.35): at TR 1.5 s the largest sample is k = 4 (6 s).
    """
    if tr <= 0:
        raise ValueError(f"tr must be > 0, got {tr}")
    t = np.arange(0.0, duration_s, tr)
    a1, a2, b1, b2, c = 6.0, 12.0, 0.9, 0.9, 0.35
    d1, d2 = a1 * b1, a2 * b2
    h = (t / d1) ** a1 * np.exp(-(t - d1) / b1) - c * (t / d2) ** a2 * np.exp(-(t - d2) / b2)
    return h / h.sum()


def convolve_causal(x: np.ndarray, kernel: np.ndarray, axis: int = 0) -> np.ndarray:
    """``y[t] = sum_k kernel[k] * x[t - k]`` along ``axis`` (zeros before the start), same length."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, 0)
    n = x.shape[0]
    y = np.zeros_like(x)
    for k, weight in enumerate(np.asarray(kernel, dtype=np.float64)[:n]):
        y[k:] += weight * x[: n - k]
    return np.moveaxis(y, 0, axis)
