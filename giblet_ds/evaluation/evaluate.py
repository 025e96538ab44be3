"""Evaluate a trained model on one split: model, ridge baseline, ceiling and oracle, same TRs and voxels.

``evaluate(checkpoint, store, split)`` returns an :class:`EvaluationResult`; ``write_evaluation``
(giblet_ds.evaluation.output) writes evaluation.json, NIfTI maps, a figure and the table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from giblet_ds.config import RunConfig
from giblet_ds.errors import GibletError
from giblet_ds.evaluation.ensemble import average_predictions, predict_members
from giblet_ds.evaluation.ridge import fit_ridge_baseline
from giblet_ds.evaluation.scores import SetScores, summarize_set
from giblet_ds.evaluation.subjects import predict_with_subjects, score_subjects
from giblet_ds.evaluation.truth import find_ground_truth, oracle_series
from giblet_ds.metrics import (
    ceiling_r,
    circular_shift_null,
    mean_reliability,
    pairwise_isc,
    voxel_r,
)
from giblet_ds.store import StoreInfo, load_mask, load_target_stats, open_store
from giblet_ds.store.smoothing import target_smoothing
from giblet_ds.store.stats import read_split_subjects

__all__ = ["DEFAULT_RELIABLE_ISC", "EvaluationResult", "evaluate", "predict_split"]

log = logging.getLogger("giblet_ds")

DEFAULT_RELIABLE_ISC = 0.1


@dataclass
class EvaluationResult:
    """Everything :func:`evaluate` measured. ``sets``: voxel-set name -> scores; ``maps``: name ->
    per-voxel values (V,) over the store's mask."""

    checkpoint: str
    store: str
    split: str
    n_trs: int
    target: str
    sets: dict[str, SetScores]
    maps: dict[str, np.ndarray] = field(repr=False)
    reliable: dict[str, Any]
    ceiling: dict[str, Any]
    ridge: dict[str, Any] | None
    oracle: dict[str, Any] | None
    seconds: dict[str, float]
    subjects: list[dict[str, Any]] | None = None
    """Per subject (giblet_ds.evaluation.subjects.score_subjects): model r, per-subject ridge r,
    the subject's own ceiling per voxel set; None when not asked for."""
    members: list[dict[str, Any]] | None = None
    """A seed ensemble's members (``checkpoint``, ``sets``: name -> mean model r on the same TRs
    and voxels); the rest of the result scores their averaged prediction. None: one model."""
    store_match: dict[str, Any] = field(default_factory=dict)
    """How ``store`` relates to the (first member's) training store (report.store_match)."""
    split_runs: dict[str, list[str]] | None = None
    """The runs each split held when the model was trained on another assignment of the store's
    runs (data.split_runs: a leave-one-run-out fold); None: the store's own splits."""
    subject_index: int | None = None
    """The store's index of the subject the model was trained on (data.subject); None: the mean."""
    target_smoothing_fwhm_mm: float = 0.0
    """The FWHM the training targets were smoothed at (data.smoothing_fwhm_mm; the ridge fitted
    the same); every r here is against the unsmoothed fMRI."""
    series: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """The scored time series on the split's TRs, float32 (T, V): ``target``, ``model`` and
    (with the baseline) ``ridge``; what pooling over folds needs (not written to the JSON)."""
    voxel_sets: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """Each summarized voxel set as bool (V,) (not written to the JSON)."""

    def to_dict(self) -> dict[str, Any]:
        skip = ("sets", "maps", "series", "voxel_sets")
        out = {k: v for k, v in vars(self).items() if k not in skip}
        out["sets"] = {name: s.as_dict() for name, s in self.sets.items()}
        return out


