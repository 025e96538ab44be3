"""bench/bench_context_limits.py: the window design matches the dataset's window, by hand."""

from __future__ import annotations

import numpy as np

from tests.bench_modules import load_bench


def test_window_design_reads_the_stimulus_behind_each_volume_and_pads_outside_the_split() -> None:
    features = np.arange(20, dtype=np.float64)[:, None] * [1.0, 10.0]  # TR i -> (i, 10 i)
    rows = np.array([5, 6, 7, 8])  # a split's TRs; volume row + 3 pairs with stimulus TR row
    design = load_bench("bench_context_limits").window_design(
        features, rows, lag=3, delays=[0, 3, 6]
    )
    # delay 0: TR row + 3 (inside the split only for row 5: TR 8); delay 3: TR row itself;
    # delay 6: TR row - 3 (inside only for row 8: TR 5); outside -> zeros, as the dataset pads
    expected = np.array(
        [[8, 80, 5, 50, 0, 0], [0, 0, 6, 60, 0, 0], [0, 0, 7, 70, 0, 0], [0, 0, 8, 80, 5, 50]],
        dtype=np.float64,
    )
    np.testing.assert_array_equal(design, expected)


def test_ridge_test_r_recovers_a_noise_free_linear_map() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 3))
    y = x @ rng.standard_normal((3, 4))
    r = load_bench("bench_context_limits").ridge_test_r(x[:40], y[:40], x[40:], y[40:])
    assert r > 0.999


def test_hrf_design_sees_the_movies_tail_in_volumes_after_it() -> None:
    features = np.zeros((6, 1))
    features[5] = 1.0  # an impulse at the movie's last TR
    hrf = np.array([0.0, 0.5, 0.3, 0.2])
    design = load_bench("bench_context_limits").hrf_design(features, np.array([4, 5, 6]), 2, hrf)
    # rows 4, 5, 6 read volumes 6, 7, 8: one, two and three TRs after the impulse (volume 8 lies
    # past the features' end, where a clipped index would read volume 5 instead)
    np.testing.assert_allclose(design[:, 0], [0.5, 0.3, 0.2])
