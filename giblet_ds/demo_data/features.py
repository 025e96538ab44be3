"""Stimulus features per TR, measured from the rendered movie: what the planted brain responds to.

Each feature is averaged over the TR window ``[i * tr, (i + 1) * tr)`` (the store's convention) and
standardized over the movie. Computed from the encoded .m4v (video) and the mixed soundtrack, so
the ground truth is a function of the stimulus the build actually sees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from giblet_ds.demo_data.movie import SOUND_RATE
from giblet_ds.demo_data.sources import Line, Segment

__all__ = ["FEATURES", "stimulus_features"]

FEATURES = ("luminance", "motion", "loudness", "speech", "people")


def _frame_stats(movie: Path, tr: float, n_trs: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean luminance and mean absolute frame-to-frame change per TR (64 x 36 grey frames)."""
    import av

    lum = np.zeros(n_trs)
    motion = np.zeros(n_trs)
    count = np.zeros(n_trs)
    previous = None
    with av.open(str(movie)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            grey = frame.reformat(width=64, height=36, format="gray").to_ndarray() / 255.0
            i = int(float(frame.time or 0.0) // tr)
            if i < n_trs:
                lum[i] += grey.mean()
                motion[i] += 0.0 if previous is None else np.abs(grey - previous).mean()
                count[i] += 1
            previous = grey
    count = np.maximum(count, 1)
    return lum / count, motion / count


def stimulus_features(
    movie: Path,
    track: np.ndarray,
    segments: list[Segment],
    spoken: list[tuple[Line, float]],
    *,
    tr: float,
    n_trs: int,
) -> np.ndarray:
    """(n_trs, 5) standardized features in the order of ``FEATURES``."""
    lum, motion = _frame_stats(movie, tr, n_trs)
    per_tr = round(tr * SOUND_RATE)
    padded = np.pad(track, (0, max(0, n_trs * per_tr - len(track))))[: n_trs * per_tr]
    rms = np.sqrt(np.mean(padded.reshape(n_trs, per_tr) ** 2, axis=1))
    loudness = np.log(rms + 1e-3)
    speech = np.zeros(n_trs)
    people = np.zeros(n_trs)
    starts = np.arange(n_trs) * tr
    for line, length in spoken:
        speech += _overlap(starts, tr, line.onset, line.onset + length)
    for segment in segments:
        if segment.clip.people:
            people += _overlap(starts, tr, segment.onset, segment.onset + segment.duration)
    x = np.stack([lum, motion, loudness, speech, people], axis=1)
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def _overlap(starts: np.ndarray, tr: float, lo: float, hi: float) -> np.ndarray:
    """Fraction of each TR window covered by ``[lo, hi)``."""
    return np.clip(np.minimum(starts + tr, hi) - np.maximum(starts, lo), 0.0, tr) / tr
