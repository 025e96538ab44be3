"""The training loss of a run: its terms' variances, weights and the fMRI targets' smoothing.

One home for what the trainer and the benchmarks both build, so that a benchmark trains on the
loss a run would. With ``data.smoothing_fwhm_mm`` > 0 the fMRI targets (the subject mean, one
subject, or every subject's own volume) are smoothed inside the brain mask before the loss sees
them, and each fMRI denominator is the training variance of the *smoothed* target, so the term
still reads 1.0 when the model predicts the training mean (giblet_ds.losses).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from giblet_ds.config import RunConfig
from giblet_ds.losses import NormalizedLoss, TargetVariances
from giblet_ds.store import StoreInfo
from giblet_ds.store import schema as store_schema
from giblet_ds.store.reader import open_read_only
from giblet_ds.store.smoothing import MaskedGaussianSmoothing, target_smoothing
from giblet_ds.store.stats import (
    load_target_stats,
    mean_variance,
    read_rows,
    subject_rows,
    subject_variances,
)

__all__ = ["run_loss"]


def _smoothed_variances(
    cfg: RunConfig, store: StoreInfo, smoothing: MaskedGaussianSmoothing
) -> tuple[float, tuple[float, ...] | None]:
    """Training variances of the smoothed fMRI target and, with subject heads, of each subject."""
    train = np.asarray(store.splits["train"], dtype=np.int64)
    with open_read_only(store.path) as handle:
        subjects = handle[store_schema.FMRI_SUBJECTS]
        rows = (
            read_rows(handle[store_schema.FMRI_MEAN], train)
            if cfg.data.subject is None
            else subject_rows(subjects, store.subject_index(cfg.data.subject), train)
        )
        target = mean_variance(rows, store.n_voxels, smoothing.smooth_array)
        per_subject = None
        if cfg.data.target == "subjects":
            per_subject = tuple(
                mean_variance(
                    subject_rows(subjects, s, train), store.n_voxels, smoothing.smooth_array
                )
                for s in range(store.n_subjects)
            )
    return target, per_subject


def run_loss(cfg: RunConfig, store: StoreInfo) -> NormalizedLoss:
    """The loss a run with ``cfg`` trains on over ``store`` (its training split as the store
    view sets it: a fold's own training runs with data.split_runs)."""
    stats = load_target_stats(store.path, subject=cfg.data.subject, info=store)
    smoothing = target_smoothing(cfg, store)
    if smoothing is None:
        per_subject = (
            subject_variances(store.path, info=store) if cfg.data.target == "subjects" else None
        )
        variances = TargetVariances.from_stats(stats, per_subject)
    else:  # the fMRI denominators of the smoothed targets (the other terms' as they are)
        fmri, smoothed_subjects = _smoothed_variances(cfg, store, smoothing)
        variances = dataclasses.replace(
            TargetVariances.from_stats(stats), fmri=fmri, fmri_subjects=smoothed_subjects
        )
    return NormalizedLoss(
        variances, cfg.loss.weights(), cfg.model.codebook_size, fmri_smoothing=smoothing
    )
