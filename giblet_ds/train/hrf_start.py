"""Where the temporal mixer starts: a canonical haemodynamic response over the window's delays.

A BOLD volume is, to a good approximation, the stimulus-driven neural signal convolved with a
haemodynamic response that peaks ~5 s after it and undershoots at ~10-15 s (Glover 1999, one of
the canonical HRFs of the field's GLMs; nilearn's default ``hrf_model``). The mixer of
``model.context_trs`` > 1 weighs the window's per-TR codes by delay; started at TR t alone it has
to find that shape in a few hundred noisy TRs, and on the demo it does not (docs/design.md,
"Temporal context"). ``model.context_init="hrf"``
starts it at nilearn's Glover HRF sampled at each slot's delay behind the paired volume, scaled to
sum to 1 (a sustained input passes at its own level, as at TR t alone); training then adapts it.
nilearn >= 0.11 (undershoot ratio 0.48; earlier releases used 0.35): tests pin the values.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from giblet_ds.config import ModelConfig
from giblet_ds.store.dataset import window_delays

__all__ = ["canonical_hrf", "mixer_start"]

log = logging.getLogger(__name__)

_OVERSAMPLING = 50  # nilearn samples the curve every tr / 50 s; we interpolate at the delays
_HRF_SECONDS = 32.0


def canonical_hrf(delays_s: np.ndarray, tr: float) -> np.ndarray:
    """nilearn's Glover (1999) HRF at ``delays_s`` seconds after a stimulus (0 beyond 32 s),
    scaled to a peak of 1. ``tr``: the sampling step nilearn oversamples (s, > 0)."""
    from nilearn.glm.first_level import glover_hrf

    curve = glover_hrf(tr, oversampling=_OVERSAMPLING, time_length=_HRF_SECONDS)
    times = np.linspace(0.0, _HRF_SECONDS, len(curve))  # nilearn's own time stamps
    values = np.interp(np.asarray(delays_s, np.float64), times, curve, left=0.0, right=0.0)
    return values / curve.max()


def mixer_start(model: ModelConfig, lag: int, tr: float) -> torch.Tensor | None:
    """(k,) float32 per-slot start of the temporal mixer (slot order of the dataset's window), or
    None for ``context_trs`` = 1 (no mixer) and ``context_init="current_tr"`` (the mixer's own
    start: TR t alone). ``lag``: TRs from a stimulus row to its paired volume (the store's);
    ``tr``: seconds per TR.

    The window's HRF samples are scaled to sum to 1. A window that holds less than half of the
    response (of its positive lobe, or of its net sum, both over whole-TR delays up to 32 s) would
    need large weights to sum to 1, or has nothing to start from: it falls back to TR t alone,
    with a warning naming the delays.
    """
    k = model.context_trs
    if k == 1 or model.context_init == "current_tr":
        return None
    delays = window_delays(k, model.context_end, lag)
    kernel = canonical_hrf(delays * tr, tr)
    whole = canonical_hrf(np.arange(0.0, _HRF_SECONDS, tr), tr)  # every whole-TR delay
    held_lobe = np.clip(kernel, 0.0, None).sum() / np.clip(whole, 0.0, None).sum()
    held_sum = kernel.sum() / whole.sum()
    if held_lobe < 0.5 or held_sum < 0.5:
        log.warning(
            "model.context_init=hrf: the window's delays %s TRs (lag %d, TR %.2f s) hold %.0f%% "
            "of the HRF's positive lobe and %.0f%% of its sum; the temporal mixer starts at TR t "
            "alone (set model.context_end or model.context_trs to cover 0-12 s behind the volume)",
            delays.tolist(), lag, tr, 100 * held_lobe, 100 * held_sum,
        )  # fmt: skip
        return None
    return torch.from_numpy(kernel / kernel.sum()).float()
