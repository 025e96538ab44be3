"""fMRI prediction metrics that accumulate over batches and reduce across ranks exactly.

The field's standard is per-voxel Pearson r over held-out time (one r per voxel, then mean / median
/ fraction above 0.1). The old system's "fMRI correlation" was a spatial r across voxels per TR; it
is kept (``spatial_r``) only for comparison. Everything reduces to sums, so adding the state tensors
of every rank (all_reduce SUM) and then calling :meth:`compute` is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "FmriScores",
    "ShiftNull",
    "VoxelCorrelation",
    "ceiling_r",
    "circular_shift_null",
    "loso_isc",
    "mean_reliability",
    "pairwise_isc",
    "spearman_brown",
    "subject_ceiling_r",
    "voxel_r",
]


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
        # One-pass variances cancel: a constant series leaves a rounding residue of up to about
        # n * eps * sum(x^2) (machine- and BLAS-dependent), which would turn the promised 0 into
        # cov / sqrt(residue) (5.9e-09 for a constant 7.7 over 61 TRs). Below that bound the
        # variance is zero by construction.
        var_x = _clip_residue(sxx - sx * sx / n, n * sxx)
        var_y = _clip_residue(syy - sy * sy / n, n * syy)
        denom = torch.sqrt(var_x * var_y)
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


def subject_ceiling_r(subjects: torch.Tensor) -> torch.Tensor:
    """Each subject's own noise ceiling per voxel, (S, T, V) -> (S, V) float64, from one viewing.

    The best r any prediction can reach against subject s's noisy series is the correlation of
    that series with its noise-free signal, sqrt(rel_s). With one viewing, rel_s is estimated
    from r_s,o, the correlation of subject s with the mean of the other S - 1 subjects, corrected
    for the noise left in that mean (Spearman's correction for attenuation, 1904):

        ceiling_s = r_s,o / sqrt(rel_o),   rel_o = SB(mean pairwise r of the others, S - 1)

    with SB(r, k) = k r / (1 + (k - 1) r) (:func:`spearman_brown`); the leave-one-subject-out
    estimate of Lage-Castellanos et al. (2019, PLoS Comput Biol 15: e1006397, "Methods for
    computing the maximum performance of computational models of fMRI responses") and Nastase
    et al. (2019, SCAN 14: 667). Model: subject = signal + independent noise; exact when the
    others share one noise level. With S = 2 the other subject's reliability is taken as the
    pair's r (equal noise), so both ceilings are sqrt(r_12). Where r_s,o or rel_o is <= 0 (no
    shared signal measured) the ceiling is 0. Needs S >= 2 (ValueError otherwise).
    """
    n_subjects, _, n_voxels = subjects.shape
    if subjects.dim() != 3 or n_subjects < 2:
        raise ValueError(
            f"a subject's own ceiling needs (subjects >= 2, TRs, voxels), got {tuple(subjects.shape)}"
        )
    data = subjects.to(torch.float64)
    total = data.sum(0)
    out = torch.zeros(n_subjects, n_voxels, dtype=torch.float64)
    for s in range(n_subjects):
        others_mean = (total - data[s]) / (n_subjects - 1)
        r_so = voxel_r(others_mean, data[s])
        if n_subjects == 2:
            rel_o = r_so.clamp(min=0.0)
        else:
            others = torch.cat([data[:s], data[s + 1 :]])
            rel_o = spearman_brown(pairwise_isc(others), n_subjects - 1)
        ok = (r_so > 0) & (rel_o > 0)
        out[s] = torch.where(ok, r_so / rel_o.clamp_min(1e-300).sqrt(), torch.zeros_like(r_so))
    return out


_VOXEL_BLOCK = 8192
_EPS = torch.finfo(torch.float64).eps
RELIABILITY_RESOLUTION = 1e-12
"""Reliabilities below this are read as 0 by :func:`ceiling_r`: an estimate from T TRs has a
sampling error near 1/sqrt(T) (>= 1e-3 for any real recording), so a value this small is a float64
rounding residue, and its square root (1e-8 from 1e-16) would read as a ceiling."""


def _clip_residue(value: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``value`` with every entry no larger than 4 eps x ``scale`` in magnitude set to exactly 0.

    ``scale`` bounds the rounding error of the sums ``value`` was computed from (terms x their
    magnitude): within it a quantity that is zero by construction cannot be told from 0, and
    left as is it reaches square roots and ratios as a machine-dependent number."""
    return torch.where(value.abs() <= 4 * _EPS * scale, torch.zeros_like(value), value)


def voxel_r(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-voxel temporal Pearson r of two (T, V) series, float64 (V,); 0 where either is constant."""
    acc = VoxelCorrelation(prediction.shape[-1])
    acc.update(torch.as_tensor(prediction), torch.as_tensor(target))
    return acc.per_voxel_r()


def pairwise_isc(subjects: torch.Tensor) -> torch.Tensor:
    """Mean over all subject pairs of the per-voxel temporal r, (S, T, V) -> (V,) float64.

    With each subject z-scored per voxel over these TRs (population sd), r_ij = mean_t(z_i z_j) and
    the sum over pairs i < j is ((sum_i z_i)^2 - sum_i z_i^2) / 2, so all S(S-1)/2 pairs cost one
    pass. A voxel constant in one subject contributes r = 0 for its pairs. Needs S >= 2.
    """
    n_subjects = subjects.shape[0]
    if subjects.dim() != 3 or n_subjects < 2:
        raise ValueError(
            f"pairwise ISC needs (subjects >= 2, TRs, voxels), got {tuple(subjects.shape)}"
        )
    out = torch.empty(subjects.shape[2], dtype=torch.float64)
    for first in range(0, subjects.shape[2], _VOXEL_BLOCK):  # float64 copies of a block only
        data = subjects[:, :, first : first + _VOXEL_BLOCK].to(torch.float64)
        mean = data.mean(1, keepdim=True)
        centered = data - mean
        # a constant series can keep a rounding residue after centring: zero it, not z-score it
        n_trs = data.shape[1]
        variance = _clip_residue(centered.pow(2).mean(1, keepdim=True), n_trs * mean.pow(2))
        sd = variance.sqrt()
        z = torch.where(sd > 0, centered / sd.clamp_min(1e-300), torch.zeros_like(centered))
        total = z.sum(0)
        squares, own = total.pow(2).mean(0), z.pow(2).mean(1).sum(0)
        # A difference of two sums of magnitude ~S: uncorrelated subjects leave a residue (7e-17
        # here, another BLAS another sign) that the ceiling's square root turns into 1.7e-08.
        pair_sum = _clip_residue(squares - own, (n_trs + n_subjects) * (squares + own)) / 2
        out[first : first + data.shape[2]] = pair_sum / (n_subjects * (n_subjects - 1) / 2)
    return out


def spearman_brown(r: torch.Tensor, k: float) -> torch.Tensor:
    """Reliability of the mean of k measurements whose pairwise correlation is r:
    k r / (1 + (k - 1) r) (Spearman 1910, Brown 1910). r <= 0 gives 0 (no shared signal)."""
    r = torch.as_tensor(r, dtype=torch.float64).clamp(min=0.0, max=1.0)
    return k * r / (1 + (k - 1) * r)


def mean_reliability(subjects: torch.Tensor, *, k: int | None = None) -> torch.Tensor:
    """Per-voxel reliability (V,) of the average of ``k`` subjects (default: all S), from the mean
    pairwise ISC of ``subjects`` (S, T, V) on these TRs, Spearman-Brown corrected.

    Model: subject s = signal + noise_s, independent noises of equal variance. The pairwise r is
    rho = var(signal) / var(subject); the mean of k subjects has var(signal) / var(mean) =
    k rho / (1 + (k - 1) rho): the squared correlation of that mean with the signal. k = 1: the
    reliability of one subject (the ceiling's square for a single-subject model).
    """
    isc = pairwise_isc(subjects)
    return spearman_brown(isc, subjects.shape[0] if k is None else k)


def ceiling_r(reliability: torch.Tensor) -> torch.Tensor:
    """The largest expected r of any prediction against a target of this reliability: the
    correlation of the target with its own noise-free signal, sqrt(reliability). Reliabilities
    below :data:`RELIABILITY_RESOLUTION` (rounding residues, negative estimates) give 0."""
    rel = torch.as_tensor(reliability, dtype=torch.float64)
    return torch.where(rel < RELIABILITY_RESOLUTION, torch.zeros_like(rel), rel).sqrt()


@dataclass(frozen=True)
class ShiftNull:
    """Fraction of voxels with r > ``threshold`` and its chance level from circular time shifts."""

    threshold: float
    observed: float
    """Fraction of voxels with r > threshold for the real alignment."""
    null_mean: float
    """Mean of that fraction over the shifted alignments: what no signal at all reaches."""
    null_p95: float
    """95th percentile of the null fractions."""
    p_value: float
    """(1 + #null >= observed) / (1 + n_shifts)."""
    n_shifts: int

    def as_dict(self) -> dict[str, float]:
        return {
            "threshold": self.threshold,
            "fraction": self.observed,
            "null_mean": self.null_mean,
            "null_p95": self.null_p95,
            "p_value": self.p_value,
            "n_shifts": self.n_shifts,
        }


def circular_shift_null(
    prediction: torch.Tensor,
    target: torch.Tensor,
    *,
    threshold: float = 0.1,
    n_shifts: int = 200,
    min_shift: int = 5,
    seed: int = 0,
) -> ShiftNull:
    """The fraction of voxels (columns of (T, V) series) with r > ``threshold``, with its null.

    The null rolls the prediction in time by a random shift in [min_shift, T - min_shift]
    (circularly) and recomputes the fraction: this keeps each series' autocorrelation, which
    inflates chance correlations on short splits far above what independent samples give.
    """
    n_trs = prediction.shape[0]
    if n_trs < 2 * min_shift + 1:
        raise ValueError(f"circular shifts by >= {min_shift} TRs need >= {2 * min_shift + 1} TRs")
    x = torch.as_tensor(prediction, dtype=torch.float64)
    y = torch.as_tensor(target, dtype=torch.float64)
    observed = float((voxel_r(x, y) > threshold).double().mean())
    generator = torch.Generator().manual_seed(seed)
    shifts = torch.randint(min_shift, n_trs - min_shift + 1, (n_shifts,), generator=generator)
    null = torch.tensor(
        [float((voxel_r(torch.roll(x, int(k), 0), y) > threshold).double().mean()) for k in shifts],
        dtype=torch.float64,
    )
    return ShiftNull(
        threshold=threshold,
        observed=observed,
        null_mean=float(null.mean()),
        null_p95=float(torch.quantile(null, 0.95)),
        p_value=float((1 + (null >= observed).sum()) / (1 + n_shifts)),
        n_shifts=n_shifts,
    )


def _rowwise_r(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xc = x - x.mean(1, keepdim=True)
    yc = y - y.mean(1, keepdim=True)
    denom = torch.sqrt((xc * xc).sum(1) * (yc * yc).sum(1))
    return torch.where(
        denom > 0, (xc * yc).sum(1) / denom.clamp_min(1e-300), torch.zeros_like(denom)
    )
