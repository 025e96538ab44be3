"""Ceiling, noise-normalized r, explained-variance fraction and the shift null on constructed data.

Subjects are built as a*signal + b*noise_s with the signal and every noise exactly zero-mean,
unit-variance and mutually orthogonal over time, so every inter-subject r is exactly
rho = a^2 / (a^2 + b^2) and every expected number below follows by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from giblet_ds.evaluation.scores import normalized_term, summarize_set
from giblet_ds.metrics import (
    ceiling_r,
    circular_shift_null,
    loso_isc,
    mean_reliability,
    pairwise_isc,
    spearman_brown,
    voxel_r,
)

T, S = 61, 4  # TRs, subjects
# per voxel (a, b): rho = 1/2, 1/5, 0 (no signal), 1/10
AMPLITUDES = [(1.0, 1.0), (1.0, 2.0), (0.0, 1.0), (1.0, 3.0)]


def orthonormal_series(n: int, seed: int = 0) -> np.ndarray:
    """(T, n) columns with mean 0, population variance 1, mutually orthogonal (exactly)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(np.c_[np.ones(T), rng.normal(size=(T, n))])
    return q[:, 1:] * math.sqrt(T)  # orthogonal to the constant column: zero mean


def constructed() -> tuple[np.ndarray, np.ndarray]:
    """subjects (S, T, V) and the noise-free signal (T, V)."""
    v = len(AMPLITUDES)
    series = orthonormal_series(v * (S + 1))
    subjects = np.empty((S, T, v))
    signal = np.empty((T, v))
    for j, (a, b) in enumerate(AMPLITUDES):
        block = series[:, j * (S + 1) : (j + 1) * (S + 1)]
        signal[:, j] = block[:, 0]
        for s in range(S):
            subjects[s, :, j] = a * block[:, 0] + b * block[:, 1 + s]
    return subjects, signal


def test_pairwise_isc_is_rho_exactly() -> None:
    subjects, _ = constructed()
    isc = pairwise_isc(torch.from_numpy(subjects)).numpy()
    np.testing.assert_allclose(isc, [0.5, 0.2, 0.0, 0.1], atol=1e-12)
    # the one-pass formula equals the average of all 6 pairwise np.corrcoef values
    pairs = [(i, j) for i in range(S) for j in range(i + 1, S)]
    for v in (0, 1, 3):
        manual = np.mean(
            [np.corrcoef(subjects[i, :, v], subjects[j, :, v])[0, 1] for i, j in pairs]
        )
        assert isc[v] == pytest.approx(manual, abs=1e-12)


def test_spearman_brown_by_hand() -> None:
    # k r / (1 + (k - 1) r): 4 * 0.5 / 2.5 = 0.8; 4 * 0.2 / 1.6 = 0.5; 4 * 0.1 / 1.3
    got = spearman_brown(torch.tensor([0.5, 0.2, 0.0, 0.1, -0.3]), 4).numpy()
    np.testing.assert_allclose(got, [0.8, 0.5, 0.0, 0.4 / 1.3, 0.0], atol=1e-15)
    assert spearman_brown(torch.tensor([0.5]), 1).item() == 0.5  # one subject: itself