def predict_split(
    model: torch.nn.Module,
    cfg: RunConfig,
    info: StoreInfo,
    split: str,
    *,
    device: torch.device,
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """The model's fMRI prediction and the target over a split, float32 (T_split, V) each.

    The dataset is the trainer's (:meth:`StoreDataset.for_run`: same subject, same context
    window), so any checkpoint is scored on exactly what it was trained to predict.
    """
    prediction = predict_with_subjects(
        model, cfg, info, split, device=device, batch_size=batch_size
    )
    return prediction.mean, prediction.target


def roi_voxels(roi: str | Path, info: StoreInfo) -> np.ndarray:
    """Bool (V,): the store's mask voxels inside a ROI NIfTI on the store's grid (value > 0)."""
    mask, affine = load_mask(info.path)
    try:
        img: Any = nib.load(str(roi))
        data = np.asarray(img.dataobj)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise GibletError(f"--roi {roi}: not a readable NIfTI ({exc})") from exc
    data = data[..., 0] if data.ndim == 4 and data.shape[-1] == 1 else data
    if data.shape != mask.shape or not np.allclose(img.affine, affine, atol=1e-3):
        raise GibletError(
            f"--roi {roi}: shape {data.shape} / affine not the store's mask grid {mask.shape}; "
            "resample it to the store's space first (tools/build_store.py's mask: "
            "giblet_ds.store.export_mask_nifti, then nilearn.image.resample_to_img)"
        )
    inside = np.asarray(data[mask] > 0)
    if not inside.any():
        raise GibletError(f"--roi {roi}: holds no voxel of the store's mask")
    return inside


def evaluate(
    checkpoint: str | Path | Sequence[str | Path],
    store: str | Path,
    split: str = "test",
    *,
    roi: str | Path | None = None,
    truth: str | Path | None = None,
    ridge: bool = True,
    ridge_cache: str | Path | None = None,
    reliable_isc: float | None = None,
    n_shifts: int = 100,
    device: str | None = None,
    config: str | Path | None = None,
    verify: bool = True,
    per_subject: bool | None = None,
) -> EvaluationResult:
    """Score ``checkpoint`` (any form load_model takes; a run directory means its best tag) on
    ``split`` of ``store``: model, ridge baseline, ceiling and (demo) oracle per voxel, summarized
    over the whole mask, the reliable voxels (training-TR ISC > ``reliable_isc``, default the run's
    data.reliable_isc_threshold) and the ``roi`` NIfTI.

    Several checkpoints (a seed ensemble, giblet_ds.evaluation.ensemble): every number scores
    the average of their predictions, and ``members`` holds each member's r on the same sets.
    ``per_subject`` (None: when the model has subject heads) adds each subject's own scores
    (giblet_ds.evaluation.subjects) and per-subject maps."""
    if split not in ("val", "test"):
        raise GibletError(f"split must be val or test (held-out TRs), got {split!r}")
    clock = time.perf_counter()
    seconds: dict[str, float] = {}
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoints = [checkpoint] if isinstance(checkpoint, str | Path) else list(checkpoint)
    info = open_store(store)
    # Each member is checked against the store (another mask: refused) before it predicts.
    members = predict_members(checkpoints, info, split, device=dev, config=config, verify=verify)
    cfg = members[0].cfg
    fwhms = sorted({m.cfg.data.smoothing_fwhm_mm for m in members})
    if ridge and len(fwhms) > 1:
        raise GibletError(
            f"ensemble members trained on targets smoothed differently (data.smoothing_fwhm_mm "
            f"{fwhms}): the ridge baseline fits the members' training targets, so it has no one "
            "answer; evaluate them apart, average runs trained with the same smoothing, or "
            "leave the baseline out (--no-ridge)"
        )
    info = members[0].info  # the runs as the members were trained on them (data.split_runs)
    smoothing = target_smoothing(cfg, info)  # the ridge fits the targets the network fitted
    combined = average_predictions([m.prediction for m in members])
    match = next((m.store_match for m in members if not m.store_match.is_training_store),
                 members[0].store_match)  # fmt: skip
    subject = None if cfg.data.subject is None else info.subject_index(cfg.data.subject)
    pred, target = combined.mean, combined.target
    model_r = voxel_r(torch.from_numpy(pred), torch.from_numpy(target)).numpy()
    stats = load_target_stats(info.path, subject=subject, info=info)["fmri"]
    seconds["model"] = time.perf_counter() - clock

    # Voxel sets and the ceiling, from the subjects (the mean alone cannot show what is shared).
    threshold = reliable_isc
    if threshold is None:
        threshold = float(getattr(cfg.data, "reliable_isc_threshold", DEFAULT_RELIABLE_ISC))
    sets: dict[str, np.ndarray] = {"all": np.ones(info.n_voxels, bool)}
    reliability = None
    reliable: dict[str, Any]
    ceiling: dict[str, Any]
    if info.n_subjects >= 2:
        train_isc = pairwise_isc(
            torch.from_numpy(read_split_subjects(info.path, "train", info=info))
        )
        sets["reliable"] = (train_isc > threshold).numpy()
        held_out = torch.from_numpy(read_split_subjects(info.path, split, info=info))
        k = info.n_subjects if subject is None else 1
        reliability = mean_reliability(held_out, k=k).numpy()
        reliable = {"threshold": threshold, "n_voxels": int(sets["reliable"].sum()),
                    "rule": "mean pairwise inter-subject r on the training TRs > threshold"}  # fmt: skip
        ceiling = {
            "kind": "subject mean" if subject is None else "one subject",
            "definition": f"sqrt of the Spearman-Brown reliability of the mean of k={k} "
            f"subject(s), from the mean pairwise inter-subject r on the same {split} TRs",
            "why": "the model predicts the subject mean; its noise shrinks with the number of "
            "subjects, so a leave-one-subject-out ISC would understate the ceiling"
            if subject is None
            else f"the run trains on one subject (data.subject={cfg.data.subject}): the "
            "ceiling is one subject's reliability (k=1), not the subject mean's",
        }
        if not sets["reliable"].any():
            log.warning("no voxel has training ISC > %s: the reliable set is empty", threshold)
            del sets["reliable"]
    else:
        reliable = {"threshold": threshold, "n_voxels": 0,
                    "rule": "needs >= 2 subjects: the store has one"}  # fmt: skip
        ceiling = {"kind": None, "why": "the store holds one subject: a ceiling needs either "
                   "several subjects or repeated presentations of the movie; none reported"}  # fmt: skip
    if roi is not None:
        sets["roi"] = roi_voxels(roi, info)
    seconds["ceiling"] = time.perf_counter() - clock - sum(seconds.values())

    ridge_pred = ridge_r = None
    ridge_info = None
    if ridge:
        baseline = fit_ridge_baseline(
            info, subject=subject, cache_dir=ridge_cache, smoothing=smoothing
        )
        ridge_pred = baseline.predictions[split]
        ridge_r = voxel_r(torch.from_numpy(ridge_pred), torch.from_numpy(target)).numpy()
        ridge_info = {"backend": baseline.backend, "cache": str(baseline.cache),
                      "from_cache": baseline.from_cache, "fit_seconds": baseline.fit_seconds,
                      "alpha_median": float(np.median(baseline.alphas)),
                      "fit_trs": len(info.splits["train"]),
                      "target_smoothing_fwhm_mm": cfg.data.smoothing_fwhm_mm}  # fmt: skip
    seconds["ridge"] = time.perf_counter() - clock - sum(seconds.values())

    oracle_r = None
    oracle_info = None
    found = find_ground_truth(info, truth)
    if found is not None:
        rows = np.asarray(info.splits[split])
        oracle_r = voxel_r(torch.from_numpy(oracle_series(found, info, rows)),
                           torch.from_numpy(target)).numpy()  # fmt: skip
        oracle_info = {"truth": str(found.json_path),
                       "definition": "the planted noise-free response against the same target"}  # fmt: skip

    scores: dict[str, SetScores] = {}
    for name, voxels in sets.items():
        null = circular_shift_null(
            torch.from_numpy(pred[:, voxels]), torch.from_numpy(target[:, voxels]),
            threshold=0.1, n_shifts=n_shifts, min_shift=min(5, (len(pred) - 1) // 2),
        ).as_dict()  # fmt: skip
        scores[name] = summarize_set(
            name, voxels, split=split, target=target, model_pred=pred, model_r=model_r,
            train_mean=stats["mean"], train_var=stats["var"], ridge_pred=ridge_pred,
            ridge_r=ridge_r, oracle_r=oracle_r, reliability=reliability,
            whole_brain=name == "all", frac_null=null,
        )  # fmt: skip
    seconds["scores"] = time.perf_counter() - clock - sum(seconds.values())

    member_scores = None
    if len(members) > 1:
        member_scores = []
        for member in members:
            member_r = voxel_r(torch.from_numpy(member.prediction.mean),
                               torch.from_numpy(target)).numpy()  # fmt: skip
            member_scores.append({"checkpoint": member.checkpoint, "sets": {
                name: float(member_r[voxels].mean()) for name, voxels in sets.items()}})  # fmt: skip
    subject_rows = None
    subject_maps: dict[str, np.ndarray] = {}
    if per_subject or (per_subject is None and combined.subjects is not None):
        subject_rows, subject_maps = score_subjects(
            combined,
            info,
            split,
            sets=sets,
            ridge=ridge,
            ridge_cache=ridge_cache,
            smoothing=smoothing,
        )
        seconds["subjects"] = time.perf_counter() - clock - sum(seconds.values())
    seconds["total"] = time.perf_counter() - clock

    maps = {"model_r": model_r}
    if ridge_r is not None:
        maps["ridge_r"] = ridge_r
    if oracle_r is not None:
        maps["oracle_r"] = oracle_r
    if reliability is not None:
        ceiling_map = ceiling_r(torch.from_numpy(reliability)).numpy()
        maps["ceiling_r"] = ceiling_map
        # r / ceiling is unstable where the ceiling is near 0: mapped only where it is > 0.1
        maps["model_r_normalized"] = np.where(
            ceiling_map > 0.1, model_r / np.maximum(ceiling_map, 0.1), 0.0
        )
    maps.update(subject_maps)
    return EvaluationResult(
        checkpoint=", ".join(m.checkpoint for m in members),
        store=str(info.path),
        split=split,
        n_trs=len(pred),
        target="subject mean" if subject is None else f"subject {info.subjects[subject]}",
        sets=scores,
        maps={k: np.asarray(v, np.float32) for k, v in maps.items()},
        reliable=reliable,
        ceiling=ceiling,
        ridge=ridge_info,
        oracle=oracle_info,
        seconds=seconds,
        subjects=subject_rows,
        members=member_scores,
        store_match=match.as_dict(),
        split_runs=info.split_override,
        subject_index=subject,
        target_smoothing_fwhm_mm=cfg.data.smoothing_fwhm_mm,
        series={
            "target": target,
            "model": pred,
            **({"ridge": ridge_pred} if ridge_pred is not None else {}),
        },
        voxel_sets=sets,
    )
