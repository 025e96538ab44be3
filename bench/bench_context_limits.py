#!/usr/bin/env python
"""How high do linear models score on the demo's held-out TRs when handed the PLANTED features?

The demo plants BOLD = Glover HRF * (5 stimulus features @ weights) + noise (giblet_ds.demo_data).
This script fits voxelwise ridge models (himalaya RidgeCV, per-voxel alphas by 5-fold contiguous CV
on the training TRs only, the evaluation's alpha grid) from the true features, not from the
store's inputs, and scores them on the test split's TRs and the reliable voxels exactly as
tools/evaluate.py does (subject-mean target; training-TR ISC > 0.1). Only the oracle is a ceiling;
the other rows are reference points: what a model reaches if it learns the features perfectly and
then has to learn its temporal kernel and voxel weights from the same 177 noisy training TRs.

- ``one delay``: the features of TR t only (the store's pairing, volume t + lag): a one-TR model;
- ``FIR k``: the features of the k rows of the model's window (``model.context_end`` volume:
  delays 0..k-1 behind the paired volume, clipped to the split as the dataset clips it), a free
  kernel per feature and voxel (5k weights per voxel);
- ``HRF over the k-TR window``: the same rows weighted by the planted HRF (5 weights per voxel):
  the best a k-TR window allows once its kernel is right;
- ``planted HRF``: the features convolved with the planted HRF over the whole past (5 weights per
  voxel): perfect features AND the true kernel; only the voxel weights are learned;
- ``oracle``: the planted noise-free response itself (no learning).

    .venv/bin/python bench/bench_context_limits.py --store demo_out/store.h5 [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from giblet_ds.demo_data.features import FEATURES
from giblet_ds.demo_data.hrf import convolve_causal, glover_hrf
from giblet_ds.evaluation.evaluate import DEFAULT_RELIABLE_ISC
from giblet_ds.evaluation.ridge import ALPHAS, CV_FOLDS
from giblet_ds.evaluation.truth import find_ground_truth, oracle_series
from giblet_ds.metrics import pairwise_isc, voxel_r
from giblet_ds.store import open_store, read_split_subjects
from giblet_ds.store.dataset import window_lead


def window_design(
    features: np.ndarray, rows: np.ndarray, lag: int, delays: list[int]
) -> np.ndarray:
    """(len(rows), len(delays) * n_features): the features of stimulus TR ``row + lag - d`` for
    each delay d, zero where that TR lies outside the split's rows (the dataset's padding)."""
    lo, hi = int(rows.min()), int(rows.max())
    columns = []
    for d in delays:
        source = rows + lag - d
        inside = (source >= lo) & (source <= hi) & (source < len(features))
        block = np.zeros((len(rows), features.shape[1]))
        block[inside] = features[source[inside]]
        columns.append(block)
    return np.concatenate(columns, axis=1)


def hrf_design(features: np.ndarray, rows: np.ndarray, lag: int, hrf: np.ndarray) -> np.ndarray:
    """(len(rows), n_features): the features convolved with ``hrf`` over the whole past, read at
    each row's volume (row + lag). The features end with the movie but later volumes still see
    its tail through the HRF, so the convolution runs over zeros after the movie, as
    giblet_ds.demo_data.brain plants the response (never a clipped index)."""
    volumes = int(rows.max()) + lag + 1
    padded = np.zeros((max(volumes, len(features)), features.shape[1]))
    padded[: len(features)] = features
    return convolve_causal(padded, hrf)[rows + lag]


def ridge_test_r(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> float:
    """Mean test r over the target columns of a himalaya RidgeCV (per-target alphas, CV on the
    training rows in contiguous folds, as giblet_ds.evaluation.ridge)."""
    from himalaya.backend import set_backend
    from himalaya.ridge import RidgeCV
    from sklearn.model_selection import KFold

    backend = set_backend("torch", on_error="warn")
    model = RidgeCV(alphas=ALPHAS, fit_intercept=True, cv=KFold(n_splits=CV_FOLDS, shuffle=False))
    model.fit(x_train.astype(np.float32), y_train.astype(np.float32))
    prediction = np.asarray(backend.to_numpy(model.predict(x_test.astype(np.float32))))
    return float(voxel_r(torch.from_numpy(prediction), torch.from_numpy(y_test)).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--truth", type=Path, help="ground_truth.json (default: beside the store)")
    p.add_argument("--windows", type=int, nargs="+", default=[8, 12])
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    clock = time.perf_counter()
    info = open_store(args.store)
    truth = find_ground_truth(info, args.truth)
    if truth is None:
        raise SystemExit(
            f"{args.store}: no matching ground_truth.json beside it (demo stores only)"
        )
    with np.load(truth.npz_path) as saved:
        features = np.asarray(saved["features"], np.float64)  # (stimulus TRs, 5), standardized
    reliable = (
        pairwise_isc(torch.from_numpy(read_split_subjects(info.path, "train", info=info)))
        > DEFAULT_RELIABLE_ISC
    ).numpy()
    rows = {s: np.asarray(info.splits[s]) for s in ("train", "test")}
    target = {s: read_split_subjects(info.path, s, info=info).mean(0)[:, reliable] for s in rows}
    lag = int(info.lag)
    results: dict[str, float] = {}

    def fit(name: str, design: dict[str, np.ndarray]) -> None:
        results[name] = ridge_test_r(design["train"], target["train"], design["test"],
                                     target["test"])  # fmt: skip
        print(f"{name:<34} {results[name]:.4f}", flush=True)

    hrf = glover_hrf(float(info.tr))
    fit("one delay (TR t)", {s: window_design(features, r, lag, [lag]) for s, r in rows.items()})
    for k in args.windows:
        lead = window_lead(k, "volume", lag)
        delays = list(range(lag - lead, lag - lead + k))  # rows t-k+1+L..t+L behind volume t+lag
        windows = {s: window_design(features, r, lag, delays) for s, r in rows.items()}
        fit(f"FIR {k} (window, context_end volume)", windows)
        kernel = np.repeat(hrf[delays], features.shape[1])  # one HRF weight per delay x feature
        fit(f"HRF over the {k}-TR window",
            {s: (x * kernel).reshape(len(x), k, -1).sum(1) for s, x in windows.items()})  # fmt: skip
    fit("planted HRF (5 weights per voxel)",
        {s: hrf_design(features, r, lag, hrf) for s, r in rows.items()})  # fmt: skip
    oracle = oracle_series(truth, info, rows["test"])[:, reliable]
    results["oracle"] = float(
        voxel_r(torch.from_numpy(oracle), torch.from_numpy(target["test"])).mean()
    )
    print(f"{'oracle (planted response)':<34} {results['oracle']:.4f}")
    print(f"issue 12's bar, 0.9 x oracle: {0.9 * results['oracle']:.4f}; test split "
          f"{len(rows['test'])} TRs, {int(reliable.sum())} reliable voxels, "
          f"{len(rows['train'])} training TRs ({time.perf_counter() - clock:.0f} s)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
            "store": str(args.store), "features": list(FEATURES), "test_r_reliable": results,
            "n_test_trs": len(rows["test"]), "n_reliable": int(reliable.sum()),
        }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