def test_ceiling_of_the_subject_mean_is_its_r_with_the_signal() -> None:
    """The subject mean is signal + mean noise: var 1 + b^2/4 against the signal's a^2, so its r
    with the signal is a / sqrt(a^2 + b^2 / 4): 1/sqrt(1.25) = 0.894 and 1/sqrt(2) = 0.707. The
    Spearman-Brown ceiling must equal exactly that; leave-one-subject-out ISC understates it."""
    subjects, signal = constructed()
    reliability = mean_reliability(torch.from_numpy(subjects)).numpy()
    np.testing.assert_allclose(reliability, [0.8, 0.5, 0.0, 0.4 / 1.3], atol=1e-12)
    ceiling = ceiling_r(torch.from_numpy(reliability)).numpy()
    mean = subjects.mean(0)
    truth_r = voxel_r(torch.from_numpy(signal), torch.from_numpy(mean)).numpy()
    np.testing.assert_allclose(ceiling, [1 / math.sqrt(1.25), 1 / math.sqrt(2), 0.0, truth_r[3]],
                               atol=1e-12)  # fmt: skip
    np.testing.assert_allclose(ceiling[[0, 1, 3]], truth_r[[0, 1, 3]], atol=1e-12)
    # LOSO: one subject (var 2) against the mean of 3 others (var 1 + 1/3): 1/sqrt(8/3) = 0.612
    loso = loso_isc(torch.from_numpy(subjects)).numpy()
    assert loso[0] == pytest.approx(1 / math.sqrt(8 / 3), abs=1e-12)
    assert loso[0] < ceiling[0] - 0.28
    # one subject's ceiling (a single-subject run): sqrt(rho)
    single = ceiling_r(mean_reliability(torch.from_numpy(subjects), k=1)).numpy()
    np.testing.assert_allclose(single[:2], [math.sqrt(0.5), math.sqrt(0.2)], atol=1e-12)


def test_summary_of_a_perfect_model_reads_one() -> None:
    """A model predicting the noise-free signal reaches the ceiling: normalized r 1, EV fraction 1;
    the constant (training mean 0, variance 1) scores var(mean) = 1 + b^2/4 per voxel."""
    subjects, signal = constructed()
    target = subjects.mean(0)
    reliability = mean_reliability(torch.from_numpy(subjects)).numpy()
    model_r = voxel_r(torch.from_numpy(signal), torch.from_numpy(target)).numpy()
    ridge_pred = 0.5 * signal + orthonormal_series(4, seed=7)  # r = 0.5 / sqrt(0.25 + 1)
    ridge_r = voxel_r(torch.from_numpy(ridge_pred), torch.from_numpy(target)).numpy()
    kw = dict(split="test", target=target, model_pred=signal, model_r=model_r,
              train_mean=np.zeros(4), train_var=np.ones(4), ridge_pred=ridge_pred,
              ridge_r=ridge_r, reliability=reliability)  # fmt: skip
    chosen = summarize_set("reliable", np.array([True, True, False, False]), **kw)
    assert chosen.n_trs == T and chosen.n_voxels == 2
    assert chosen.ceiling_r == pytest.approx((1 / math.sqrt(1.25) + 1 / math.sqrt(2)) / 2)
    assert chosen.model_r_normalized == pytest.approx(1.0, abs=1e-12)
    assert chosen.model_ev_fraction == pytest.approx(1.0, abs=1e-12)  # (0.8 + 0.5) / (0.8 + 0.5)
    assert chosen.constant_term == pytest.approx((1.25 + 2.0) / 2, abs=1e-12)
    assert chosen.model_term == pytest.approx((0.25 + 1.0) / 2, abs=1e-12)  # mean noise b^2/4
    # the whole mask: no ceiling averaged over it, said so
    whole = summarize_set("all", np.ones(4, bool), whole_brain=True, **kw)
    assert whole.ceiling_r is None and whole.model_r_normalized is None
    assert whole.model_ev_fraction is None and "not averaged over the whole mask" in whole.notes[0]
    assert whole.model_r == pytest.approx(float(model_r.mean()))
    with pytest.raises(ValueError, match="empty"):
        summarize_set("roi", np.zeros(4, bool), **kw)


def test_normalized_term_of_the_mean_reads_one_on_its_own_trs() -> None:
    rng = np.random.default_rng(3)
    y = rng.normal(size=(50, 6)) * np.arange(1, 7) + 2.0
    term = normalized_term(y.mean(0), y, y.var(0), np.arange(6))
    assert term == pytest.approx(1.0, abs=1e-12)


