"""Training-set statistics of the reconstruction targets (``/stats`` in the store).

The normalized losses divide each modality's MSE by the training variance of its target, so a model
that predicts the training mean reads 1.0 (REFERENCE.md: the seed divided by a batch-of-2 std).
Everything here uses training TRs only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from giblet_ds.store import schema

if TYPE_CHECKING:  # the reader imports this module
    from giblet_ds.store.reader import StoreInfo

__all__ = [
    "compute_target_stats",
    "load_target_stats",
    "mean_variance",
    "read_rows",
    "read_split_subjects",
    "subject_rows",
    "subject_variances",
]

_BLOCK_TRS = 64


def read_rows(dataset: Any, rows: np.ndarray, block: int = _BLOCK_TRS):
    """Yield ``dataset[rows]`` in blocks of at most ``block`` rows (rows sorted ascending).

    Contiguous runs are read as slices, which h5py serves far faster than index lists.
    """
    rows = np.asarray(rows, dtype=np.int64)
    for start in range(0, len(rows), block):
        part = rows[start : start + block]
        if part[-1] - part[0] + 1 == len(part):
            yield dataset[int(part[0]) : int(part[-1]) + 1]
        else:
            yield dataset[part.tolist()]


class _Moments:
    """Per-element mean and variance accumulated in float64 over blocks of rows."""

    def __init__(self, size: int) -> None:
        self.count = 0
        self.total = np.zeros(size, dtype=np.float64)
        self.total_sq = np.zeros(size, dtype=np.float64)

    def add(self, rows: np.ndarray) -> None:
        flat = rows.reshape(len(rows), -1).astype(np.float64)
        self.count += len(flat)
        self.total += flat.sum(axis=0)
        self.total_sq += np.square(flat).sum(axis=0)

    def result(self) -> dict[str, np.ndarray]:
        mean = self.total / self.count
        # Clip: E[x^2] - E[x]^2 can round to a tiny negative for constant elements.
        var = np.maximum(self.total_sq / self.count - np.square(mean), 0.0)
        return {"mean": mean.astype(np.float32), "var": var.astype(np.float32)}


def compute_target_stats(handle: h5py.File, train: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Statistics of every reconstruction target over the training TRs ``train``.

    video: last frame of the window in [0, 1], flattened (H*W*3); text: (K*D); fmri: the subject
    mean (V); audio: (n_q, 1024) histogram of the training codes.
    """
    video, text = handle[schema.VIDEO], handle[schema.TEXT]
    fmri, codes = handle[schema.FMRI_MEAN], handle[schema.AUDIO_CODES]
    frame_size = int(np.prod(video.shape[2:]))
    video_m = _Moments(frame_size)
    for block in read_rows(video, train):
        video_m.add(block[:, -1].astype(np.float32) / 255.0)
    text_m = _Moments(int(np.prod(text.shape[1:])))
    for block in read_rows(text, train):
        text_m.add(block)
    fmri_m = _Moments(int(fmri.shape[1]))
    for block in read_rows(fmri, train):
        fmri_m.add(block.astype(np.float32))
    n_q = int(codes.shape[1])
    counts = np.zeros((n_q, schema.N_CODES), dtype=np.int64)
    for block in read_rows(codes, train):
        for q in range(n_q):
            counts[q] += np.bincount(block[:, q].ravel(), minlength=schema.N_CODES)
    return {
        "video": video_m.result(),
        "text": text_m.result(),
        "fmri": fmri_m.result(),
        "audio": {"counts": counts},
    }


