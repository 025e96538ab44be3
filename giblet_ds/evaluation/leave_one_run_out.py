"""Leave-one-run-out evaluation of the ridge baseline: for each run of a many-run store, the
voxelwise kernel ridge (the baseline of :mod:`giblet_ds.evaluation.ridge`) is fitted on every
other run's rows and scored, per voxel, on all rows of the held-out run.

Runs are separate scans, so no gap is needed between the fitting rows and the scored run; the
delayed features never reach across a run (ridge_inputs). Per-voxel alphas are chosen by
5-fold cross-validation over contiguous blocks of the fitting rows alone. This is the field's
standard held-out-run estimate for a linear encoding model; the trained network is scored on
its own held-out runs by ``evaluate`` (``split_by: run`` stores).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from giblet_ds.errors import GibletError
from giblet_ds.evaluation.ridge import ALPHAS, CV_FOLDS, _backend, _to_numpy, read_target
from giblet_ds.evaluation.ridge_inputs import ridge_design
from giblet_ds.metrics import voxel_r
from giblet_ds.store import StoreInfo

__all__ = ["leave_one_run_out"]


def leave_one_run_out(info: StoreInfo, *, subject: int | None = None) -> dict[str, Any]:
    """Per held-out run: TR count, mean per-voxel ridge r and the per-voxel r (V,); and the
    mean over runs. GibletError for a store of fewer than 2 runs."""
    runs = info.runs
    if len(runs) < 2:
        raise GibletError(
            f"{info.path}: leave-one-run-out needs a store of 2 or more runs; it holds "
            f"{len(runs)} (build one with --bids or --runs)"
        )
    from himalaya.kernel_ridge import KernelRidgeCV
    from sklearn.model_selection import KFold

    backend = _backend()
    design, _ = ridge_design(info)
    target = read_target(info, np.arange(info.n_trs), subject)
    out: dict[str, Any] = {"backend": backend, "target": "mean" if subject is None else subject}
    per_run: dict[str, Any] = {}
    for r, run_id in enumerate(runs.ids):
        held = runs.rows(r)
        fit = np.setdiff1d(np.arange(info.n_trs), held)
        model = KernelRidgeCV(
            alphas=ALPHAS, kernel="linear", fit_intercept=True,
            cv=KFold(n_splits=CV_FOLDS, shuffle=False),
            solver_params={"n_targets_batch": 20000, "n_alphas_batch": 5},
        )  # fmt: skip
        model.fit(design[fit], target[fit])
        predicted = np.asarray(_to_numpy(model.predict(design[held])), np.float32)
        r_voxel = voxel_r(torch.from_numpy(predicted), torch.from_numpy(target[held])).numpy()
        per_run[run_id] = {
            "n_trs": len(held),
            "fit_trs": len(fit),
            "ridge_r_mean": float(r_voxel.mean()),
            "ridge_r": r_voxel,
        }
    out["runs"] = per_run
    out["ridge_r_mean"] = float(np.mean([v["ridge_r_mean"] for v in per_run.values()]))
    return out
