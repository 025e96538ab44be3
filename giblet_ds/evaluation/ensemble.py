"""Seed ensembles: the average of several trained models' predictions, beside each member, on the
same TRs and voxels (TRIBE, VIBE and SDA, Algonauts 2025, all average seeds).

Members may differ in anything that leaves their target the same (seed, window, widths, subject
heads); each is loaded and run on its own trainer samples (:meth:`StoreDataset.for_run`), and
the targets must agree exactly, so no member is scored against another's data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from giblet_ds.checkpoint.loading import load_model
from giblet_ds.config import RunConfig, cross_check
from giblet_ds.errors import GibletError
from giblet_ds.evaluation.subjects import SplitPrediction, predict_with_subjects
from giblet_ds.report.store_match import StoreMatch, check_store_match
from giblet_ds.store import StoreInfo
from giblet_ds.store.run_splits import with_split_runs

__all__ = ["Member", "average_predictions", "predict_members"]


@dataclass
class Member:
    """One trained model of an ensemble and its predictions."""

    checkpoint: str
    """The checkpoint location its weights came from."""
    cfg: RunConfig
    prediction: SplitPrediction
    store_match: StoreMatch
    """How the evaluated store relates to this member's training store."""
    info: StoreInfo
    """The store as this member was trained on it: its runs assigned by its data.split_runs."""


def average_predictions(members: Sequence[SplitPrediction]) -> SplitPrediction:
    """The ensemble's prediction: the mean over members of the subject-mean prediction and, per
    subject, of the subject predictions (a member without subject heads contributes its
    subject-mean prediction to every subject; None when no member has heads). Raises
    GibletError when the members' targets differ (different data.subject, store or split)."""
    if not members:
        raise GibletError("an ensemble needs at least one member")
    target = members[0].target
    for i, member in enumerate(members[1:], start=2):
        if member.target.shape != target.shape or not np.array_equal(member.target, target):
            raise GibletError(
                f"ensemble member {i} was trained on another target than member 1 (a different "
                "data.subject, store or split): average only runs of the same target"
            )
    if len(members) == 1:
        return members[0]
    mean = np.asarray(np.mean([m.mean for m in members], axis=0, dtype=np.float64), np.float32)
    subjects = None
    with_heads = [m.subjects for m in members if m.subjects is not None]
    if with_heads:
        n_subjects = with_heads[0].shape[0]
        if any(s.shape[0] != n_subjects for s in with_heads):
            raise GibletError("ensemble members have different numbers of subject heads")
        stacked = [m.for_subjects(n_subjects) for m in members]
        subjects = np.asarray(np.mean(stacked, axis=0, dtype=np.float64), np.float32)
    return SplitPrediction(mean, subjects, target)


def predict_members(
    checkpoints: Sequence[str | Path],
    info: StoreInfo,
    split: str,
    *,
    device: torch.device,
    config: str | Path | None = None,
    verify: bool = True,
) -> list[Member]:
    """Load each checkpoint (one at a time: one model in memory) and predict ``split``.

    ``config`` applies to a single checkpoint only (an ensemble's members each carry theirs).
    A member trained with ``data.split_runs`` predicts that assignment's ``split`` (a
    leave-one-run-out fold: its own held-out run); members must share one assignment.
    Raises GibletError for a member that does not fit the store (naming it).
    """
    if config is not None and len(checkpoints) > 1:
        raise GibletError("--config names one run's config: an ensemble's members each need "
                          "their own beside their weights")  # fmt: skip
    members: list[Member] = []
    for checkpoint in checkpoints:
        model, cfg, location = load_model(checkpoint, config=config, device=device, verify=verify)
        try:
            cross_check(cfg, store_sizes=info.model_input_sizes())
        except GibletError as exc:
            raise GibletError(f"{checkpoint}: {exc}") from exc
        match = check_store_match(location, cfg, info)  # another mask: refused here
        try:  # a leave-one-run-out fold is scored on its own held-out run
            fold = with_split_runs(info, cfg.data.split_runs)
        except GibletError as exc:
            raise GibletError(f"{checkpoint}: {exc}") from exc
        if members and fold.split_override != members[0].info.split_override:
            raise GibletError(
                f"{checkpoint} was trained on other run splits (data.split_runs "
                f"{fold.split_override}) than {members[0].checkpoint} "
                f"({members[0].info.split_override}): an ensemble's members share one split"
            )
        prediction = predict_with_subjects(model, cfg, fold, split, device=device)
        del model
        members.append(Member(str(location.path), cfg, prediction, match, fold))
    return members
