"""Streaming fMRI metrics: per-voxel r against numpy, batch and rank reductions, constant voxels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from giblet_ds.metrics import FmriScores, VoxelCorrelation, loso_isc

T, V = 31, 12  # held-out TRs, voxels (even: the median averages the two middle values)


def predictions_and_targets(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Predictions correlated with the targets by a different amount per voxel."""
    rng = np.random.default_rng(seed)
    target = rng.normal(size=(T, V)) * 1.7 + 0.3
    weight = np.linspace(-0.5, 2.0, V)
    prediction = weight * target + rng.normal(size=(T, V)) + 5.0
    return prediction, target


def accumulate(x: np.ndarray, y: np.ndarray, splits: list[int] | None = None) -> VoxelCorrelation:
    acc = VoxelCorrelation(x.shape[1])
    bounds = np.cumsum([0, *(splits or [len(x)])])
    assert bounds[-1] == len(x)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        acc.update(torch.from_numpy(x[lo:hi]), torch.from_numpy(y[lo:hi]))
    return acc


def numpy_voxel_r(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(x[:, v], y[:, v])[0, 1] for v in range(x.shape[1])])


def test_per_voxel_r_matches_numpy_corrcoef() -> None:
    x, y = predictions_and_targets()
    r = accumulate(x, y).per_voxel_r()
    assert r.dtype == torch.float64 and r.shape == (V,)
    expected = numpy_voxel_r(x, y)
    np.testing.assert_allclose(r.numpy(), expected, rtol=0, atol=1e-12)
    # The fixture spans negative, weak and strong voxels.
    assert expected.min() < -0.2 and expected.max() > 0.9


def test_compute_summarizes_over_voxels() -> None:
    x, y = predictions_and_targets()
    scores = accumulate(x, y).compute()
    expected = numpy_voxel_r(x, y)
    assert isinstance(scores, FmriScores)
    assert scores.n_samples == T
    assert scores.r_mean == pytest.approx(float(expected.mean()), abs=1e-12)
    assert scores.r_median == pytest.approx(float(np.median(expected)), abs=1e-12)
    assert scores.frac_r_gt_0p1 == float((expected > 0.1).mean())
    assert set(scores.as_dict()) == {
        "fmri_r_mean",
        "fmri_r_median",
        "fmri_r_frac_gt_0p1",
        "fmri_spatial_r",
    }


def test_spatial_r_matches_numpy_per_tr_mean() -> None:
    x, y = predictions_and_targets(seed=3)
    scores = accumulate(x, y, [4, 20, 7]).compute()
    expected = np.mean([np.corrcoef(x[t], y[t])[0, 1] for t in range(T)])
    assert scores.spatial_r == pytest.approx(float(expected), abs=1e-12)


def test_three_uneven_batches_equal_one_batch() -> None:
    x, y = predictions_and_targets(seed=1)
    whole = accumulate(x, y)
    parts = accumulate(x, y, [5, 13, 13])
    torch.testing.assert_close(parts.state, whole.state, rtol=1e-12, atol=1e-12)
    a, b = parts.compute(), whole.compute()
    assert a.n_samples == b.n_samples == T
    for field in ("r_mean", "r_median", "frac_r_gt_0p1", "spatial_r"):
        assert getattr(a, field) == pytest.approx(getattr(b, field), abs=1e-12), field


def test_summing_the_state_of_two_ranks_is_exact() -> None:
    # Values on a 1/8 grid: every sum and product is exact in float64, so the reduction must be
    # bit-identical, whatever order the additions run in.
    rng = np.random.default_rng(2)
    x = rng.integers(-40, 40, size=(T, V)) / 8.0
    y = rng.integers(-40, 40, size=(T, V)) / 8.0 + 0.25 * x
    whole = accumulate(x, y)
    rank0, rank1 = accumulate(x[:17], y[:17], [9, 8]), accumulate(x[17:], y[17:], [3, 11])
    reduced = VoxelCorrelation(V)
    reduced.state = rank0.state + rank1.state  # what all_reduce(SUM) does
    assert torch.equal(reduced.state[: 5 * V + 1], whole.state[: 5 * V + 1])
    # The spatial r sum is a sum of rounded correlations: equal up to rounding.
    assert reduced.state[-1].item() == pytest.approx(whole.state[-1].item(), abs=1e-12)
    assert torch.equal(reduced.per_voxel_r(), whole.per_voxel_r())
    a, b = reduced.compute(), whole.compute()
    assert (a.r_mean, a.r_median, a.frac_r_gt_0p1) == (b.r_mean, b.r_median, b.frac_r_gt_0p1)


