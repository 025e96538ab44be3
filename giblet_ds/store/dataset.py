"""``StoreDataset``: one split of the store as a torch Dataset (the sample dict of docs/design.md)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from giblet_ds.config import RunConfig
from giblet_ds.store import schema
from giblet_ds.store.reader import StoreInfo, open_read_only, open_store

__all__ = ["CONTEXT_ENDS", "CONTEXT_MASK", "StoreDataset", "window_delays", "window_lead"]

CONTEXT_MASK = "context_mask"
"""Key of the window's (k,) bool mask; the model layer reads it under the same name
(giblet_ds.model.context.CONTEXT_MASK; the store may not import the model, a test ties the two)."""
CONTEXT_ENDS = ("stimulus", "volume")
"""Where a window ends (``model.context_end``): at TR t's own row, or at the row of the stimulus
heard while the paired fMRI volume (t + lag) was acquired; see :func:`window_lead`."""


def window_lead(context_trs: int, context_end: str, lag: int) -> int:
    """Store rows after TR t that a k-TR window holds: 0 for ``"stimulus"``; for ``"volume"``
    min(lag, k - 1): up to the paired volume's own stimulus row t + lag (never later: the volume
    cannot depend on later stimulus), and never so far that TR t, which the decoder reconstructs,
    falls out of the window (k = 1 is TR t alone at either end)."""
    if context_end not in CONTEXT_ENDS:
        raise ValueError(f"context_end must be one of {CONTEXT_ENDS}, got {context_end!r}")
    return 0 if context_end == "stimulus" else min(lag, context_trs - 1)


def window_delays(context_trs: int, context_end: str, lag: int) -> np.ndarray:
    """(k,) int: per window slot, how many TRs its stimulus row lies before the paired fMRI volume
    (row t + lag): ``lag - (row - t)``. Slot k-1 (TR t) is ``lag``; with ``context_end="volume"``
    the slots of rows t+1..t+L hold the delays lag-1..lag-L (0 for the volume's own row). What a
    haemodynamic kernel over the window is sampled at (giblet_ds.train.hrf_start)."""
    lead = window_lead(context_trs, context_end, lag)
    offsets = np.arange(-(context_trs - 1 - lead), lead + 1)
    delays = np.empty(context_trs, dtype=np.int64)
    delays[window_slots(offsets, context_trs, lead)] = lag - offsets
    return delays


class StoreDataset(Dataset[dict[str, torch.Tensor]]):
    """TRs of one split, each as ``video, audio_codes, text, text_mask, fmri, index`` tensors.

    The file is validated once here, then opened lazily, read-only, by whichever process reads
    first: every rank and every DataLoader worker gets its own handle (an open h5py handle must
    never be pickled into a worker; ``__getstate__`` drops it and a pid check reopens after fork).
    ``subject`` (index or id) returns that subject's fMRI instead of the subject mean.
    ``subjects=True`` (data.target=subjects) adds ``fmri_subjects`` (S, V) float32: every
    subject's own volume at TR t (``fmri`` stays the subject mean, what the average subject
    predicts and validation scores).

    ``context_trs`` = k > 1: the stimulus keys (``video, audio_codes, text, text_mask``) hold a
    window of k store rows with a window axis of length k in front, and ``context_mask`` (k,) bool
    says which slots are real. With L = :func:`window_lead` (0 for ``context_end="stimulus"``,
    min(lag, k-1) for ``"volume"``) the window is rows t-k+1+L..t+L. TR t, the row the decoder
    reconstructs, is always the LAST slot (k-1), so every reader of TR t (losses, figures, the
    mixer's start) is the same at either end; slots 0..k-2 hold the other rows in time order:
    t-k+1+L..t-1, then t+1..t+L. With L = 0 that is plain time order, oldest first. Rows before
    the start of the movie or outside the split's contiguous run of TRs (never across a split
    boundary into the gap or another split, at either end of the split, and never across a run
    boundary of the store's ``/runs`` table) are zeros with mask False.
    ``fmri`` and ``index`` stay those of TR t. Each stimulus key is one slice read of contiguous
    rows (one chunk per TR, stored in TR order: docs/store.md). k = 1: the sample has no window
    axis and no mask, as before.
    """

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        *,
        subject: int | str | None = None,
        info: StoreInfo | None = None,
        context_trs: int = 1,
        context_end: str = "stimulus",
        subjects: bool = False,
    ) -> None:
        if split not in schema.SPLITS:
            raise ValueError(f"split must be one of {schema.SPLITS}, got {split!r}")
        if not isinstance(context_trs, int) or context_trs < 1:
            raise ValueError(f"context_trs must be an integer >= 1, got {context_trs!r}")
        self.info = info if info is not None else open_store(path)
        self.path = self.info.path
        self.split = split
        self.subject = None if subject is None else self.info.subject_index(subject)
        if subjects and subject is not None:
            raise ValueError("subjects=True reads every subject: leave subject None")
        self.subjects = subjects
        self.indices = np.asarray(self.info.splits[split], dtype=np.int64)
        self.context_trs = context_trs
        self.context_end = context_end
        self.lead = window_lead(context_trs, context_end, self.info.lag)
        """Store rows after TR t in each window (0: the window ends at t)."""
        # A window stays inside both the contiguous stretch of split TRs and the scan (store run,
        # /runs) holding TR t: two runs' rows are adjacent in the store but are different scans.
        scan = self.info.runs.run_of(self.indices)
        self.run_start = np.maximum(_run_starts(self.indices), self.info.runs.first[scan])
        """First store row a window of each item may read (its stretch and its run)."""
        self.run_end = np.minimum(_run_ends(self.indices), self.info.runs.stop[scan] - 1)
        """Last store row a window of each item may read."""
        self._handle: h5py.File | None = None
        self._pid: int | None = None

    @classmethod
    def for_run(cls, info: StoreInfo, split: str, cfg: RunConfig) -> StoreDataset:
        """``split`` as the run ``cfg`` reads it: its subject (``data.subject``, None: the subject
        mean; ``data.target=subjects``: every subject's volume too) and its model's window (``model.context_trs``, ``model.context_end``). The trainer,
        the evaluation and the reconstruction figures all build their data here, so a checkpoint
        is scored on exactly the samples it was trained on. Raises ValueError as ``__init__``."""
        return cls(
            info.path,
            split,
            info=info,
            subject=cfg.data.subject,
            context_trs=cfg.model.context_trs,
            context_end=cfg.model.context_end,
            subjects=cfg.data.target == "subjects",
        )

    def __len__(self) -> int:
        return len(self.indices)

    def _file(self) -> h5py.File:
        if self._handle is None or self._pid != os.getpid():
            # A handle inherited through fork shares the parent's file state: open a fresh one.
            self._handle = open_read_only(self.path)
            self._pid = os.getpid()
        return self._handle

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= item < len(self):
            raise IndexError(f"index {item} out of range for split {self.split} of {len(self)} TRs")
        t = int(self.indices[item])
        handle = self._file()
        slots: np.ndarray | None = None
        if self.context_trs == 1:
            rows: int | slice = t
        else:
            k, lead = self.context_trs, self.lead
            first = max(t - (k - 1 - lead), int(self.run_start[item]))
            last = min(t + lead, int(self.run_end[item]))
            rows = slice(first, last + 1)
            slots = window_slots(np.arange(first, last + 1) - t, k, lead)
        stimulus = {
            "video": handle[schema.VIDEO][rows],
            "audio_codes": handle[schema.AUDIO_CODES][rows].astype(np.int64),
            "text": handle[schema.TEXT][rows],
            "text_mask": handle[schema.TEXT_MASK][rows],
        }
        mask = None
        if slots is not None:
            stimulus = {
                key: _place(value, slots, self.context_trs) for key, value in stimulus.items()
            }
            mask = np.zeros(self.context_trs, dtype=bool)
            mask[slots] = True
        # numpy, not torch, for the uint8 -> [0, 1] conversion: torch's intra-op thread pool costs
        # ~10 ms per sample on a busy 2-core machine for this 0.1 ms of work.
        stimulus["video"] = np.divide(stimulus["video"], 255.0, dtype=np.float32)
        if self.subject is None:
            fmri_row = handle[schema.FMRI_MEAN][t]
        else:
            fmri_row = handle[schema.FMRI_SUBJECTS][self.subject, t]
        sample = {key: torch.from_numpy(value) for key, value in stimulus.items()}
        if mask is not None:
            sample[CONTEXT_MASK] = torch.from_numpy(mask)
        sample["fmri"] = torch.from_numpy(fmri_row.astype(np.float32))
        if self.subjects:
            every = handle[schema.FMRI_SUBJECTS][:, t]  # (S, V): one chunk per subject
            sample["fmri_subjects"] = torch.from_numpy(every.astype(np.float32))
        sample["index"] = torch.tensor(t, dtype=torch.int64)
        return sample

    def close(self) -> None:
        """Close this process's handle (it reopens on the next read)."""
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None
        self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_pid"] = None
        return state

    def __del__(self) -> None:
        # Interpreter shutdown may have torn h5py down already; nothing useful to report then.
        with contextlib.suppress(Exception):
            self.close()


def _run_starts(indices: np.ndarray) -> np.ndarray:
    """For each TR of a split, the first TR of its contiguous run (a split is one run in stores
    built today; a gap inside a split would start a new run, and no window reaches across it)."""
    starts = np.empty_like(indices)
    for i, t in enumerate(indices):
        starts[i] = t if i == 0 or indices[i - 1] != t - 1 else starts[i - 1]
    return starts


def _run_ends(indices: np.ndarray) -> np.ndarray:
    """For each TR of a split, the last TR of its contiguous run (no window reaches past it)."""
    ends = np.empty_like(indices)
    for i in range(len(indices) - 1, -1, -1):
        t = indices[i]
        last = i == len(indices) - 1 or indices[i + 1] != t + 1
        ends[i] = t if last else ends[i + 1]
    return ends


def window_slots(offsets: np.ndarray, k: int, lead: int) -> np.ndarray:
    """Window slot of each row at ``offsets`` (row - t, in -(k-1-lead)..lead) from TR t: TR t in
    slot k-1, earlier rows from slot k-2-lead backwards, later rows in slots k-1-lead..k-2."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.size and (offsets.min() < -(k - 1 - lead) or offsets.max() > lead):
        raise ValueError(f"offsets {offsets.tolist()} outside a window of {k} with lead {lead}")
    return np.where(
        offsets == 0, k - 1, np.where(offsets < 0, k - 1 - lead + offsets, k - 2 - lead + offsets)
    )


def _place(rows: np.ndarray, slots: np.ndarray, k: int) -> np.ndarray:
    """(n, ...) rows into a zeroed (k, ...) window at ``slots`` (the rest is padding)."""
    out = np.zeros((k, *rows.shape[1:]), dtype=rows.dtype)
    out[slots] = rows
    return out
