"""The raw files of one build: one run (a movie, its annotations, one NIfTI per subject) or many.

Every run must hold the same subjects on the same grid at the same TR; a run that differs is
named in the error before anything is decoded (headers only), and no store is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from giblet_ds.errors import StoreError
from giblet_ds.store.builder import fmri

__all__ = ["BuildInputs", "RunInputs", "check_runs"]


@dataclass(frozen=True)
class RunInputs:
    """One scan of one stimulus: its movie, optional annotation sheet and a NIfTI per subject."""

    run_id: str
    video: Path
    annotations: Path | None
    fmri: tuple[Path, ...]
    subjects: tuple[str, ...] = ()
    """Subject id of each fMRI file; empty: the file names (``fmri.subject_id``)."""
    stimulus: str = ""
    """The stimulus's name in the ``/runs`` table; empty: the movie's file name."""
    confounds: tuple[Path | None, ...] = ()
    """Per subject, fMRIPrep's ``desc-confounds_timeseries.tsv`` (or None); empty: none."""
    sidecar_trs: tuple[float | None, ...] = ()
    """Per subject (``fmri`` order), the ``RepetitionTime`` of its BIDS JSON sidecar in
    seconds, inheritance applied (None: no sidecar states one); empty: not read from BIDS."""

    def __post_init__(self) -> None:
        if not self.fmri:
            raise StoreError(f"run {self.run_id}", "no fMRI file", dataset="--fmri")
        ids = self.subject_ids
        if len(set(ids)) != len(ids):
            raise StoreError(
                f"run {self.run_id}", "subject ids must be unique", dataset="--fmri", actual=ids
            )
        if self.subjects and len(self.subjects) != len(self.fmri):
            raise StoreError(f"run {self.run_id}", "one subject id per fMRI file is needed")
        if self.sidecar_trs and len(self.sidecar_trs) != len(self.fmri):
            raise StoreError(f"run {self.run_id}", "one sidecar TR per fMRI file is needed")

    @property
    def subject_ids(self) -> tuple[str, ...]:
        return self.subjects or tuple(fmri.subject_id(p) for p in self.fmri)

    @property
    def stimulus_name(self) -> str:
        return self.stimulus or self.video.name


@dataclass(frozen=True)
class BuildInputs:
    """The raw files of one build: ``video``/``annotations``/``fmri`` for one run, or ``runs``."""

    video: Path | None = None
    annotations: Path | None = None
    fmri: tuple[Path, ...] = ()
    mask: Path | None = None
    encodec_weights: Path | None = None
    """A weight file (or a folder holding the package's checkpoint): pretrained EnCodec offline."""
    clip_weights: Path | None = None
    """A weight file for the CLIP text tower (a whole CLIP or its text tower's state dict)."""
    runs: tuple[RunInputs, ...] = field(default=())
    """Many runs, concatenated in this order (``--bids``, ``--runs``); excludes video/fmri."""

    def __post_init__(self) -> None:
        if self.runs:
            if self.video is not None or self.fmri:
                raise StoreError("--runs", "give runs, or one --video with --fmri, not both")
            ids = [r.run_id for r in self.runs]
            if len(set(ids)) != len(ids):
                raise StoreError("--runs", "run ids must be unique", actual=ids)
            return
        if not self.fmri:
            raise StoreError("--fmri", "at least one fMRI file is needed")
        ids = [fmri.subject_id(p) for p in self.fmri]
        if len(set(ids)) != len(ids):
            raise StoreError("--fmri", "subject ids (file names) must be unique", actual=ids)
        if self.video is None or self.annotations is None:
            raise StoreError("--video", "a one-run build needs --video and --annotations")

    @property
    def single(self) -> bool:
        """A one-run build given as --video/--annotations/--fmri (hashed as before runs)."""
        return not self.runs

    def run_list(self) -> tuple[RunInputs, ...]:
        """Every run of the build (a one-run build as a run named ``run-1``)."""
        if self.runs:
            return self.runs
        assert self.video is not None
        return (RunInputs("run-1", self.video, self.annotations, self.fmri),)


def check_runs(
    runs: Sequence[RunInputs], infos: Sequence[Sequence[fmri.FmriInfo]]
) -> tuple[str, ...]:
    """The subject ids every run shares, checked along with the grid; StoreError naming the run
    whose subjects or grid differ from the first run's."""
    first, first_infos = runs[0], infos[0]
    subjects = first.subject_ids
    for run, run_infos in zip(runs[1:], infos[1:], strict=True):
        if sorted(run.subject_ids) != sorted(subjects):
            missing = sorted(set(subjects) - set(run.subject_ids))
            extra = sorted(set(run.subject_ids) - set(subjects))
            raise StoreError(
                f"run {run.run_id}",
                f"subjects differ from run {first.run_id}: missing {missing}, extra {extra}",
                dataset="--fmri",
                expected=sorted(subjects),
                actual=sorted(run.subject_ids),
            )
        if run_infos[0].shape != first_infos[0].shape:
            raise StoreError(
                f"run {run.run_id}",
                f"fMRI grid differs from run {first.run_id}",
                dataset="--fmri",
                expected=first_infos[0].shape,
                actual=run_infos[0].shape,
            )
        if not np.allclose(run_infos[0].affine, first_infos[0].affine, atol=1e-3):
            raise StoreError(
                f"run {run.run_id}",
                f"fMRI affine differs from run {first.run_id} (another space or resolution?)",
                dataset="--fmri",
                expected=first_infos[0].affine.round(3).tolist(),
                actual=run_infos[0].affine.round(3).tolist(),
            )
    return subjects
