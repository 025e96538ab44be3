"""The ridge baseline: voxelwise kernel ridge (himalaya) from the store's inputs to the fMRI.

Per-voxel alphas are chosen by 5-fold cross-validation over contiguous blocks of the training TRs
alone (held-out TRs never choose a hyperparameter); the fit uses every training TR. himalaya runs on
its torch backend, on the GPU when one is present. Predictions for the validation and test TRs are
cached beside the store, keyed by the store's build hash, the target (subject mean or one subject)
and the feature description, so evaluating many checkpoints of one store fits once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from giblet_ds.errors import GibletError
from giblet_ds.evaluation.ridge_inputs import description_hash, ridge_design
from giblet_ds.store import StoreInfo
from giblet_ds.store import schema as store_schema
from giblet_ds.store.reader import open_read_only
from giblet_ds.store.smoothing import MaskedGaussianSmoothing
from giblet_ds.store.stats import read_rows

__all__ = ["ALPHAS", "RidgeBaseline", "fit_ridge_baseline", "read_target", "ridge_estimator"]

log = logging.getLogger("giblet_ds")

ALPHAS = np.logspace(-2, 7, 19)
CV_FOLDS = 5


@dataclass
class RidgeBaseline:
    """Ridge predictions (T_split, V) per held-out split, the per-voxel alphas and provenance."""

    predictions: dict[str, np.ndarray]
    alphas: np.ndarray
    cache: Path
    from_cache: bool
    fit_seconds: float
    backend: str


def read_target(info: StoreInfo, rows: np.ndarray, subject: int | None) -> np.ndarray:
    """The fMRI the model is trained on (subject mean, or one subject) at ``rows``, float32."""
    out = np.empty((len(rows), info.n_voxels), np.float32)
    with open_read_only(info.path) as handle:
        if subject is None:
            done = 0
            for block in read_rows(handle[store_schema.FMRI_MEAN], np.asarray(rows)):
                out[done : done + len(block)] = block
                done += len(block)
        else:
            out[:] = handle[store_schema.FMRI_SUBJECTS][subject, np.asarray(rows).tolist()]
    return out


def _backend() -> str:
    import torch
    from himalaya.backend import set_backend

    name = "torch_cuda" if torch.cuda.is_available() else "torch"
    set_backend(name, on_error="raise")
    return name


def ridge_estimator() -> Any:
    """The baseline's unfitted estimator: himalaya's linear-kernel ridge with one alpha per voxel
    from :data:`ALPHAS`, chosen by :data:`CV_FOLDS`-fold CV over contiguous blocks of the fitting
    rows (a time series: no shuffling). GibletError when himalaya is missing."""
    try:
        from himalaya.kernel_ridge import KernelRidgeCV
    except ImportError as exc:  # a dependency, but say what to do rather than a traceback
        raise GibletError("the ridge baseline needs himalaya: pip install himalaya") from exc
    from sklearn.model_selection import KFold

    return KernelRidgeCV(
        alphas=ALPHAS,
        kernel="linear",
        fit_intercept=True,
        cv=KFold(n_splits=CV_FOLDS, shuffle=False),  # contiguous blocks: time series
        solver_params={"n_targets_batch": 20000, "n_alphas_batch": 5},
    )


def fit_ridge_baseline(
    info: StoreInfo,
    *,
    subject: int | None = None,
    cache_dir: str | Path | None = None,
    refit: bool = False,
    smoothing: MaskedGaussianSmoothing | None = None,
) -> RidgeBaseline:
    """Fit (or load from the cache) the baseline; see the module doc. ``subject``: index of the
    subject the target is (None: the subject mean). ``smoothing``: the training targets are
    smoothed as the run's were (data.smoothing_fwhm_mm), so the ridge fits what the network
    trained on; its predictions are scored against the unsmoothed fMRI like the network's."""
    started = time.perf_counter()
    design, description = ridge_design(info)
    target_name = "mean" if subject is None else f"subject{subject}"
    if smoothing is not None:
        target_name += f"_fwhm{smoothing.fwhm_mm!r}"  # repr: 6 and 6.0000004 are two fits
    key = f"ridge_{info.build_hash[:16]}_{target_name}_{description_hash(description)}"
    folder = Path(cache_dir) if cache_dir is not None else info.path.parent / ".giblet_cache"
    cache = folder / f"{key}.npz"
    if cache.is_file() and not refit:
        with np.load(cache) as saved:
            predictions = {s: saved[f"pred_{s}"] for s in ("val", "test")}
            alphas = saved["alphas"]
            backend = str(saved["backend"])
        log.info("ridge baseline from the cache %s", cache)
        return RidgeBaseline(
            predictions, alphas, cache, True, time.perf_counter() - started, backend
        )

    model = ridge_estimator()
    backend = _backend()
    train = np.asarray(info.splits["train"])
    if len(train) < 2 * CV_FOLDS:
        raise GibletError(
            f"{info.path}: {len(train)} training TRs are too few for {CV_FOLDS}-fold ridge CV"
        )
    y_train = read_target(info, train, subject)
    if smoothing is not None:
        y_train = smoothing.smooth_array(y_train)
    model.fit(design[train], y_train)
    predictions = {}
    for split in ("val", "test"):
        rows = np.asarray(info.splits[split])
        predictions[split] = np.asarray(_to_numpy(model.predict(design[rows])), np.float32)
    alphas = np.asarray(_to_numpy(model.best_alphas_), np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial.npz")
    np.savez(partial, pred_val=predictions["val"], pred_test=predictions["test"], alphas=alphas,
             backend=np.array(backend))  # fmt: skip
    partial.replace(cache)  # a crash never leaves a half-written cache that looks complete
    seconds = time.perf_counter() - started
    log.info("ridge baseline fit in %.1f s (%s backend), cached at %s", seconds, backend, cache)
    return RidgeBaseline(predictions, alphas, cache, False, seconds, backend)


def _to_numpy(value: object) -> np.ndarray:
    from himalaya.backend import get_backend

    return np.asarray(get_backend().to_numpy(value))
