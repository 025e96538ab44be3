"""Names, dtypes and constants of the HDF5 feature store layout (see docs/store.md).

Everything that reads or writes the store takes its names from here, so the layout is defined once.
Bump ``SCHEMA_VERSION`` whenever a dataset, dtype or attribute meaning changes: ``open_store``
refuses files of any other version rather than misreading them.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "SCHEMA_VERSION",
    "SUPPORTED_VERSIONS",
    "RUNS_GROUP",
    "RUNS_ID",
    "RUNS_STIMULUS",
    "RUNS_FIRST",
    "RUNS_N_TRS",
    "RUNS_SUBJECTS",
    "RUNS_FMRI_MEAN",
    "RUNS_FMRI_STD",
    "N_CODES",
    "SPLITS",
    "VIDEO",
    "AUDIO_CODES",
    "TEXT",
    "TEXT_MASK",
    "FMRI_SUBJECTS",
    "FMRI_MEAN",
    "FMRI_STATS_MEAN",
    "FMRI_STATS_STD",
    "MASK",
    "SPLIT_GROUP",
    "STATS_GROUP",
    "DTYPES",
    "REQUIRED_ATTRS",
    "split_path",
]

SCHEMA_VERSION = 2
"""Layout version written to the file attribute ``schema_version``. Version 2 added the
``/runs`` table (many runs concatenated); a version 1 file is read as one run."""
SUPPORTED_VERSIONS = (1, 2)
"""Versions ``open_store`` reads; any other is refused by name."""

N_CODES = 1024
"""EnCodec codebook size: every audio code is in ``0 .. N_CODES - 1``."""

SPLITS = ("train", "val", "test")

VIDEO = "video"  # (T, F, H, W, 3) uint8
AUDIO_CODES = "audio_codes"  # (T, n_q, C) int16
TEXT = "text"  # (T, K, D) float32
TEXT_MASK = "text_mask"  # (T, K) bool
FMRI_SUBJECTS = "fmri/subjects"  # (S, T, V) float16, z-scored per subject on train TRs
FMRI_MEAN = "fmri/mean"  # (T, V) float16, mean of the z-scored subjects
FMRI_STATS_MEAN = "fmri/stats/mean"  # (S, V) float32, raw per-subject train mean
FMRI_STATS_STD = "fmri/stats/std"  # (S, V) float32, raw per-subject train std
MASK = "mask"  # (X, Y, Z) bool, attribute "affine" (4, 4) float64
RUNS_GROUP = "runs"  # schema 2: one row per run, in store order
RUNS_ID = "runs/id"  # (R,) str: run id (BIDS sub-less entities or the runs.yaml name)
RUNS_STIMULUS = "runs/stimulus"  # (R,) str: the stimulus file name (repeats allowed)
RUNS_FIRST = "runs/first"  # (R,) int64: the run's first store row
RUNS_N_TRS = "runs/n_trs"  # (R,) int64: the run's number of rows (TRs)
RUNS_SUBJECTS = "runs/subjects"  # (R, S) bool: which subjects the run holds
RUNS_FMRI_MEAN = "runs/fmri_mean"  # (R, S, V) float32: raw mean each run was z-scored with
RUNS_FMRI_STD = "runs/fmri_std"  # (R, S, V) float32: raw std each run was z-scored with
SPLIT_GROUP = "splits"  # /splits/{train,val,test} int64 TR indices
STATS_GROUP = "stats"  # /stats/{video,text,fmri}/{mean,var}, /stats/audio/counts

DTYPES: dict[str, np.dtype] = {
    VIDEO: np.dtype(np.uint8),
    AUDIO_CODES: np.dtype(np.int16),
    TEXT: np.dtype(np.float32),
    TEXT_MASK: np.dtype(np.bool_),
    FMRI_SUBJECTS: np.dtype(np.float16),
    FMRI_MEAN: np.dtype(np.float16),
    FMRI_STATS_MEAN: np.dtype(np.float32),
    FMRI_STATS_STD: np.dtype(np.float32),
    MASK: np.dtype(np.bool_),
    "splits": np.dtype(np.int64),
    RUNS_FIRST: np.dtype(np.int64),
    RUNS_N_TRS: np.dtype(np.int64),
    RUNS_SUBJECTS: np.dtype(np.bool_),
    RUNS_FMRI_MEAN: np.dtype(np.float32),
    RUNS_FMRI_STD: np.dtype(np.float32),
    "stats/video/mean": np.dtype(np.float32),
    "stats/video/var": np.dtype(np.float32),
    "stats/text/mean": np.dtype(np.float32),
    "stats/text/var": np.dtype(np.float32),
    "stats/fmri/mean": np.dtype(np.float32),
    "stats/fmri/var": np.dtype(np.float32),
    "stats/audio/counts": np.dtype(np.int64),
}

REQUIRED_ATTRS = (
    "schema_version",
    "complete",
    "tr",
    "fps",
    "frame_skip",
    "lag",
    "split_gap",
    "encodec_model",
    "encodec_bandwidth",
    "encodec_pretrained",
    "clip_model",
    "clip_pretrained",
    "subjects",
    "input_hashes",
    "settings",
    "settings_hash",
    "build_hash",
)
"""File attributes every store carries; ``build_hash`` identifies inputs + settings together."""


def split_path(name: str) -> str:
    """HDF5 path of one split's TR index array."""
    return f"{SPLIT_GROUP}/{name}"
