"""Modality-normalized losses: every term reads 1.0 when the model predicts the training mean.

The old system divided each MSE by the standard deviation of the current batch (batch of 2), so one
modality still dominated (~720 total). Here each MSE is divided by a variance computed once from the
training split and stored in the feature store (``/stats/<modality>``); audio codes are categories and
use cross-entropy divided by log(codebook_size), which reads 1.0 for a uniform guess.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from giblet_ds.errors import DataError
from giblet_ds.model.autoencoder import GibletOutput
from giblet_ds.model.context import current_tr

__all__ = [
    "TERMS",
    "LossResult",
    "NormalizedLoss",
    "TargetVariances",
    "reconstruction_targets",
]

TERMS = ("fmri", "video", "audio", "text")


@dataclass(frozen=True)
class TargetVariances:
    """One positive number per MSE term: the training-set variance of that term's target
    (mean over elements of the per-element variance). ``audio`` is used only in seed_compat;
    ``fmri_subjects`` (one per subject, data.target=subjects) only with subject heads."""

    fmri: float
    video: float
    text: float
    audio: float
    fmri_subjects: tuple[float, ...] | None = None

    @classmethod
    def from_stats(
        cls,
        stats: Mapping[str, Mapping[str, np.ndarray]],
        subjects: np.ndarray | None = None,
    ) -> TargetVariances:
        """From ``giblet_ds.store.load_target_stats`` output (``/stats`` of the store), and
        ``subjects`` (S,): each subject's training variance of its z-scored fMRI, mean over voxels
        (``giblet_ds.store.subject_variances``). Raises DataError on a non-positive variance."""
        counts = np.asarray(stats["audio"]["counts"], dtype=np.float64)  # (n_q, codebook_size)
        values = np.arange(counts.shape[1], dtype=np.float64)
        probs = counts / counts.sum(axis=1, keepdims=True)
        mean = probs @ values
        audio_var = float(np.mean(probs @ values**2 - mean**2))
        out = {
            name: float(np.mean(np.asarray(stats[name]["var"], dtype=np.float64)))
            for name in ("fmri", "video", "text")
        }
        per_subject = None if subjects is None else tuple(float(v) for v in subjects)
        result = cls(audio=audio_var, fmri_subjects=per_subject, **out)
        for name, value in vars(result).items():
            if name != "fmri_subjects" and (not math.isfinite(value) or value <= 0):
                raise DataError(
                    f"training variance of {name} is {value}; the store's /stats/{name} is "
                    f"degenerate (constant target?): rebuild the store"
                )
        for s, value in enumerate(per_subject or ()):
            if not math.isfinite(value) or value <= 0:
                raise DataError(
                    f"training variance of subject {s}'s fMRI is {value}: its /fmri/subjects "
                    "rows are degenerate on the training TRs; rebuild the store without it"
                )
        return result


@dataclass
class LossResult:
    total: torch.Tensor
    """Weighted sum of the terms (what backward runs on)."""
    terms: dict[str, torch.Tensor]
    """Each normalized term, unweighted, detached from nothing (for logging call .item())."""


def reconstruction_targets(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What each term compares against: fMRI; the last video frame of TR t; TR t's codes; TR t's
    text; with ``fmri_subjects`` in the batch (data.target=subjects) every subject's own volume
    (B, S, V). With a context window (``context_mask`` in the batch) the stimulus keys are cut to
    the window's last TR first: the decoder reconstructs TR t, never the window."""
    batch = current_tr(batch)
    targets = {
        "fmri": batch["fmri"].float(),
        "video": batch["video"][:, -1].flatten(1).float(),
        "audio": batch["audio_codes"].long(),
        "text": batch["text"].flatten(1).float(),
    }
    if "fmri_subjects" in batch:
        targets["fmri_subjects"] = batch["fmri_subjects"].float()
    return targets


class NormalizedLoss(nn.Module):
    """Weighted sum of modality-normalized terms; weights of 0 skip a term entirely."""

    def __init__(
        self,
        variances: TargetVariances,
        weights: Mapping[str, float],
        codebook_size: int = 1024,
        fmri_smoothing: nn.Module | None = None,
    ) -> None:
        """``fmri_smoothing``: applied to the fMRI targets (``fmri`` and ``fmri_subjects``, the
        voxel axis last) before they are compared (data.smoothing_fwhm_mm; the variances are then
        those of the smoothed targets: giblet_ds.train.loss_setup)."""
        super().__init__()
        self.fmri_smoothing = fmri_smoothing
        unknown = set(weights) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; valid: {TERMS}")
        self.variances = variances
        self.weights = {k: float(weights.get(k, 0.0)) for k in TERMS}
        self.log_codebook = math.log(codebook_size)

    def forward(self, output: GibletOutput, batch: Mapping[str, torch.Tensor]) -> LossResult:
        targets = reconstruction_targets(batch)
        if self.fmri_smoothing is not None:
            with torch.no_grad():
                for key in ("fmri", "fmri_subjects"):
                    if key in targets:
                        targets[key] = self.fmri_smoothing(targets[key])
        terms: dict[str, torch.Tensor] = {}
        if self.weights["fmri"] > 0 and output.fmri_subjects is not None:
            terms["fmri"] = self._subjects_term(output.fmri_subjects, targets)
        for name in ("fmri", "video", "text"):
            if self.weights[name] > 0 and name not in terms:
                prediction = getattr(output, name).float()
                mse = nn.functional.mse_loss(prediction, targets[name])
                terms[name] = mse / getattr(self.variances, name)
        if self.weights["audio"] > 0:
            terms["audio"] = self._audio_term(output.audio, targets["audio"])
        total = sum((self.weights[k] * v for k, v in terms.items()), torch.zeros(()))
        return LossResult(total=total, terms=terms)

    def _subjects_term(
        self, prediction: torch.Tensor, targets: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Subject heads: the mean over subjects of each subject's MSE over its volumes (B, V)
        divided by that subject's training variance, so predicting every subject's training
        mean reads 1.0 whatever the subjects' noise levels (the average subject is trained
        through the samples that subject dropout hands it, not by a term of its own)."""
        variances = self.variances.fmri_subjects
        if "fmri_subjects" not in targets or variances is None:
            raise ValueError(
                "the model has subject heads (model.n_subjects > 0) but the "
                + (
                    "batch has no fmri_subjects"
                    if variances is not None
                    else "loss has no per-subject variances"
                )  # fmt: skip
                + ": build the data and the loss with data.target=subjects"
            )
        target = targets["fmri_subjects"]
        if prediction.shape != target.shape or len(variances) != target.shape[1]:
            raise ValueError(
                f"subject heads predict {tuple(prediction.shape)} but the targets are "
                f"{tuple(target.shape)} with {len(variances)} subject variance(s): the model's "
                "model.n_subjects must be the store's subject count"
            )
        per_subject = (prediction.float() - target).pow(2).mean(dim=(0, 2))  # (S,)
        scale = torch.tensor(variances, dtype=per_subject.dtype, device=per_subject.device)
        return (per_subject / scale).mean()

    def _audio_term(self, prediction: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        if prediction.dim() == 4:  # logits (B, n_q, C, K)
            logits = prediction.float().flatten(0, 2)
            return nn.functional.cross_entropy(logits, codes.flatten()) / self.log_codebook
        # seed_compat: code values regressed as floats (kept only to reproduce the old system)
        mse = nn.functional.mse_loss(prediction.float(), codes.flatten(1).float())
        return mse / self.variances.audio
