"""Leave-one-run-out evaluation: the field's held-out-run estimate for a many-run store.

Trained models (:func:`evaluate_folds`): one model per held-out run, each trained with
``data.split_runs`` holding out that run as its test split (the normal training command; the
loop is in docs/store.md, "Leave-one-run-out"). Each fold's best checkpoint is scored by
:func:`giblet_ds.evaluation.evaluate` on its own held-out run, with the ridge baseline fitted on
exactly that fold's training runs (the rows the network trained on; its validation run is held
out of the fit as it is of the network's training) and the reliable voxels chosen on them; the
folds are then pooled two ways: the mean over folds of each fold's per-voxel mean r, and the
per-voxel r over the held-out series of every fold concatenated. The folds are checked first
(:func:`check_folds`): one store, one target, a different held-out run each, every run held out.

Ridge alone (:func:`leave_one_run_out`): for each run of a many-run store, the voxelwise kernel
ridge (the baseline of :mod:`giblet_ds.evaluation.ridge`) is fitted on every other run's rows
and scored, per voxel, on all rows of the held-out run; needs no trained model.

Runs are separate scans, so no gap is needed between the fitting rows and the scored run; the
delayed features never reach across a run (ridge_inputs). Per-voxel alphas are chosen by
5-fold cross-validation over contiguous blocks of the fitting rows alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from giblet_ds.config import RunConfig, load_config
from giblet_ds.errors import GibletError
from giblet_ds.evaluation.evaluate import EvaluationResult, evaluate
from giblet_ds.evaluation.ridge import _backend, _to_numpy, read_target, ridge_estimator
from giblet_ds.evaluation.ridge_inputs import ridge_design
from giblet_ds.metrics import VoxelCorrelation, voxel_r
from giblet_ds.report.store_match import check_store_match
from giblet_ds.run.resolver import find_run_config, resolve_checkpoint
from giblet_ds.store import StoreInfo, open_store
from giblet_ds.store.run_splits import with_split_runs
from giblet_ds.store.smoothing import MaskedGaussianSmoothing

__all__ = ["FoldPlan", "check_folds", "evaluate_folds", "format_folds", "leave_one_run_out"]


def _needs_runs(info: StoreInfo) -> None:
    if len(info.runs) < 2:
        raise GibletError(
            f"{info.path}: leave-one-run-out needs a store of 2 or more runs; it holds "
            f"{len(info.runs)} (build one with --bids or --runs)"
        )


def leave_one_run_out(
    info: StoreInfo,
    *,
    subject: int | None = None,
    smoothing: MaskedGaussianSmoothing | None = None,
) -> dict[str, Any]:
    """Per held-out run: TR count, mean per-voxel ridge r and the per-voxel r (V,); and the
    mean over runs. ``smoothing``: the evaluated run's target smoothing, applied to the fitting
    rows only (the held-out run is scored unsmoothed). GibletError for a store of fewer than 2
    runs."""
    _needs_runs(info)
    runs = info.runs
    backend = _backend()
    design, _ = ridge_design(info)
    target = read_target(info, np.arange(info.n_trs), subject)
    out: dict[str, Any] = {
        "backend": backend,
        "target": "mean" if subject is None else subject,
        "target_smoothing_fwhm_mm": 0.0 if smoothing is None else smoothing.fwhm_mm,
    }
    fitted = target if smoothing is None else smoothing.smooth_array(target)
    per_run: dict[str, Any] = {}
    for r, run_id in enumerate(runs.ids):
        held = runs.rows(r)
        fit = np.setdiff1d(np.arange(info.n_trs), held)
        model = ridge_estimator()
        model.fit(design[fit], fitted[fit])
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


@dataclass(frozen=True)
class FoldPlan:
    """One fold as its run directory says it was trained."""

    run_dir: str
    test_run: str
    split_runs: dict[str, list[str]]
    """The runs of each split (data.split_runs, as the build's rule reads it)."""


def check_folds(run_dirs: Sequence[str | Path], info: StoreInfo) -> list[FoldPlan]:
    """The folds in the store's run order, or one GibletError listing every problem: a run dir
    trained on another store (or mask), without data.split_runs, holding out other than one run,
    on another target than the first; a run held out by two folds; a run held out by none.
    Reads configs and tag metadata only (no weights)."""
    _needs_runs(info)
    problems: list[str] = []
    plans: list[FoldPlan] = []
    first: tuple[str, RunConfig] | None = None
    for run_dir in run_dirs:
        name = str(run_dir)
        try:
            location = resolve_checkpoint(run_dir, prefer="best", verify=False)
            cfg = load_config(find_run_config(location.path))
            match = check_store_match(location, cfg, info)  # another mask: raises
        except GibletError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if not match.is_training_store:
            problems.append(
                f"{name}: trained on store {(match.trained_store_hash or 'unknown')[:12]} "
                f"(data.store={match.trained_store}), not {info.path} (store "
                f"{info.build_hash[:12]}): every fold must be trained on the store it is scored on"
            )
            continue
        if first is None:
            first = (name, cfg)
        elif (cfg.data.subject, cfg.data.target) != (first[1].data.subject, first[1].data.target):
            problems.append(
                f"{name}: trained on another target (data.subject={cfg.data.subject}, "
                f"data.target={cfg.data.target}) than {first[0]} (data.subject="
                f"{first[1].data.subject}, data.target={first[1].data.target})"
            )
        elif cfg.data.smoothing_fwhm_mm != first[1].data.smoothing_fwhm_mm:
            problems.append(
                f"{name}: trained on targets smoothed at data.smoothing_fwhm_mm="
                f"{cfg.data.smoothing_fwhm_mm}, {first[0]} at "
                f"{first[1].data.smoothing_fwhm_mm}: pooled folds (and their ridges) must fit "
                "the same targets; train every fold with one smoothing"
            )
        if cfg.data.split_runs is None:
            problems.append(
                f"{name}: trained on the store's own splits (data.split_runs is null), not as a "
                "leave-one-run-out fold: train each fold with --set 'data.split_runs={train: "
                '[...], val: [...], test: [RUN]}\' (docs/store.md, "Leave-one-run-out")'
            )
            continue
        try:
            fold = with_split_runs(info, cfg.data.split_runs)
        except GibletError as exc:
            problems.append(f"{name}: {exc}")
            continue
        assignment = fold.split_override or {}
        if len(assignment["test"]) != 1:
            problems.append(
                f"{name}: its test split holds runs {assignment['test']}; a fold holds out one run"
            )
            continue
        plans.append(FoldPlan(name, assignment["test"][0], assignment))
    by_run: dict[str, list[str]] = {}
    for plan in plans:
        by_run.setdefault(plan.test_run, []).append(plan.run_dir)
    for run_id, dirs in by_run.items():
        if len(dirs) > 1:
            problems.append(f"run {run_id} is held out by {len(dirs)} folds ({', '.join(dirs)}): "
                            "give one fold per held-out run")  # fmt: skip
    missing = [r for r in info.runs.ids if r not in by_run]
    if missing and len(plans) == len(run_dirs):  # otherwise a named problem explains it
        problems.append(
            f"no fold holds out run(s) {missing}: the folds must cover the store's runs "
            f"{list(info.runs.ids)} (train the missing fold with data.split_runs.test=[RUN])"
        )
    if problems:
        raise GibletError(
            f"leave-one-run-out on {info.path} refused ({len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}):\n  " + "\n  ".join(problems)
        )
    return sorted(plans, key=lambda p: info.runs.ids.index(p.test_run))


def _set_numbers(result: EvaluationResult) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "n_voxels": s.n_voxels,
            "model_r": s.model_r,
            "ridge_r": s.ridge_r,
            "ceiling_r": s.ceiling_r,
            "model_r_normalized": s.model_r_normalized,
            "ridge_r_normalized": s.ridge_r_normalized,
        }
        for name, s in result.sets.items()
    }


