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

__all__ = ["StoreDataset"]


class StoreDataset(Dataset[dict[str, torch.Tensor]]):
    """TRs of one split, each as ``video, audio_codes, text, text_mask, fmri, index`` tensors.

    The file is validated once here, then opened lazily, read-only, by whichever process reads
    first: every rank and every DataLoader worker gets its own handle (an open h5py handle must
    never be pickled into a worker; ``__getstate__`` drops it and a pid check reopens after fork).
    ``subject`` (index or id) returns that subject's fMRI instead of the subject mean.
    """

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        *,
        subject: int | str | None = None,
        info: StoreInfo | None = None,
    ) -> None:
        if split not in schema.SPLITS:
            raise ValueError(f"split must be one of {schema.SPLITS}, got {split!r}")
        self.info = info if info is not None else open_store(path)
        self.path = self.info.path
        self.split = split
        self.subject = None if subject is None else self.info.subject_index(subject)
        self.indices = np.asarray(self.info.splits[split], dtype=np.int64)
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
        # numpy, not torch, for the uint8 -> [0, 1] conversion: torch's intra-op thread pool costs
        # ~10 ms per sample on a busy 2-core machine for this 0.1 ms of work.
        video = torch.from_numpy(np.divide(handle[schema.VIDEO][t], 255.0, dtype=np.float32))
        codes = torch.from_numpy(handle[schema.AUDIO_CODES][t].astype(np.int64))
        if self.subject is None:
            fmri_row = handle[schema.FMRI_MEAN][t]
        else:
            fmri_row = handle[schema.FMRI_SUBJECTS][self.subject, t]
        return {
            "video": video,
            "audio_codes": codes,
            "text": torch.from_numpy(handle[schema.TEXT][t]),
            "text_mask": torch.from_numpy(handle[schema.TEXT_MASK][t]),
            "fmri": torch.from_numpy(fmri_row.astype(np.float32)),
            "index": torch.tensor(t, dtype=torch.int64),
        }

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
