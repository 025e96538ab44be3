"""Per-voxel scores summarized over voxel sets: every number of one set uses the same TRs and voxels.

Inputs are per-voxel arrays over the store's mask (V,) computed on one split's TRs: the model's r,
the ridge baseline's r, the planted oracle's r (demo only), and the reliability of the evaluated
target (the Spearman-Brown-corrected reliability of the subject mean, from pairwise inter-subject
correlations on the same TRs: :func:`giblet_ds.metrics.mean_reliability`).

A ceiling is only averaged over voxels chosen for carrying signal (reliable voxels, a ROI): over a
whole-brain mask where most voxels carry none it reads near 0 and any model "beats" it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from giblet_ds.metrics import ceiling_r

__all__ = ["SetScores", "normalized_term", "summarize_set"]

WHOLE_BRAIN_CEILING_NOTE = (
    "not averaged over the whole mask (most voxels carry no stimulus-driven signal, so a mean "
    "ceiling there reads near 0); see the reliable-voxel and ROI sets"
)


@dataclass
class SetScores:
    """Summary of one voxel set on one split; ``None`` where a number does not apply."""

    name: str
    split: str
    n_trs: int
    n_voxels: int
    model_r: float
    """Mean over the set's voxels of the model's per-voxel r."""
    model_r_median: float
    ridge_r: float | None
    oracle_r: float | None
    ceiling_r: float | None
    """Mean over the set of sqrt(reliability): the r a perfect model of the target would reach."""
    model_r_normalized: float | None
    """mean model r / mean ceiling r over the set (noise-normalized r)."""
    ridge_r_normalized: float | None
    oracle_r_normalized: float | None
    model_ev_fraction: float | None
    """Pooled explained-variance fraction: sum of r^2 over sum of reliabilities."""
    ridge_ev_fraction: float | None
    constant_term: float
    """Normalized fMRI loss of the training-mean constant on these TRs and voxels."""
    model_term: float
    """Normalized fMRI loss of the model on these TRs and voxels (1 - it: better than the mean)."""
    ridge_term: float | None
    frac_r_gt_0p1: dict[str, float] | None = None
    """Fraction of the set's voxels with model r > 0.1, with its circular-shift null."""
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def normalized_term(
    prediction: np.ndarray, target: np.ndarray, train_var: np.ndarray, voxels: np.ndarray
) -> float:
    """The normalized fMRI loss restricted to ``voxels``: mean over (TRs, voxels) of the squared
    error divided by the mean training variance of those voxels (giblet_ds.losses: predicting the
    training mean reads 1.0 on training TRs). ``prediction`` may be (V,) (a constant)."""
    pred = prediction[..., voxels] if prediction.ndim == 1 else prediction[:, voxels]
    err = (np.asarray(target[:, voxels], np.float64) - pred) ** 2
    return float(err.mean() / np.mean(np.asarray(train_var, np.float64)[voxels]))


def _mean(values: np.ndarray | None, voxels: np.ndarray) -> float | None:
    return None if values is None else float(np.mean(values[voxels]))


def summarize_set(
    name: str,
    voxels: np.ndarray,
    *,
    split: str,
    target: np.ndarray,
    model_pred: np.ndarray,
    model_r: np.ndarray,
    train_mean: np.ndarray,
    train_var: np.ndarray,
    ridge_pred: np.ndarray | None = None,
    ridge_r: np.ndarray | None = None,
    oracle_r: np.ndarray | None = None,
    reliability: np.ndarray | None = None,
    whole_brain: bool = False,
    frac_null: dict[str, float] | None = None,
) -> SetScores:
    """Every number of one voxel set (``voxels``: bool (V,) or indices) on the same TRs.

    ``target``, ``model_pred``, ``ridge_pred``: (T, V); the r arrays and ``reliability``: (V,).
    ``whole_brain``: the set is the whole mask, so no ceiling is averaged over it.
    """
    idx = np.flatnonzero(voxels) if voxels.dtype == bool else np.asarray(voxels)
    if len(idx) == 0:
        raise ValueError(f"voxel set {name!r} is empty")
    notes: list[str] = []
    # the one ceiling rule (residues of a zero reliability read 0, not their square root)
    ceiling = None if reliability is None else ceiling_r(torch.as_tensor(reliability)).numpy()
    ceiling_mean = None if whole_brain else _mean(ceiling, idx)
    if whole_brain and reliability is not None:
        notes.append(f"ceiling_r {WHOLE_BRAIN_CEILING_NOTE}")

    def normalized(r: np.ndarray | None) -> float | None:
        if r is None or ceiling_mean is None or ceiling_mean <= 0:
            return None
        return float(np.mean(r[idx]) / ceiling_mean)

    def ev_fraction(r: np.ndarray | None) -> float | None:
        if r is None or reliability is None or whole_brain:
            return None
        total = float(np.clip(reliability[idx], 0.0, None).sum())
        return None if total <= 0 else float(np.sum(r[idx] ** 2) / total)

    return SetScores(
        name=name,
        split=split,
        n_trs=int(target.shape[0]),
        n_voxels=len(idx),
        model_r=float(np.mean(model_r[idx])),
        model_r_median=float(np.median(model_r[idx])),
        ridge_r=_mean(ridge_r, idx),
        oracle_r=_mean(oracle_r, idx),
        ceiling_r=ceiling_mean,
        model_r_normalized=normalized(model_r),
        ridge_r_normalized=normalized(ridge_r),
        oracle_r_normalized=normalized(oracle_r),
        model_ev_fraction=ev_fraction(model_r),
        ridge_ev_fraction=ev_fraction(ridge_r),
        constant_term=normalized_term(train_mean, target, train_var, idx),
        model_term=normalized_term(model_pred, target, train_var, idx),
        ridge_term=None
        if ridge_pred is None
        else normalized_term(ridge_pred, target, train_var, idx),
        frac_r_gt_0p1=frac_null,
        notes=notes,
    )
