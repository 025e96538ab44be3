"""``RunTable``: the runs a store concatenates (schema 2's ``/runs``), read and checked.

A run is one scan of one stimulus. Its rows are contiguous in the store, in table order, and
together the runs cover every row exactly once. A window of temporal context never reaches
across a run boundary (the rows on either side are different scans), so readers ask the table
where each row's run begins and ends. A schema 1 file holds one run: its table is synthesized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from giblet_ds.store import schema

__all__ = ["RunTable", "read_run_table", "write_run_table"]


@dataclass(frozen=True, eq=False)
class RunTable:
    """One row per run: id, stimulus name, first store row, TR count, subjects present."""

    ids: tuple[str, ...]
    stimuli: tuple[str, ...]
    first: np.ndarray
    n_trs: np.ndarray
    subjects: np.ndarray
    """(R, S) bool: which of the store's subjects each run holds."""

    @classmethod
    def single(cls, n_trs: int, n_subjects: int, stimulus: str = "") -> RunTable:
        """The table of a one-run store (how a schema 1 file reads)."""
        return cls(
            ids=("run-1",),
            stimuli=(stimulus,),
            first=np.zeros(1, dtype=np.int64),
            n_trs=np.array([n_trs], dtype=np.int64),
            subjects=np.ones((1, n_subjects), dtype=bool),
        )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def stop(self) -> np.ndarray:
        """(R,) one past each run's last row."""
        return self.first + self.n_trs

    def run_of(self, rows: np.ndarray) -> np.ndarray:
        """Index of the run holding each store row."""
        return np.searchsorted(self.first, np.asarray(rows, dtype=np.int64), side="right") - 1

    def index(self, run_id: str) -> int:
        """Position of ``run_id``; KeyError naming the known ids when absent."""
        if run_id not in self.ids:
            raise KeyError(f"unknown run {run_id!r}; the store holds {list(self.ids)}")
        return self.ids.index(run_id)

    def rows(self, run: int) -> np.ndarray:
        """Every store row of run ``run``."""
        return np.arange(int(self.first[run]), int(self.stop[run]), dtype=np.int64)

    def problems(self, n_trs: int, n_subjects: int) -> list[str]:
        """What makes this table inconsistent with a store of ``n_trs`` rows (empty: none)."""
        out = []
        r = len(self.ids)
        if r == 0:
            out.append("no runs")
        if len(self.stimuli) != r or self.first.shape != (r,) or self.n_trs.shape != (r,):
            out.append(f"columns of unequal length (ids {r})")
            return out
        if self.subjects.shape != (r, n_subjects):
            out.append(f"subjects column shape {self.subjects.shape}, expected {(r, n_subjects)}")
        if len(set(self.ids)) != r:
            out.append(f"run ids repeat: {list(self.ids)}")
        if (self.n_trs < 1).any():
            out.append(f"a run has no TRs: {dict(zip(self.ids, self.n_trs.tolist(), strict=True))}")
        expected_first = np.concatenate([[0], np.cumsum(self.n_trs)[:-1]])
        if not np.array_equal(self.first, expected_first) or int(self.n_trs.sum()) != n_trs:
            out.append(
                f"runs must cover rows 0..{n_trs - 1} in order: first {self.first.tolist()}, "
                f"TR counts {self.n_trs.tolist()}"
            )
        return out

    def as_records(self, subject_ids: tuple[str, ...]) -> list[dict[str, Any]]:
        """The table as a list of plain dicts (for reports and JSON)."""
        return [
            {
                "run": self.ids[i],
                "stimulus": self.stimuli[i],
                "first": int(self.first[i]),
                "n_trs": int(self.n_trs[i]),
                "subjects": [s for s, on in zip(subject_ids, self.subjects[i], strict=True) if on],
            }
            for i in range(len(self.ids))
        ]


def _strings(dset: h5py.Dataset) -> tuple[str, ...]:
    return tuple(x.decode() if isinstance(x, bytes) else str(x) for x in dset[()])


def read_run_table(handle: h5py.File, version: int, n_trs: int, n_subjects: int) -> RunTable:
    """The store's run table (schema 2), or the single run a schema 1 file holds."""
    if version == 1:
        return RunTable.single(n_trs, n_subjects)
    return RunTable(
        ids=_strings(handle[schema.RUNS_ID]),
        stimuli=_strings(handle[schema.RUNS_STIMULUS]),
        first=np.asarray(handle[schema.RUNS_FIRST][()], dtype=np.int64),
        n_trs=np.asarray(handle[schema.RUNS_N_TRS][()], dtype=np.int64),
        subjects=np.asarray(handle[schema.RUNS_SUBJECTS][()], dtype=bool),
    )


def write_run_table(handle: h5py.File, table: RunTable) -> None:
    """Write ``table`` under ``/runs`` (the per-run fMRI statistics are written separately)."""
    text = h5py.string_dtype()
    handle.create_dataset(schema.RUNS_ID, data=np.array(table.ids, dtype=object), dtype=text)
    handle.create_dataset(
        schema.RUNS_STIMULUS, data=np.array(table.stimuli, dtype=object), dtype=text
    )
    handle.create_dataset(schema.RUNS_FIRST, data=table.first.astype(np.int64))
    handle.create_dataset(schema.RUNS_N_TRS, data=table.n_trs.astype(np.int64))
    handle.create_dataset(schema.RUNS_SUBJECTS, data=table.subjects.astype(bool))
