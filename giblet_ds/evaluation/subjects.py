"""Per-subject evaluation: each subject's prediction against that subject's own volumes, beside a
per-subject ridge and that subject's own noise ceiling, on the same held-out TRs and voxels.

A model with subject heads (data.target=subjects) predicts every subject itself; a subject-mean
model's one prediction is scored against each subject too (what it says about any one brain).
The ceiling is :func:`giblet_ds.metrics.subject_ceiling_r`: one subject's reliability from its
correlation with the mean of the others, corrected for their noise; it differs from the
subject-mean ceiling, which grows with the number of subjects averaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from giblet_ds.config import RunConfig
from giblet_ds.evaluation.ridge import fit_ridge_baseline
from giblet_ds.metrics import subject_ceiling_r, voxel_r
from giblet_ds.store import StoreDataset, StoreInfo, read_split_subjects
from giblet_ds.store.smoothing import MaskedGaussianSmoothing

__all__ = ["SplitPrediction", "predict_with_subjects", "score_subjects"]


@dataclass
class SplitPrediction:
    """One model's (or an ensemble's) predictions over a split's TRs, float32."""

    mean: np.ndarray
    """(T_split, V) the subject-mean prediction (with subject heads: the average subject)."""
    subjects: np.ndarray | None
    """(S, T_split, V) each subject's own prediction (subject heads, eval mode: no subject
    dropout); None for a model without subject heads."""
    target: np.ndarray
    """(T_split, V) the run's target (the subject mean, or data.subject's volumes)."""

    def for_subjects(self, n_subjects: int) -> np.ndarray:
        """(S, T_split, V): the heads' predictions, or the mean prediction for every subject."""
        if self.subjects is not None:
            return self.subjects
        return np.broadcast_to(self.mean, (n_subjects, *self.mean.shape))


def predict_with_subjects(
    model: torch.nn.Module,
    cfg: RunConfig,
    info: StoreInfo,
    split: str,
    *,
    device: torch.device,
    batch_size: int = 16,
) -> SplitPrediction:
    """Predict ``split`` on the trainer's samples (:meth:`StoreDataset.for_run`), keeping the
    subject heads' outputs when the model has them (the same pass as
    :func:`giblet_ds.evaluation.predict_split`)."""
    ds = StoreDataset.for_run(info, split, cfg)
    n = len(ds)
    mean = np.empty((n, info.n_voxels), np.float32)
    target = np.empty((n, info.n_voxels), np.float32)
    subjects: np.ndarray | None = None
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for start in range(0, n, batch_size):
            samples = [ds[i] for i in range(start, min(n, start + batch_size))]
            batch = {k: torch.stack([s[k] for s in samples]).to(device) for k in samples[0]}
            args = [batch["video"].to(dtype), batch["audio_codes"], batch["text"].to(dtype)]
            if "context_mask" in batch:
                args.append(batch["context_mask"])
            out = model(*args)
            rows = slice(start, start + len(samples))
            mean[rows] = out.fmri.float().cpu().numpy()
            target[rows] = batch["fmri"].cpu().numpy()
            if out.fmri_subjects is not None:
                if subjects is None:
                    shape = (out.fmri_subjects.shape[1], n, info.n_voxels)
                    subjects = np.empty(shape, np.float32)
                subjects[:, rows] = out.fmri_subjects.float().cpu().numpy().transpose(1, 0, 2)
    ds.close()
    return SplitPrediction(mean, subjects, target)


def score_subjects(
    prediction: SplitPrediction,
    info: StoreInfo,
    split: str,
    *,
    sets: dict[str, np.ndarray],
    ridge: bool = True,
    ridge_cache: str | Path | None = None,
    smoothing: MaskedGaussianSmoothing | None = None,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Per subject and voxel set: mean model r, mean per-subject ridge r, mean own ceiling and
    model r / ceiling (ratio of the means, as the subject-mean table has it), on ``split``'s TRs.

    Returns (rows, maps): one row per subject (``subject``, ``prediction``: "own head" or
    "subject mean", ``sets``: name -> numbers), and per-voxel maps ``<id>_model_r``,
    ``<id>_ridge_r``, ``<id>_ceiling_r`` (V,). The ceiling needs >= 2 subjects (None with one)
    and is not averaged over the set ``all`` (the whole mask), as in the subject-mean table.
    ``smoothing``: the run's target smoothing, which each per-subject ridge fits with too.
    Raises ValueError when the heads' subject count is not the store's.
    """
    volumes = read_split_subjects(info.path, split, info=info)  # (S, T_split, V)
    n_subjects = volumes.shape[0]
    if prediction.subjects is not None and prediction.subjects.shape[0] != n_subjects:
        raise ValueError(
            f"the model has {prediction.subjects.shape[0]} subject heads but the store "
            f"{info.path} holds {n_subjects} subjects: score it on the store it was trained on"
        )
    predicted = prediction.for_subjects(n_subjects)
    ceilings = subject_ceiling_r(torch.from_numpy(volumes)).numpy() if n_subjects >= 2 else None
    rows: list[dict[str, Any]] = []
    maps: dict[str, np.ndarray] = {}
    for s, subject_id in enumerate(info.subjects):
        truth = torch.from_numpy(volumes[s])
        model_r = voxel_r(torch.from_numpy(np.ascontiguousarray(predicted[s])), truth).numpy()
        ridge_r = None
        if ridge:
            baseline = fit_ridge_baseline(
                info, subject=s, cache_dir=ridge_cache, smoothing=smoothing
            )
            ridge_r = voxel_r(torch.from_numpy(baseline.predictions[split]), truth).numpy()
        ceiling = None if ceilings is None else ceilings[s]
        maps[f"{subject_id}_model_r"] = model_r
        if ridge_r is not None:
            maps[f"{subject_id}_ridge_r"] = ridge_r
        if ceiling is not None:
            maps[f"{subject_id}_ceiling_r"] = ceiling
        scores = {}
        for name, voxels in sets.items():
            entry: dict[str, float | int | None] = {
                "n_voxels": int(voxels.sum()),
                "model_r": float(model_r[voxels].mean()),
                "ridge_r": None if ridge_r is None else float(ridge_r[voxels].mean()),
                # the subject-mean table's rule (scores.summarize_set): no ceiling averaged over
                # the whole mask, where most voxels carry no stimulus-driven signal
                "ceiling_r": None
                if ceiling is None or name == "all"
                else float(ceiling[voxels].mean()),
            }
            top = entry["ceiling_r"]
            entry["model_r_normalized"] = (
                float(model_r[voxels].mean()) / top if top is not None and top > 0 else None
            )
            scores[name] = entry
        rows.append(
            {
                "subject": subject_id,
                "prediction": "subject mean" if prediction.subjects is None else "own head",
                "sets": scores,
            }
        )
    return rows, {k: np.asarray(v, np.float32) for k, v in maps.items()}
