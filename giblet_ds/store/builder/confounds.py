"""Confound removal per run, before z-scoring: fMRIPrep's confounds read by nilearn's
``load_confounds`` (never a parser of our own), regressed out of each subject's run.

The regression is fitted on the run's z-scoring rows only (its training rows with
``split_by: time``; all its rows for a whole run), then applied to every row of the run, so no
held-out volume shapes the nuisance model. Strategies that drop volumes (``scrub``,
``non_steady_state``) are refused: nothing is cropped silently. The intercept is kept (the
z-scoring that follows removes the mean anyway).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from giblet_ds.errors import StoreError

__all__ = [
    "STRATEGIES", "OPTIONS", "check_confounds", "check_fit_rows", "load_run_confounds",
    "regress_out",
]  # fmt: skip

STRATEGIES = ("motion", "high_pass", "wm_csf", "global_signal", "compcor")
"""nilearn strategies that keep every volume."""
OPTIONS = ("strategy", "motion", "wm_csf", "global_signal", "compcor", "n_compcor")
"""Keys of the ``confounds`` setting: ``strategy`` and load_confounds' options for it."""


def check_confounds(value: Mapping[str, Any] | None) -> list[str]:
    """Problems with a ``confounds`` setting (empty: fine)."""
    if value is None:
        return []
    problems = []
    unknown = sorted(set(value) - set(OPTIONS))
    if unknown:
        problems.append(f"confounds: unknown key(s) {unknown}; valid keys: {list(OPTIONS)}")
    strategy = value.get("strategy")
    if not strategy or not isinstance(strategy, list | tuple):
        problems.append(f"confounds.strategy must list some of {STRATEGIES}, got {strategy!r}")
    else:
        bad = [s for s in strategy if s not in STRATEGIES]
        if bad:
            problems.append(
                f"confounds.strategy: {bad} not allowed (volume-dropping strategies are refused);"
                f" choose from {STRATEGIES}"
            )
    return problems


def load_run_confounds(bold: Path, setting: Mapping[str, Any], n_volumes: int) -> np.ndarray:
    """(n_volumes, k) float64 confounds of one fMRIPrep BOLD file, by nilearn."""
    from nilearn.interfaces.fmriprep import load_confounds

    options = {k: v for k, v in setting.items() if k != "strategy"}
    try:
        frame, sample_mask = load_confounds(
            str(bold), strategy=tuple(setting["strategy"]), **options
        )
    except Exception as err:  # nilearn raises ValueError / MissingConfoundError / FileNotFound
        raise StoreError(
            bold, f"cannot load its fMRIPrep confounds: {err}", dataset="confounds"
        ) from None
    if sample_mask is not None:
        raise StoreError(bold, "the confounds strategy drops volumes", dataset="confounds")
    values = frame.to_numpy(dtype=np.float64)
    if values.shape[0] != n_volumes:
        raise StoreError(
            bold, "confounds do not have one row per volume", dataset="confounds",
            expected=n_volumes, actual=values.shape[0],
        )  # fmt: skip
    return values


def check_fit_rows(n_regressors: int, n_rows: int, where: str) -> None:
    """Refuse fewer than 4 fitting rows per regressor (intercept included); see regress_out."""
    need = 4 * (n_regressors + 1)
    if n_rows < need:
        raise StoreError(
            where, f"{n_regressors} confound regressors (and an intercept) need at least {need} "
            f"fitting rows, the run z-scores on {n_rows}; choose fewer (e.g. motion: basic), "
            "split_by: run, or longer runs", dataset="confounds",
        )  # fmt: skip


def regress_out(
    series: np.ndarray, confounds: np.ndarray, fit_rows: np.ndarray, where: str = "confounds"
) -> np.ndarray:
    """``series`` (n, V) minus its least-squares fit on ``confounds`` (n, k) over ``fit_rows``
    (the intercept kept); float32, in place. Fewer than 4 fitting rows per regressor is
    refused: the fit would absorb the signal of the rows it is fitted on, and their tiny
    residual variance would blow the z-scores of the other rows up."""
    design = np.column_stack([confounds, np.ones(len(confounds))])
    check_fit_rows(confounds.shape[1], len(fit_rows), where)
    beta, *_ = np.linalg.lstsq(design[fit_rows], series[fit_rows].astype(np.float64), rcond=None)
    series -= (design[:, :-1] @ beta[:-1]).astype(np.float32)
    return series
