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

from giblet_ds.store import schema
from giblet_ds.store.reader import StoreInfo, open_read_only, open_store

__all__ = ["CONTEXT_MASK", "StoreDataset"]

CONTEXT_MASK = "context_mask"
"""Key of the window's (k,) bool mask; the model layer reads it under the same name
(giblet_ds.model.context.CONTEXT_MASK; the store may not import the model, a test ties the two)."""


class StoreDataset(Dataset[dict[str, torch.Tensor]]):
    """TRs of one split, each as ``video, audio_codes, text, text_mask, fmri, index`` tensors.

    The file is validated once here, then opened lazily, read-only, by whichever process reads
    first: every rank and every DataLoader worker gets its own handle (an open h5py handle must
    never be pickled into a worker; ``__getstate__`` drops it and a pid check reopens after fork).
    ``subject`` (index or id) returns that subject's fMRI instead of the subject mean.

    ``context_trs`` = k > 1: the stimulus keys (``video, audio_codes, text, text_mask``) hold the
    window of store rows t-k+1..t, oldest first, with a window axis of length k in front, and
    ``context_mask`` (k,) bool says which rows are real. Rows before the start of the movie or
    outside the split's contiguous run of TRs (never across a split boundary into the gap or
    another split) are zeros with mask False, always at the front. ``fmri`` and ``index`` stay
    those of TR t. Each stimulus key is one slice read of contiguous rows (one chunk per TR, stored
    in TR order: docs/store.md). k = 1: the sample has no window axis and no mask, as before.
    """

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        *,
        subject: int | str | None = None,
        info: StoreInfo | None = None,
        context_trs: int = 1,
    ) -> None:
        if split not in schema.SPLITS:
            raise ValueError(f"split must be one of {schema.SPLITS}, got {split!r}")
        if not isinstance(context_trs, int) or context_trs < 1:
            raise ValueError(f"context_trs must be an integer >= 1, got {context_trs!r}")
        self.info = info if info is not None else open_store(path)
        self.path = self.info.path
        self.split = split
        self.subject = None if subject is None else self.info.subject_index(subject)
        self.indices = np.asarray(self.info.splits[split], dtype=np.int64)
        self.context_trs = context_trs
        self.run_start = _run_starts(self.indices)
        """First store row of the contiguous run of split TRs holding each item's TR."""
        self._handle: h5py.File | None = None
        self._pid: int | None = None

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
        if self.context_trs == 1:
            rows: int | slice = t
        else:
            first = max(t - self.context_trs + 1, int(self.run_start[item]))
            rows = slice(first, t + 1)
        # numpy, not torch, for the uint8 -> [0, 1] conversion: torch's intra-op thread pool costs
        # ~10 ms per sample on a busy 2-core machine for this 0.1 ms of work.
        video = np.divide(handle[schema.VIDEO][rows], 255.0, dtype=np.float32)
        stimulus = {
            "video": video,
            "audio_codes": handle[schema.AUDIO_CODES][rows].astype(np.int64),
            "text": handle[schema.TEXT][rows],
            "text_mask": handle[schema.TEXT_MASK][rows],
        }
        if self.subject is None:
            fmri_row = handle[schema.FMRI_MEAN][t]
        else:
            fmri_row = handle[schema.FMRI_SUBJECTS][self.subject, t]
        sample = {key: torch.from_numpy(value) for key, value in stimulus.items()}
        if isinstance(rows, slice):
            sample = _pad_front(sample, self.context_trs)
        sample["fmri"] = torch.from_numpy(fmri_row.astype(np.float32))
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


def _pad_front(window: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Zero rows in front of each (n, ...) window up to k rows, plus ``context_mask`` (k,)."""
    n = next(iter(window.values())).shape[0]
    out = {}
    for key, value in window.items():
        pad = torch.zeros((k - n, *value.shape[1:]), dtype=value.dtype)
        out[key] = torch.cat([pad, value]) if n < k else value
    mask = torch.zeros(k, dtype=torch.bool)
    mask[k - n :] = True
    out[CONTEXT_MASK] = mask
    return out