def test_shift_null_of_white_noise_is_the_t_distribution_rate() -> None:
    """No signal, 14 TRs, white noise: P(r > 0.1) = P(t_12 > 0.1 sqrt(12 / 0.99)) = 0.367 (the
    "39% of voxels > 0.1" of a model that learned nothing)."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(14, 20000)))
    y = torch.from_numpy(rng.normal(size=(14, 20000)))
    null = circular_shift_null(x, y, threshold=0.1, n_shifts=20, min_shift=2)
    expected = float(stats.t.sf(0.1 * math.sqrt(12 / 0.99), 12))
    assert expected == pytest.approx(0.367, abs=0.001)
    assert null.null_mean == pytest.approx(expected, abs=0.01)
    assert null.observed == pytest.approx(expected, abs=0.015)
    assert null.p_value > 0.05


def test_shift_null_keeps_autocorrelation() -> None:
    """Two independent AR(1) series (phi = 0.8) over 200 TRs: var(r) = (1 + phi^2) / (1 - phi^2)
    / T (Bartlett), so P(r > 0.1) = 1 - Phi(0.1 / sqrt(4.556 / 200)) = 0.253, far above the 0.079
    of white noise. A real signal sits far above its null."""
    rng = np.random.default_rng(1)
    n, v, phi = 200, 4000, 0.8

    def ar1() -> np.ndarray:
        e = rng.normal(size=(n + 100, v))
        out = np.zeros_like(e)
        for t in range(1, n + 100):
            out[t] = phi * out[t - 1] + e[t]
        return out[100:]

    x, y = ar1(), ar1()
    null = circular_shift_null(torch.from_numpy(x), torch.from_numpy(y), n_shifts=40, min_shift=20)
    bartlett = float(stats.norm.sf(0.1 / math.sqrt((1 + phi**2) / (1 - phi**2) / n)))
    white = float(stats.t.sf(0.1 * math.sqrt((n - 2) / 0.99), n - 2))
    assert bartlett == pytest.approx(0.253, abs=0.001) and white == pytest.approx(0.079, abs=0.001)
    assert null.null_mean == pytest.approx(bartlett, abs=0.03)
    real = circular_shift_null(torch.from_numpy(y + x), torch.from_numpy(y), n_shifts=40)
    assert real.observed == 1.0 and real.p_value == pytest.approx(1 / 41)


def test_a_rounding_residue_of_zero_reliability_gives_a_zero_ceiling() -> None:
    """Voxel 2 has no signal: its pairwise ISC is 0 by construction, but the one-pass pair sum can
    leave a residue whose sign and size depend on the BLAS (7.4e-17 for this 1e-16 perturbation),
    and the ceiling's square root made that 1.7e-08 (a fresh machine failed the test above so)."""
    subjects, _ = constructed()
    rng = np.random.default_rng(0)
    perturbed = torch.from_numpy(subjects * (1 + rng.normal(size=subjects.shape) * 1e-16))
    isc = pairwise_isc(perturbed).numpy()
    assert isc[2] == 0.0
    np.testing.assert_allclose(isc, [0.5, 0.2, 0.0, 0.1], atol=1e-12)
    ceiling = ceiling_r(mean_reliability(perturbed)).numpy()
    assert ceiling[2] == 0.0
    np.testing.assert_allclose(ceiling[[0, 1]], [1 / math.sqrt(1.25), 1 / math.sqrt(2)], atol=1e-12)


def test_ceiling_reads_zero_below_the_reliability_resolution() -> None:
    """A reliability residue handed in from elsewhere (the scores' own sqrt did the same) reads 0."""
    got = ceiling_r(torch.tensor([3e-16, -1e-3, 0.25, 1e-6], dtype=torch.float64)).numpy()
    np.testing.assert_array_equal(got, [0.0, 0.0, 0.5, 1e-3])
    subjects, signal = constructed()
    reliability = np.array([0.8, 0.5, 3e-16, 0.4 / 1.3])
    chosen = summarize_set("noise only", np.array([False, False, True, False]), split="test",
                           target=subjects.mean(0), model_pred=signal,
                           model_r=np.zeros(4), train_mean=np.zeros(4), train_var=np.ones(4),
                           reliability=reliability)  # fmt: skip
    assert chosen.ceiling_r == 0.0 and chosen.model_r_normalized is None
