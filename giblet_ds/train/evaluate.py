"""Validation: loss terms and fMRI scores over a whole split, reduced exactly across ranks.

Besides the mean r over every mask voxel, validation reports the r on the reliable voxels (chosen
on the training TRs only, by inter-subject correlation) and the noise-normalized r (that r over the
mean ceiling of the same voxels on the validation TRs): :class:`ValReference` holds what those need.
With subject heads (data.target=subjects) these score the average-subject output against the
subject mean, and they alone drive early stopping and the ``best`` checkpoint; beside them each
subject's own head is scored against that subject's own volumes on the same reliable voxels
(recorded, never used to choose a checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from giblet_ds.losses import TERMS, NormalizedLoss
from giblet_ds.metrics import VoxelCorrelation, ceiling_r, mean_reliability, pairwise_isc
from giblet_ds.model import GibletOutput
from giblet_ds.store import StoreDataset, StoreInfo, read_split_subjects
from giblet_ds.train import distributed as dist

__all__ = ["ValReference", "evaluate", "val_reference"]


@dataclass
class ValReference:
    """What validation scores the model against, fixed for the run (computed once on rank 0).

    ``reliable``: bool (V,) voxels whose mean pairwise inter-subject r on the TRAINING TRs exceeds
    the threshold (all voxels when the store has one subject: nothing to choose them by);
    ``ceiling``: (V,) sqrt of the Spearman-Brown reliability of the target on the VALIDATION TRs
    (k = number of subjects for the subject mean, 1 for a one-subject run), None with one subject;
    ``constant_term``: the normalized fMRI loss of the training-mean constant on the validation
    TRs (the score a model must beat: above 1.0 when the held-out TRs drift from the training mean).
    """

    reliable: np.ndarray
    ceiling: np.ndarray | None
    constant_term: float
    note: str

    @property
    def n_reliable(self) -> int:
        return int(self.reliable.sum())

    @property
    def ceiling_reliable(self) -> float | None:
        """Mean ceiling over the reliable voxels (never over the whole mask)."""
        if self.ceiling is None or not self.reliable.any():
            return None
        return float(self.ceiling[self.reliable].mean())


def val_reference(
    info: StoreInfo,
    *,
    subject: int | None,
    threshold: float,
    train_mean: np.ndarray,
    train_var: np.ndarray,
    smoothing: torch.nn.Module | None = None,
    smoothed_var: float | None = None,
) -> ValReference:
    """Build the :class:`ValReference` of a store (reads every subject's train and val TRs).

    ``smoothing`` (data.smoothing_fwhm_mm) with ``smoothed_var``, the loss's denominator: the
    constant's fMRI term is then measured as the loss measures the model's, the smoothed
    training mean against the smoothed validation volumes over ``smoothed_var``.
    """
    val = torch.from_numpy(read_split_subjects(info.path, "val", info=info))
    target = val.double().mean(0) if subject is None else val[subject].double()
    mean = torch.from_numpy(np.asarray(train_mean, np.float64))
    var = float(np.mean(np.asarray(train_var, np.float64)))
    if smoothing is not None:
        if smoothed_var is None:
            raise ValueError("a smoothed validation reference needs the smoothed variance")
        with torch.no_grad():  # linear: the smoothed series' training mean is the mean smoothed
            target = smoothing(target.float()).double()
            mean = smoothing(mean.float()).double()
        var = smoothed_var
    constant = float((target - mean).pow(2).mean() / var)
    if info.n_subjects < 2:
        note = "one subject: no inter-subject reliability; reliable voxels = all, no ceiling"
        return ValReference(np.ones(info.n_voxels, bool), None, constant, note)
    train = torch.from_numpy(read_split_subjects(info.path, "train", info=info))
    reliable = (pairwise_isc(train) > threshold).numpy()
    del train
    k = info.n_subjects if subject is None else 1
    ceiling = ceiling_r(mean_reliability(val, k=k)).numpy()
    note = (
        f"{int(reliable.sum())} reliable voxels (training-TR ISC > {threshold}); ceiling: "
        f"Spearman-Brown reliability of {'the mean of ' + str(k) if k > 1 else 'one'} subject(s)"
    )
    if not reliable.any():
        note = f"no voxel has training-TR ISC > {threshold}: reliable r = r over all voxels"
        reliable = np.ones(info.n_voxels, bool)
    return ValReference(reliable, ceiling, constant, note)


KEEP_FRAMES = 3
BATCH_KEYS = ("video", "audio_codes", "text", "text_mask", "context_mask", "fmri", "fmri_subjects")


@torch.no_grad()
def evaluate(
    engine: Any,
    dataset: StoreDataset,
    loss_fn: NormalizedLoss,
    *,
    micro_batch_size: int,
    to_device: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    reference: ValReference | None = None,
    keep: dict[str, Any] | None = None,
) -> dict[str, float]:
    """``loss``, ``loss_<term>`` and the fMRI scores of ``dataset`` (every sample once).

    Rank r takes samples r, r + world, ...; every rank runs the same number of batches (ZeRO-3
    gathers parameters collectively, so a rank that stopped early would hang the others), padding
    with repeats that are masked out. Per-sample loss sums, counts and the voxel-correlation sums
    are all-reduced, so the result is exact, not an average of averages. ``keep`` (a dict) receives
    ``per_voxel_r`` (V,) and ``frames``: (true, reconstructed) last frames of this rank's first
    ``KEEP_FRAMES`` samples, flattened, for the dashboard; and with subject heads (a dataset of
    data.target=subjects) ``fmri_r_reliable_by_subject``: per subject in store order, the mean
    per-voxel r of that subject's own head against its own volumes over the reliable voxels (all
    voxels without a reference). The returned fMRI scores are the average subject's against the
    subject mean either way: what early stopping reads.
    """
    rank, world = dist.rank(), dist.world_size()
    engine.eval()
    n = len(dataset)
    mine = list(range(rank, n, world))
    per_rank = math.ceil(math.ceil(n / world) / micro_batch_size) * micro_batch_size
    padded = mine + [mine[0] if mine else 0] * (per_rank - len(mine))
    real = [True] * len(mine) + [False] * (per_rank - len(mine))
    scores = VoxelCorrelation(dataset.info.n_voxels)
    # Subject heads: one running r per (subject, voxel), every subject's volumes side by side.
    n_subjects = dataset.info.n_subjects if dataset.subjects else 0
    subject_scores = VoxelCorrelation(n_subjects * dataset.info.n_voxels) if n_subjects else None
    sums = torch.zeros(len(TERMS) + 2, dtype=torch.float64)  # terms..., total, count
    for start in range(0, per_rank, micro_batch_size):
        items = [dataset[i] for i in padded[start : start + micro_batch_size]]
        keys = [k for k in BATCH_KEYS if k in items[0]]  # context_mask only when k > 1
        batch = to_device({k: torch.stack([item[k] for item in items]) for k in keys})
        output = engine(
            batch["video"], batch["audio_codes"], batch["text"], batch.get("context_mask")
        )
        for j, is_real in enumerate(real[start : start + micro_batch_size]):
            if not is_real:
                continue
            if keep is not None and len(keep.setdefault("frames", [])) < KEEP_FRAMES:
                size = output.video.shape[-1]
                keep["frames"].append((batch["video"][j].float().reshape(-1, size)[-1].cpu().numpy(),
                                       output.video[j].float().cpu().numpy()))  # fmt: skip
            result = loss_fn(_select(output, j), {k: v[j : j + 1] for k, v in batch.items()})
            for i, name in enumerate(TERMS):
                if name in result.terms:
                    sums[i] += result.terms[name].item()
            sums[-2] += result.total.item()
            sums[-1] += 1
            scores.update(output.fmri[j : j + 1].float().cpu(), batch["fmri"][j : j + 1].cpu())
            if subject_scores is not None:
                subject_scores.update(
                    _own_heads(output, n_subjects)[j : j + 1].float().cpu().flatten(1),
                    batch["fmri_subjects"][j : j + 1].cpu().flatten(1),
                )
    dist.all_reduce_sum(sums)
    dist.all_reduce_sum(scores.state)
    if subject_scores is not None:
        dist.all_reduce_sum(subject_scores.state)
    count = sums[-1].item()
    metrics = {"loss": sums[-2].item() / count}
    for i, name in enumerate(TERMS):
        if loss_fn.weights.get(name, 0.0) > 0:
            metrics[f"loss_{name}"] = sums[i].item() / count
    metrics.update(scores.compute().as_dict())
    r = scores.per_voxel_r().numpy()
    if keep is not None:
        keep["per_voxel_r"] = r
    if reference is not None:
        metrics["fmri_r_reliable"] = float(r[reference.reliable].mean())
        ceiling = reference.ceiling_reliable
        if ceiling is not None and ceiling > 0:
            metrics["fmri_r_normalized"] = metrics["fmri_r_reliable"] / ceiling
    else:
        metrics["fmri_r_reliable"] = metrics["fmri_r_mean"]
    if subject_scores is not None and keep is not None:
        per_subject = subject_scores.per_voxel_r().view(n_subjects, -1).numpy()
        voxels = reference.reliable if reference is not None else slice(None)
        keep["fmri_r_reliable_by_subject"] = [float(r_s[voxels].mean()) for r_s in per_subject]
    engine.train()
    return metrics


def _own_heads(output: GibletOutput, n_subjects: int) -> torch.Tensor:
    """(B, S, V): each subject's own head, checked against the store's subject count."""
    heads = output.fmri_subjects
    if heads is None or heads.shape[1] != n_subjects:
        got = "no subject heads" if heads is None else f"{heads.shape[1]} subject heads"
        raise ValueError(
            f"validation with data.target=subjects scores {n_subjects} subject heads but the "
            f"model has {got}: model.n_subjects must be the store's subject count"
        )
    return heads


def _select(output: GibletOutput, j: int) -> GibletOutput:
    return GibletOutput._make(None if t is None else t[j : j + 1] for t in output)
