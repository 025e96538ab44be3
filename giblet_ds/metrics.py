"""fMRI prediction metrics that accumulate over batches and reduce across ranks exactly.

The field's standard is per-voxel Pearson r over held-out time (one r per voxel, then mean / median
/ fraction above 0.1). The old system's "fMRI correlation" was a spatial r across voxels per TR; it
is kept (``spatial_r``) only for comparison. Everything reduces to sums, so adding the state tensors
of every rank (all_reduce SUM) and then calling :meth:`compute` is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FmriScores", "VoxelCorrelation", "loso_isc"]


@dataclass(frozen=True)
class FmriScores:
    r_mean: float
    """Mean over voxels of per-voxel temporal Pearson r."""
    r_median: float
    """Median over voxels of per-voxel r."""
    frac_r_gt_0p1: float
    """Fraction of voxels with r > 0.1."""
    spatial_r: float
    """The old system's metric: mean over TRs of the r across voxels."""
    n_samples: int
    """TRs accumulated."""

    def as_dict(self) -> dict[str, float]:
        return {
            "fmri_r_mean": self.r_mean,
            "fmri_r_median": self.r_median,
            "fmri_r_frac_gt_0p1": self.frac_r_gt_0p1,
            "fmri_spatial_r": self.spatial_r,
        }


class VoxelCorrelation:
    """Running sums for per-voxel r (over time) and per-TR spatial r, in float64."""

    def __init__(self, n_voxels: int, device: torch.device | str = "cpu") -> None:
        self.n_voxels = n_voxels
        # rows: sum x, sum y, sum x^2, sum y^2, sum xy (per voxel); then count, spatial r sum.
        self.state = torch.zeros(5 * n_voxels + 2, dtype=torch.float64, device=device)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """prediction, target: (B, n_voxels)."""
        if prediction.shape != target.shape or prediction.shape[-1] != self.n_voxels:
            raise ValueError(
                f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must both "
                f"be (batch, {self.n_voxels})"
            )
        x = prediction.detach().to(self.state.device, torch.float64)
        y = target.detach().to(self.state.device, torch.float64)
        v = self.n_voxels
        sums = torch.stack([x.sum(0), y.sum(0), (x * x).sum(0), (y * y).sum(0), (x * y).sum(0)])
        self.state[: 5 * v] += sums.flatten()
        self.state[5 * v] += x.shape[0]
        self.state[5 * v + 1] += _rowwise_r(x, y).sum()

    def compute(self) -> FmriScores:
        n = self.state[5 * self.n_voxels]
        if n < 2:
            raise ValueError(f"per-voxel r needs at least 2 samples, got {int(n)}")
        r = self.per_voxel_r()
        return FmriScores(
            r_mean=float(r.mean()),
            # torch's median() returns the lower of the two middle values; quantile averages them
            r_median=float(torch.quantile(r, 0.5)),
            frac_r_gt_0p1=float((r > 0.1).double().mean()),
            spatial_r=float(self.state[5 * self.n_voxels + 1] / n),
            n_samples=int(n),
        )

    def per_voxel_r(self) -> torch.Tensor:
        """(n_voxels,) temporal r per voxel."""
        v = self.n_voxels
        sx, sy, sxx, syy, sxy = self.state[: 5 * v].view(5, v)
        n = self.state[5 * v]
        cov = sxy - sx * sy / n
        denom = torch.sqrt((sxx - sx * sx / n) * (syy - sy * sy / n))
        # A voxel with a constant prediction or target has no defined r: count it as 0, not NaN,
        # so the mean does not silently skip dead outputs.
        return torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))


def loso_isc(subjects: torch.Tensor) -> torch.Tensor:
    """Leave-one-subject-out inter-subject correlation per voxel, (S, T, V) -> (V,).

    For each subject, the per-voxel temporal r between its series and the mean of the other
    subjects; averaged over subjects. How much of one subject's signal is shared (stimulus-driven);
    the ceiling for predicting one subject. Needs at least two subjects.
    """
    n_subjects, n_trs, n_voxels = subjects.shape
    if n_subjects < 2:
        raise ValueError(f"a leave-one-subject-out ceiling needs >= 2 subjects, got {n_subjects}")
    data = subjects.to(torch.float64)
    total = data.sum(0)
    ceiling = torch.zeros(n_voxels, dtype=torch.float64)
    for s in range(n_subjects):
        others = (total - data[s]) / (n_subjects - 1)
        acc = VoxelCorrelation(n_voxels)
        acc.update(others, data[s])
        ceiling += acc.per_voxel_r()
    return ceiling / n_subjects


def _rowwise_r(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xc = x - x.mean(1, keepdim=True)
    yc = y - y.mean(1, keepdim=True)
    denom = torch.sqrt((xc * xc).sum(1) * (yc * yc).sum(1))
    return torch.where(
        denom > 0, (xc * yc).sum(1) / denom.clamp_min(1e-300), torch.zeros_like(denom)
    )