def test_summing_the_state_of_two_ranks_random_data() -> None:
    x, y = predictions_and_targets(seed=4)
    whole = accumulate(x, y)
    reduced = VoxelCorrelation(V)
    reduced.state = accumulate(x[:12], y[:12]).state + accumulate(x[12:], y[12:]).state
    torch.testing.assert_close(reduced.state, whole.state, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reduced.per_voxel_r(), whole.per_voxel_r(), rtol=0, atol=1e-12)


def test_a_constant_voxel_reads_zero_not_nan() -> None:
    x, y = predictions_and_targets()
    x[:, 2] = 4.0  # a dead output
    y[:, 5] = -1.0  # a constant target
    scores_acc = accumulate(x, y, [10, 21])
    r = scores_acc.per_voxel_r()
    assert r[2].item() == 0.0 and r[5].item() == 0.0
    assert torch.isfinite(r).all()
    keep = [v for v in range(V) if v not in (2, 5)]
    expected = np.zeros(V)
    expected[keep] = numpy_voxel_r(x[:, keep], y[:, keep])
    np.testing.assert_allclose(r.numpy()[keep], expected[keep], rtol=0, atol=1e-12)
    # Counted as 0 in the mean, not skipped.
    assert scores_acc.compute().r_mean == pytest.approx(float(r.mean()), abs=0)
    assert scores_acc.compute().r_mean == pytest.approx(expected[keep].sum() / V, abs=1e-12)


def test_a_constant_tr_reads_zero_spatial_r() -> None:
    x, y = predictions_and_targets()
    x[0] = 1.0
    scores = accumulate(x, y).compute()
    expected = np.mean([0.0] + [np.corrcoef(x[t], y[t])[0, 1] for t in range(1, T)])
    assert scores.spatial_r == pytest.approx(float(expected), abs=1e-12)


def test_low_precision_inputs_accumulate_in_float64() -> None:
    x, y = predictions_and_targets()
    acc = VoxelCorrelation(V)
    acc.update(torch.from_numpy(x).to(torch.bfloat16), torch.from_numpy(y).float())
    assert acc.state.dtype == torch.float64
    x16 = torch.from_numpy(x).to(torch.bfloat16).double().numpy()
    y32 = torch.from_numpy(y).float().double().numpy()
    np.testing.assert_allclose(acc.per_voxel_r().numpy(), numpy_voxel_r(x16, y32), atol=1e-12)


def test_shape_and_sample_count_errors() -> None:
    acc = VoxelCorrelation(V)
    with pytest.raises(ValueError) as info:
        acc.update(torch.zeros(3, V), torch.zeros(3, V + 1))
    assert str(info.value) == "prediction (3, 12) and target (3, 13) must both be (batch, 12)"
    with pytest.raises(ValueError) as info:
        acc.update(torch.zeros(3, 5), torch.zeros(3, 5))
    assert str(info.value) == "prediction (3, 5) and target (3, 5) must both be (batch, 12)"
    acc.update(torch.zeros(1, V), torch.zeros(1, V))
    with pytest.raises(ValueError) as info:
        acc.compute()
    assert str(info.value) == "per-voxel r needs at least 2 samples, got 1"


def test_loso_isc_matches_numpy() -> None:
    rng = np.random.default_rng(7)
    shared = rng.normal(size=(1, 211, 5))  # 211 TRs, 5 voxels
    subjects = shared + rng.normal(scale=[[[0.1, 0.5, 1.0, 2.0, 4.0]]], size=(3, 211, 5))
    expected = np.zeros(5)
    for s in range(3):
        others = np.delete(subjects, s, axis=0).mean(0)
        expected += [np.corrcoef(others[:, v], subjects[s, :, v])[0, 1] for v in range(5)]
    expected /= 3
    got = loso_isc(torch.from_numpy(subjects)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    # noisier voxels have lower ceilings
    assert list(np.argsort(-got)) == [0, 1, 2, 3, 4]


def test_loso_isc_needs_two_subjects() -> None:
    with pytest.raises(ValueError, match="needs >= 2 subjects, got 1"):
        loso_isc(torch.zeros(1, 4, 3))


def test_a_constant_voxel_not_exact_in_binary_reads_zero() -> None:
    """7.7 is not a binary fraction: the one-pass variance of a constant 7.7 keeps a rounding
    residue, and cov / sqrt(residue) read 2.2e-09 here instead of the promised 0. Within the
    rounding bound of its sums the variance is zero by construction."""
    x, y = predictions_and_targets()
    x[:, 2] = 7.7
    y[:, 5] = 0.1
    r = accumulate(x, y, [10, 21]).per_voxel_r()
    assert r[2].item() == 0.0 and r[5].item() == 0.0
    keep = [v for v in range(V) if v not in (2, 5)]
    np.testing.assert_allclose(r.numpy()[keep], numpy_voxel_r(x, y)[keep], rtol=0, atol=1e-12)
