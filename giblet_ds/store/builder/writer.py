"""Write a store atomically: a temporary file in the same folder, renamed only when complete.

An interrupted build (exception, Ctrl-C) removes its temporary file; a killed one leaves only a
``.NAME.tmp-PID`` file that no reader mistakes for a store (wrong name, no ``complete`` attribute).

A full disk: the free space is checked against the layout's size before the datasets are
created (``check_free_space``), and a write that fails anyway (another process filled the disk)
becomes one ``StoreError`` naming the folder, what was needed and what is free, after the
temporary file is removed. HDF5 writes some data late, when a handle is released; h5py can
only print such a failure ("Exception ignored in h5py ... errno = 28") and goes on, and the
library, left with unwritten metadata, later crashed the process (segmentation fault). So: the
file has no chunk cache (every chunk is written whole, one TR or one subject-TR, so the cache
bought nothing, and a failed data write raises in the call that made it); while the writer is
open, failures in released handles are caught (``sys.unraisablehook``) and raised at the end of
the writer call they happened in; and a failed build truncates its file before closing it, so
HDF5's last metadata writes find room and the library closes cleanly.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import h5py
import numpy as np

from giblet_ds.errors import StoreError
from giblet_ds.host import pid_alive
from giblet_ds.store import schema
from giblet_ds.store.builder import disk
from giblet_ds.store.builder.disk import create_unbuffered, io_reason
from giblet_ds.store.layout import StoreLayout
from giblet_ds.store.runs import RunTable, write_run_table
from giblet_ds.store.stats import compute_target_stats

__all__ = ["StoreWriter", "temp_path_for", "remove_stale_temps"]

_WRITE_BLOCK_TRS = 128
_F = TypeVar("_F", bound=Callable[..., Any])


def _guarded(method: _F) -> _F:
    """Turn an I/O failure inside ``method`` (raised, or caught in a released h5py handle) into
    one ``StoreError``, the temporary file removed."""

    @functools.wraps(method)
    def wrapper(self: StoreWriter, *args: Any, **kwargs: Any) -> Any:
        try:
            result = method(self, *args, **kwargs)
        except (OSError, RuntimeError) as err:
            reason = io_reason(err)
            if reason is None:
                raise
            raise self._write_failed(reason) from None
        if self._deferred is not None:
            raise self._write_failed(self._deferred) from None
        return result

    return wrapper  # type: ignore[return-value]


def temp_path_for(path: Path) -> Path:
    """Temporary name of an in-progress build of ``path`` (hidden, with this process id)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete temporary files of earlier builds of ``path`` whose process no longer runs."""
    removed = []
    for candidate in path.parent.glob(f".{path.name}.tmp-*"):
        pid_text = candidate.name.rsplit("-", 1)[-1]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and pid_alive(int(pid_text)):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


class StoreWriter:
    """Create the datasets of ``layout`` in a temporary file, fill them stage by stage, then
    ``finish(attrs)``: write the subject mean and training statistics and rename into place.

    Use as a context manager; leaving the block without ``finish`` deletes the temporary file.
    A build that streams video before it knows the number of TRs opens the writer with
    ``frame_shape=(F, H, W)`` and no layout, appends video with ``write_video``, then calls
    ``define(layout, mask=..., affine=..., splits=...)``, which crops the video to the layout's
    TRs and creates the other datasets.
    """

    def __init__(
        self,
        path: str | Path,
        layout: StoreLayout | None = None,
        *,
        mask: np.ndarray | None = None,
        affine: np.ndarray | None = None,
        splits: Mapping[str, np.ndarray] | None = None,
        frame_shape: tuple[int, int, int] | None = None,
    ) -> None:
        self.path = Path(path)
        self.temp_path = temp_path_for(self.path)
        self._file: h5py.File | None = None
        self._layout: StoreLayout | None = None
        self._pending: tuple[StoreLayout, Any, Any, Any] | None = None
        if layout is not None:
            frame_shape = (layout.n_frames, layout.height, layout.width)
            self._pending = (layout, mask, affine, splits)
        elif frame_shape is None:
            raise ValueError("StoreWriter needs a layout or a frame_shape")
        self._frame_shape = tuple(int(x) for x in frame_shape)
        self._video_rows = 0
        self._video_done = np.zeros(0, dtype=bool)
        self._fmri_sum: np.ndarray | None = None
        self._runs: RunTable | None = None
        self._rows_done: dict[str, np.ndarray] = {}
        self._finished = False
        self._deferred: str | None = None
        self._hooks: tuple[Any, Any] | None = None
        self.needed_bytes: int | None = None
        """The store's size as last checked (for the message when a write fails anyway)."""

    @property
    def layout(self) -> StoreLayout:
        if self._layout is None:
            raise RuntimeError("StoreWriter.define(layout, ...) has not been called")
        return self._layout

    # -- context management -------------------------------------------------------------------
    @_guarded
    def __enter__(self) -> StoreWriter:
        self._hooks = (sys.unraisablehook, sys.excepthook)
        sys.unraisablehook, sys.excepthook = self._unraisable, self._excepthook
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = create_unbuffered(self.temp_path)
        # Resizable along T: a streamed movie's length is known only once it is decoded.
        self._file.create_dataset(
            schema.VIDEO,
            shape=(0, *self._frame_shape, 3),
            maxshape=(None, *self._frame_shape, 3),
            dtype=schema.DTYPES[schema.VIDEO],
            chunks=(1, *self._frame_shape, 3),  # one chunk per TR: a sample is one read
        )
        if self._pending is not None:
            layout, mask, affine, splits = self._pending
            self.file[schema.VIDEO].resize(layout.n_trs, axis=0)
            self.define(layout, mask=mask, affine=affine, splits=splits, runs=None)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._finished:
            self._abort()

    def _unraisable(self, info: Any) -> None:
        """While the writer is open: an I/O failure inside a released h5py handle is kept for
        the writer call in progress to raise; anything else goes to the previous hook."""
        reason = io_reason(info.exc_value) if info.exc_value is not None else None
        if reason is None and self._hooks is not None:
            self._hooks[0](info)
        elif self._deferred is None:
            self._deferred = reason

    def _excepthook(self, kind: Any, value: Any, tb: Any) -> None:
        # h5py's (Cython) destructors print the traceback through sys.excepthook before they
        # report it as unraisable; the same rule, so nothing is printed twice.
        reason = io_reason(value) if value is not None else None
        if reason is None and self._hooks is not None:
            self._hooks[1](kind, value, tb)
        elif self._deferred is None:
            self._deferred = reason

    def _restore_hooks(self) -> None:
        if self._hooks is not None:
            (sys.unraisablehook, sys.excepthook), self._hooks = self._hooks, None

    def _abort(self) -> None:
        if self._file is not None:
            handle, self._file = self._file, None
            # Truncated first: on a full disk, closing must find room for HDF5's last metadata
            # writes, or the library is left half-closed. The content is discarded anyway.
            with contextlib.suppress(OSError):
                os.truncate(self.temp_path, 0)
            with contextlib.suppress(OSError, RuntimeError):
                handle.close()
        self.temp_path.unlink(missing_ok=True)
        self._restore_hooks()

    def _write_failed(self, reason: str) -> StoreError:
        """Remove the temporary file and describe the failure: folder, need, free space."""
        self._abort()
        try:
            free = disk.size_text(disk.free_bytes(self.path.parent))
        except OSError:
            free = "unknown"
        need = (
            f"; the store needs about {disk.size_text(self.needed_bytes)}"
            if self.needed_bytes
            else ""
        )
        return StoreError(
            self.path.parent,
            f"writing the store failed: {reason} ({free} free{need}); its temporary file "
            f"removed. Free some space, or give --out on another file system",
        )

    def check_space(self, layout: StoreLayout, *, lower_bound: bool = False) -> None:
        """``check_free_space`` for ``layout``, counting what this writer has already written."""
        written = self.temp_path.stat().st_blocks * 512 if self.temp_path.exists() else 0
        self.needed_bytes = disk.check_free_space(
            self.path, layout, written=written, lower_bound=lower_bound
        )

    @property
    def video_rows(self) -> int:
        """Video TRs written so far (where the next streamed run starts)."""
        return self._video_rows

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """(F, H, W) of every streamed TR."""
        return self._frame_shape

    @_guarded
    def crop_video(self, n_rows: int) -> None:
        """Before ``define``: keep only the first ``n_rows`` streamed TRs (a run is cropped to
        its common length before the next run streams after it)."""
        if self._layout is not None or n_rows > self._video_rows:
            raise StoreError(
                self.path, "cannot crop the video here", dataset=schema.VIDEO,
                expected=f"at most {self._video_rows} TRs before the layout", actual=n_rows,
            )  # fmt: skip
        self.file[schema.VIDEO].resize(n_rows, axis=0)
        self._video_rows = n_rows
        self._video_done = self._video_done[:n_rows]

    @property
    def file(self) -> h5py.File:
        if self._file is None:
            raise RuntimeError("StoreWriter used outside its `with` block")
        return self._file

    @_guarded
    def define(
        self,
        layout: StoreLayout,
        *,
        mask: np.ndarray,
        affine: np.ndarray,
        splits: Mapping[str, np.ndarray],
        runs: RunTable | None = None,
    ) -> None:
        """Fix the layout: crop streamed video to ``layout.n_trs`` and create every other dataset.

        ``runs`` (None: one run of every row and subject) must have ``layout.n_runs`` rows."""
        runs = runs if runs is not None else RunTable.single(layout.n_trs, layout.n_subjects)
        problems = runs.problems(layout.n_trs, layout.n_subjects)
        if len(runs) != layout.n_runs:
            problems.append(f"{len(runs)} runs, the layout has {layout.n_runs}")
        if problems:
            raise StoreError(self.path, "; ".join(problems), dataset=schema.RUNS_GROUP)
        if (layout.n_frames, layout.height, layout.width) != self._frame_shape:
            raise StoreError(
                self.path, "layout frame shape differs from the video being written",
                dataset=schema.VIDEO, expected=self._frame_shape,
                actual=(layout.n_frames, layout.height, layout.width),
            )  # fmt: skip
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != layout.mask_shape or int(mask.sum()) != layout.n_voxels:
            raise StoreError(
                self.path,
                "mask does not match the layout",
                dataset=schema.MASK,
                expected=f"shape {layout.mask_shape} with {layout.n_voxels} voxels",
                actual=f"shape {mask.shape} with {int(mask.sum())} voxels",
            )
        self.check_space(layout)
        video = self.file[schema.VIDEO]
        if self._pending is None:
            if self._video_rows < layout.n_trs:
                raise StoreError(
                    self.path, "fewer video TRs written than the layout needs",
                    dataset=schema.VIDEO, expected=layout.n_trs, actual=self._video_rows,
                )  # fmt: skip
            video.resize(layout.n_trs, axis=0)
            self._video_rows = layout.n_trs
            self._video_done = self._video_done[: layout.n_trs]
        else:
            self._video_done = np.zeros(layout.n_trs, dtype=bool)
        self._pending = None
        self._layout = layout
        self._mask = mask
        self._affine = np.asarray(affine, dtype=np.float64)
        self._splits = {name: np.asarray(splits[name], dtype=np.int64) for name in schema.SPLITS}
        self._runs = runs
        self._rows_done = {
            name: np.zeros(layout.n_trs, dtype=bool) for name in (schema.AUDIO_CODES, schema.TEXT)
        }
        for index in range(layout.n_subjects):
            self._rows_done[f"subject:{index}"] = np.zeros(layout.n_trs, dtype=bool)
        self._create_datasets(self.file)

    def _create_datasets(self, handle: h5py.File) -> None:
        lay = self.layout
        shapes = lay.shapes()
        # One chunk per TR (and per subject for /fmri/subjects): a sample is one contiguous read.
        chunks: dict[str, tuple[int, ...]] = {
            schema.AUDIO_CODES: (1, lay.n_q, lay.code_frames),
            schema.TEXT: (1, lay.text_slots, lay.text_dim),
            schema.TEXT_MASK: (1, lay.text_slots),
            schema.FMRI_SUBJECTS: (1, 1, lay.n_voxels),
            schema.FMRI_MEAN: (1, lay.n_voxels),
        }
        for name, chunk in chunks.items():
            handle.create_dataset(name, shape=shapes[name], dtype=schema.DTYPES[name], chunks=chunk)
        for name in (schema.FMRI_STATS_MEAN, schema.FMRI_STATS_STD):
            handle.create_dataset(name, shape=shapes[name], dtype=schema.DTYPES[name])
        for name in (schema.RUNS_FMRI_MEAN, schema.RUNS_FMRI_STD):
            handle.create_dataset(name, shape=lay.runs_shapes()[name], dtype=schema.DTYPES[name])
        assert self._runs is not None
        write_run_table(handle, self._runs)
        handle.create_dataset(schema.MASK, data=self._mask)
        handle[schema.MASK].attrs["affine"] = self._affine
        for name, index in self._splits.items():
            handle.create_dataset(schema.split_path(name), data=index)

    # -- stages -------------------------------------------------------------------------------
    @_guarded
    def write_video(self, start: int, frames: np.ndarray) -> None:
        """Write TRs ``start .. start + len(frames)`` of uint8 frames (n, F, H, W, 3).

        Before ``define`` (streaming), blocks must arrive in order and the dataset grows."""
        frames = np.asarray(frames)
        video = self.file[schema.VIDEO]
        if frames.shape[1:] != (*self._frame_shape, 3) or start < 0:
            raise StoreError(
                self.path, "block does not fit the layout", dataset=schema.VIDEO,
                expected=f"(n, {', '.join(map(str, self._frame_shape))}, 3) at TR >= 0",
                actual=f"{frames.shape} at TR {start}",
            )  # fmt: skip
        stop = start + len(frames)
        if self._layout is None:
            if start != self._video_rows:
                raise StoreError(
                    self.path, "streamed video blocks must arrive in order", dataset=schema.VIDEO,
                    expected=f"TR {self._video_rows}", actual=f"TR {start}",
                )  # fmt: skip
            video.resize(stop, axis=0)
        elif stop > self.layout.n_trs:
            raise StoreError(
                self.path, "block does not fit the layout", dataset=schema.VIDEO,
                expected=f"TRs within 0..{self.layout.n_trs}", actual=f"TRs {start}..{stop}",
            )  # fmt: skip
        video[start:stop] = frames
        self._video_rows = max(self._video_rows, stop)
        if len(self._video_done) < stop:
            self._video_done = np.concatenate(
                [self._video_done, np.zeros(stop - len(self._video_done), bool)]
            )
        self._video_done[start:stop] = True

    @_guarded
    def write_audio_codes(self, codes: np.ndarray, start: int | None = None) -> None:
        """Write codes (n, n_q, C) at rows ``start..start+n`` (None: all T rows at once); values
        must be EnCodec codes 0..1023."""
        codes = np.asarray(codes)
        first = 0 if start is None else start
        self._check_block(schema.AUDIO_CODES, codes, first, full=start is None)
        if codes.size and (codes.min() < 0 or codes.max() >= schema.N_CODES):
            raise StoreError(
                self.path,
                "audio codes out of range",
                dataset=schema.AUDIO_CODES,
                expected=f"0..{schema.N_CODES - 1}",
                actual=f"{codes.min()}..{codes.max()}",
            )
        stop = first + len(codes)
        self.file[schema.AUDIO_CODES][first:stop] = codes.astype(np.int16)
        self._rows_done[schema.AUDIO_CODES][first:stop] = True

    @_guarded
    def write_text(self, text: np.ndarray, mask: np.ndarray, start: int | None = None) -> None:
        """Write text embeddings (n, K, D) and the mask of real slots (n, K) at rows
        ``start..start+n`` (None: all T rows at once)."""
        first = 0 if start is None else start
        self._check_block(schema.TEXT, np.asarray(text), first, full=start is None)
        self._check_block(schema.TEXT_MASK, np.asarray(mask), first, full=start is None)
        stop = first + len(text)
        self.file[schema.TEXT][first:stop] = np.asarray(text, dtype=np.float32)
        self.file[schema.TEXT_MASK][first:stop] = np.asarray(mask, dtype=bool)
        self._rows_done[schema.TEXT][first:stop] = True

    @_guarded
    def write_subject(
        self,
        index: int,
        zscored: np.ndarray,
        raw_mean: np.ndarray,
        raw_std: np.ndarray,
        run: int = 0,
    ) -> None:
        """Write one subject's z-scored series over one run's rows (n_trs of the run, V) and the
        raw mean and std that run was z-scored with (a one-run store: all T rows)."""
        lay = self.layout
        assert self._runs is not None
        zscored = np.asarray(zscored, dtype=np.float32)
        offset, n_rows = int(self._runs.first[run]), int(self._runs.n_trs[run])
        expected = (n_rows, lay.n_voxels)
        if zscored.shape != expected:
            raise StoreError(
                self.path,
                f"subject {lay.subjects[index]} has the wrong shape in run {self._runs.ids[run]}",
                dataset=schema.FMRI_SUBJECTS,
                expected=expected,
                actual=zscored.shape,
            )
        if self._fmri_sum is None:
            # float32 is exact enough for a mean of z-scores stored as float16, at half the
            # memory of float64 (0.66 GB for Sherlock, whatever the number of subjects).
            self._fmri_sum = np.zeros((lay.n_trs, lay.n_voxels), dtype=np.float32)
        target = self.file[schema.FMRI_SUBJECTS]
        for first in range(0, n_rows, _WRITE_BLOCK_TRS):  # no full-size float16 copy
            rows = zscored[first : first + _WRITE_BLOCK_TRS]
            at = offset + first
            target[index, at : at + len(rows)] = rows.astype(np.float16)
            self._fmri_sum[at : at + len(rows)] += rows
        self.file[schema.RUNS_FMRI_MEAN][run, index] = raw_mean
        self.file[schema.RUNS_FMRI_STD][run, index] = raw_std
        self._rows_done[f"subject:{index}"][offset : offset + n_rows] = True

    def _check_block(self, name: str, block: np.ndarray, start: int, full: bool = False) -> None:
        expected = self.layout.shapes()[name]
        n = expected[0] if full else block.shape[0] if block.ndim else 0
        want = (n, *expected[1:])
        if block.shape != want or start < 0 or start + n > expected[0]:
            raise StoreError(
                self.path,
                "block does not fit the layout",
                dataset=name,
                expected=f"{want} at TR {start} of {expected[0]}",
                actual=block.shape,
            )

    # -- completion ---------------------------------------------------------------------------
    def _write_subject_stats(self, handle: h5py.File) -> None:
        """``/fmri/stats/{mean,std}`` (S, V): each run's raw statistics averaged over the runs,
        weighted by their TR counts (one run: that run's, exactly). The exact per-run values
        stay in ``/runs/fmri_{mean,std}``; this summary is what converts predictions for a new
        stimulus back to raw units."""
        assert self._runs is not None
        for summary, per_run in (
            (schema.FMRI_STATS_MEAN, schema.RUNS_FMRI_MEAN),
            (schema.FMRI_STATS_STD, schema.RUNS_FMRI_STD),
        ):
            values = np.asarray(handle[per_run][()], dtype=np.float64)
            if len(self._runs) == 1:
                handle[summary][...] = values[0].astype(np.float32)
                continue
            weights = self._runs.n_trs.astype(np.float64)[:, None, None]
            average = (values * weights).sum(axis=0) / weights.sum()
            handle[summary][...] = average.astype(np.float32)

    @_guarded
    def finish(
        self, attrs: Mapping[str, Any], *, validate: Callable[[Path], object] | None = None
    ) -> Path:
        """Write the subject mean, training statistics and ``attrs``; rename into place.

        ``validate`` (e.g. ``open_store``) is called on the closed temporary file before the
        rename: a store it refuses never reaches ``path`` (an earlier store there stays as it
        was), the temporary file is removed and the refusal is raised as ``StoreError``."""
        handle = self.file
        missing = []
        if not self._video_done.all():
            missing.append(f"{schema.VIDEO} TRs {np.flatnonzero(~self._video_done)[:5].tolist()}")
        for name in (schema.AUDIO_CODES, schema.TEXT):
            if not self._rows_done[name].all():
                rows = np.flatnonzero(~self._rows_done[name])[:5].tolist()
                missing.append(name if len(rows) == self.layout.n_trs else f"{name} TRs {rows}")
        for i, subject in enumerate(self.layout.subjects):
            if not self._rows_done[f"subject:{i}"].all():
                missing.append(f"{schema.FMRI_SUBJECTS}[{subject}]")
        if missing:
            raise StoreError(self.path, f"build incomplete, never written: {', '.join(missing)}")
        assert self._fmri_sum is not None
        self._fmri_sum /= len(self.layout.subjects)
        for first in range(0, self.layout.n_trs, _WRITE_BLOCK_TRS):
            rows = self._fmri_sum[first : first + _WRITE_BLOCK_TRS]
            handle[schema.FMRI_MEAN][first : first + len(rows)] = rows.astype(np.float16)
        self._fmri_sum = None
        self._write_subject_stats(handle)
        stats = compute_target_stats(handle, self._splits["train"])
        for modality, arrays in stats.items():
            for name, value in arrays.items():
                handle.create_dataset(f"{schema.STATS_GROUP}/{modality}/{name}", data=value)
        for key, value in attrs.items():
            handle.attrs[key] = _attr_value(value)
        handle.attrs["schema_version"] = schema.SCHEMA_VERSION
        handle.attrs["subjects"] = json.dumps(list(self.layout.subjects))
        # Written last: a reader that sees `complete` knows every dataset above is in place.
        handle.attrs["complete"] = True
        handle.flush()
        handle.close()
        self._file = None
        with open(self.temp_path, "rb") as raw:
            os.fsync(raw.fileno())
        if validate is not None:
            try:
                validate(self.temp_path)
            except StoreError as err:
                self._abort()
                raise StoreError(
                    self.path,
                    f"the written store failed validation and was not published "
                    f"({err}); its temporary file removed",
                ) from None
        os.replace(self.temp_path, self.path)
        self._finished = True
        self._restore_hooks()
        return self.path


def _attr_value(value: Any) -> Any:
    """HDF5 attributes hold scalars, strings and arrays; dicts and lists are stored as JSON."""
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    if value is None:
        return "null"
    return value