def evaluate_folds(
    run_dirs: Sequence[str | Path],
    store: str | Path,
    *,
    roi: str | Path | None = None,
    ridge: bool = True,
    ridge_cache: str | Path | None = None,
    reliable_isc: float | None = None,
    n_shifts: int = 100,
    device: str | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Score each fold (:func:`check_folds` first) on its own held-out run with
    :func:`giblet_ds.evaluation.evaluate` (model, ridge fitted on the fold's training runs,
    ceiling) and pool over folds. Returns a JSON-ready dict: ``folds`` (per fold: run dir, test
    run, split runs, TRs, ridge fitting TRs, per voxel set n_voxels / model_r / ridge_r /
    ceiling_r and their normalized r) and ``pooled``: ``mean_over_folds`` (per set present in
    every fold: the mean of the folds' per-voxel mean r) and ``concatenated`` (per-voxel r over
    every fold's held-out series concatenated, averaged over ``all``, ``reliable``: the voxels
    reliable in every fold, and ``roi``); ``maps``: the concatenated per-voxel r (V,) arrays."""
    info = open_store(store)
    plans = check_folds(run_dirs, info)
    folds: list[dict[str, Any]] = []
    pooled = {"model": VoxelCorrelation(info.n_voxels), "ridge": VoxelCorrelation(info.n_voxels)}
    sets: dict[str, np.ndarray] | None = None  # the voxel sets of every fold, intersected
    n_trs = 0
    target_name = ""
    for plan in plans:
        result = evaluate(
            plan.run_dir, store, "test", roi=roi, ridge=ridge, ridge_cache=ridge_cache,
            reliable_isc=reliable_isc, n_shifts=n_shifts, device=device, verify=verify,
        )  # fmt: skip
        target = torch.from_numpy(result.series["target"])
        for kind, acc in pooled.items():
            if kind in result.series:
                acc.update(torch.from_numpy(result.series[kind]), target)
        n_trs += result.n_trs
        target_name = result.target
        sets = (
            dict(result.voxel_sets)
            if sets is None
            else {k: v & result.voxel_sets[k] for k, v in sets.items() if k in result.voxel_sets}
        )
        folds.append({
            "run_dir": plan.run_dir, "checkpoint": result.checkpoint, "test_run": plan.test_run,
            "split_runs": plan.split_runs, "n_trs": result.n_trs,
            "ridge_fit_trs": None if result.ridge is None else result.ridge["fit_trs"],
            "sets": _set_numbers(result),
        })  # fmt: skip
    assert sets is not None  # check_folds returns at least two folds
    mean_over = {
        name: {
            key: None if any(f["sets"][name][key] is None for f in folds)
            else float(np.mean([f["sets"][name][key] for f in folds]))
            for key in ("model_r", "ridge_r")
        }
        for name in sets
    }  # fmt: skip
    maps = {"model_r": pooled["model"].per_voxel_r().numpy()}
    if ridge:
        maps["ridge_r"] = pooled["ridge"].per_voxel_r().numpy()
    concatenated = {}
    for name, voxels in sets.items():
        if not voxels.any():
            continue
        concatenated[name] = {
            "n_voxels": int(voxels.sum()), "n_trs": n_trs,
            "model_r": float(maps["model_r"][voxels].mean()),
            "ridge_r": float(maps["ridge_r"][voxels].mean()) if "ridge_r" in maps else None,
        }  # fmt: skip
    return {
        "kind": "leave-one-run-out folds",
        "store": str(info.path),
        "store_hash": info.build_hash,
        "target": target_name,
        "definition": "one model per held-out run, each scored on its own held-out run; the "
        "ridge baseline fitted on the same fold's training runs; pooled as the mean over folds "
        "of the per-voxel mean r, and as the per-voxel r over every fold's held-out series "
        "concatenated (its reliable set: the voxels reliable in every fold)",
        "folds": folds,
        "pooled": {"mean_over_folds": mean_over, "concatenated": concatenated},
        "maps": maps,
    }


def _r(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


def format_folds(data: dict[str, Any]) -> str:
    """The printed table: a row per fold, the mean over folds and the concatenated r; model and
    ridge r per voxel set (the reliable set is each fold's own; concatenated: reliable in all)."""
    names = list(data["pooled"]["concatenated"])
    head = "".join(f"{name + ' model':>16}{name + ' ridge':>16}" for name in names)
    lines = [
        f"leave-one-run-out, {len(data['folds'])} folds, target: {data['target']} (each model "
        "scored on its own held-out run; ridge fitted on that fold's training runs)",
        f"{'':<34}{'TRs':>6}" + head,
    ]
    for fold in data["folds"]:
        label = f"test {fold['test_run']} (train {', '.join(fold['split_runs']['train'])})"
        cells = "".join(
            f"{_r(fold['sets'].get(n, {}).get('model_r')):>16}"
            f"{_r(fold['sets'].get(n, {}).get('ridge_r')):>16}"
            for n in names
        )
        lines.append(f"{label[:33]:<34}{fold['n_trs']:>6}" + cells)
    mean = data["pooled"]["mean_over_folds"]
    cells = "".join(
        f"{_r(mean.get(n, {}).get('model_r')):>16}{_r(mean.get(n, {}).get('ridge_r')):>16}"
        for n in names
    )
    lines.append(f"{'mean over folds':<34}{'':>6}" + cells)
    concat = data["pooled"]["concatenated"]
    cells = "".join(f"{_r(concat[n]['model_r']):>16}{_r(concat[n]['ridge_r']):>16}" for n in names)
    n_trs = next(iter(concat.values()))["n_trs"] if concat else 0
    lines.append(f"{'concatenated held-out runs':<34}{n_trs:>6}" + cells)
    counts = ", ".join(f"{n} {concat[n]['n_voxels']:,}" for n in names)
    lines.append(f"voxels of the concatenated row: {counts} (reliable: in every fold)")
    return "\n".join(lines)