def load_target_stats(
    path: str | Path, *, subject: int | str | None = None, info: StoreInfo | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """Read ``/stats`` of a validated store: ``{"video": {"mean", "var"}, "text": {...},
    "fmri": {...}, "audio": {"counts"}}`` as numpy arrays.

    ``subject`` (index or id) replaces the fMRI statistics with those of that subject's z-scored
    series on the training TRs, for runs that train on one subject instead of the subject mean.
    ``info``: the store already validated by the caller (validation reads every fMRI value); a
    store seen with another assignment of its runs (``info.split_override``) has its statistics
    computed on that assignment's training rows.
    """
    from giblet_ds.store.reader import open_read_only, open_store  # no import cycle

    info = info if info is not None else open_store(path)
    out: dict[str, dict[str, np.ndarray]] = {}
    with open_read_only(info.path) as handle:
        if info.split_override is not None:
            # another assignment of runs (data.split_runs): /stats holds the build's training
            # runs, which may now be held out; the fold's own training rows are read instead
            out = compute_target_stats(handle, np.asarray(info.splits["train"]))
        for modality, names in (
            ("video", ("mean", "var")),
            ("text", ("mean", "var")),
            ("fmri", ("mean", "var")),
            ("audio", ("counts",)),
        ):
            if modality in out:
                continue
            out[modality] = {
                name: np.asarray(handle[f"{schema.STATS_GROUP}/{modality}/{name}"][()])
                for name in names
            }
        if subject is not None:
            index = info.subject_index(subject)
            moments = _Moments(info.n_voxels)
            train = info.splits["train"]
            subjects = handle[schema.FMRI_SUBJECTS]
            for block in subject_rows(subjects, index, train):
                moments.add(block.astype(np.float32))
            out["fmri"] = moments.result()
    return out


def mean_variance(
    blocks: Iterable[np.ndarray],
    size: int,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> float:
    """Mean over the ``size`` elements of each one's variance over the rows of ``blocks`` (float64
    sums), ``transform`` applied to each block first (the training targets' smoothing)."""
    moments = _Moments(size)
    for block in blocks:
        moments.add(block if transform is None else transform(block))
    return float(np.mean(moments.result()["var"], dtype=np.float64))


def subject_variances(path: str | Path, *, info: StoreInfo | None = None) -> np.ndarray:
    """(S,) float64: per subject, the mean over voxels of the variance of its z-scored fMRI on the
    training TRs (~1.0, off by the float16 rounding of /fmri/subjects): the per-subject loss
    denominators of data.target=subjects. ``info``: as for :func:`load_target_stats`."""
    from giblet_ds.store.reader import open_read_only, open_store  # no import cycle

    info = info if info is not None else open_store(path)
    train = info.splits["train"]
    out = np.empty(info.n_subjects, dtype=np.float64)
    with open_read_only(info.path) as handle:
        subjects = handle[schema.FMRI_SUBJECTS]
        for s in range(info.n_subjects):
            out[s] = mean_variance(subject_rows(subjects, s, train), info.n_voxels)
    return out


def read_split_subjects(
    path: str | Path, split: str, *, info: StoreInfo | None = None
) -> np.ndarray:
    """Every subject's z-scored fMRI on one split's TRs, float32 (S, T_split, V).

    What a noise ceiling needs (the subject mean alone cannot show how much of the signal is
    shared between subjects). ``info``: as for :func:`load_target_stats`.
    """
    from giblet_ds.store.reader import open_read_only, open_store  # no import cycle

    info = info if info is not None else open_store(path)
    rows = np.asarray(info.splits[split], dtype=np.int64)
    out = np.empty((info.n_subjects, len(rows), info.n_voxels), dtype=np.float32)
    with open_read_only(info.path) as handle:
        subjects = handle[schema.FMRI_SUBJECTS]
        for s in range(info.n_subjects):
            done = 0
            for block in subject_rows(subjects, s, rows):
                out[s, done : done + len(block)] = block
                done += len(block)
    return out


def subject_rows(subjects: Any, s: int, rows: np.ndarray) -> Iterator[np.ndarray]:
    """Yield subject ``s``'s rows of ``/fmri/subjects`` in blocks of TRs."""
    for start in range(0, len(rows), _BLOCK_TRS):
        part = rows[start : start + _BLOCK_TRS]
        yield subjects[s, part.tolist()]
