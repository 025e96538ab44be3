"""``open_store``: the one validating gate between an HDF5 file and everything that reads it.

Every problem is raised as ``StoreError`` naming the file, the dataset, what was expected and what
was found, so a bad store never surfaces as a traceback from deep inside h5py or a training step.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from giblet_ds.errors import StoreError
from giblet_ds.store import schema
from giblet_ds.store.layout import StoreLayout
from giblet_ds.store.locking import LOCKING_HINT, lock_problem, open_read_only
from giblet_ds.store.runs import RunTable, read_run_table
from giblet_ds.store.stats import read_rows

__all__ = [
    "StoreInfo",
    "open_store",
    "open_read_only",
    "lock_problem",
    "load_mask",
    "export_mask_nifti",
]

_BLOCK_TRS = 64
MAX_HELD_OUT_Z = 50.0
"""Largest |z| accepted in validation and test rows of z-scored fMRI (real BOLD spikes stay far
below; a voxel constant over training TRs and ~1,000 later reads ~1,000 / 1e-6 clamped)."""


@dataclass(frozen=True, eq=False)
class StoreInfo(StoreLayout):
    """What a validated store holds: its sizes (the :class:`StoreLayout` fields), split indices
    and the file attributes."""

    path: Path
    schema_version: int
    tr: float
    fps: float
    frame_skip: int
    lag: int
    split_gap: int
    splits: dict[str, np.ndarray] = field(repr=False)
    attrs: dict[str, Any] = field(repr=False)
    runs: RunTable = field(repr=False, kw_only=True)
    """The runs the rows concatenate (one run in a schema 1 file)."""
    split_override: dict[str, list[str]] | None = field(default=None, repr=False, kw_only=True)
    """The runs each split holds when a run config re-assigned them (``data.split_runs``,
    giblet_ds.store.run_splits); None: the splits written in the file."""

    @property
    def split_sizes(self) -> dict[str, int]:
        """Number of TRs in each split."""
        return {name: len(index) for name, index in self.splits.items()}

    @property
    def settings_hash(self) -> str:
        """Hash of the build settings alone."""
        return str(self.attrs["settings_hash"])

    @property
    def build_hash(self) -> str:
        """Hash of schema, settings and every input file: the store's identity."""
        return str(self.attrs["build_hash"])

    @property
    def pretrained(self) -> dict[str, bool]:
        """Whether the EnCodec and CLIP features came from pretrained weights."""
        return {
            "encodec": bool(self.attrs["encodec_pretrained"]),
            "clip": bool(self.attrs["clip_pretrained"]),
        }

    # What the build dropped or took from the inputs: absent (None) in stores built before
    # these attributes were recorded; such stores stay valid, a rebuild adds them. A store of
    # one run records each value itself; a store of many runs records a map from run id (the
    # order of ``runs.ids``) to that run's value.
    @property
    def tr_source(self) -> str | None:
        """``"given"`` (--tr, the YAML), ``"bids_sidecar"`` (the BIDS sidecars'
        ``RepetitionTime``, every NIfTI header agreeing) or ``"default"`` (1.5 s, no header
        contradicting it). One value for the whole store (one store holds one TR)."""
        value = self.attrs.get("tr_source")
        return None if value is None else str(value)

    @property
    def header_trs(self) -> dict[str, Any] | None:
        """Per subject, the TR its NIfTI header states in seconds (None: it states none).
        Many runs: ``{run_id: {subject: tr}}``."""
        return self.attrs.get("fmri_header_trs")

    @property
    def sidecar_trs(self) -> dict[str, Any] | None:
        """``--bids`` builds: per subject, the ``RepetitionTime`` its BIDS JSON sidecar states
        (inheritance applied; None: none states one). Many runs: ``{run_id: {subject: tr}}``.
        None for stores not built from BIDS."""
        return self.attrs.get("bids_sidecar_trs")

    @property
    def fmri_volume_counts(self) -> dict[str, Any] | None:
        """Per subject, the number of volumes in its NIfTI (before cropping to the store).
        Many runs: ``{run_id: {subject: count}}`` (each run's own NIfTI files)."""
        return self.attrs.get("fmri_volume_counts")

    @property
    def cropped(self) -> dict[str, Any] | None:
        """What cropping to the common length dropped.

        One run: ``{"limited_by": SOURCE, SOURCE: {...}, ...}``: ``limited_by`` is the shortest
        source (``video``, ``audio`` or ``fmri:SUBJECT``), and each source that lost anything at
        its end (``video``, ``audio``, ``fmri:SUBJECT``) has ``available``, ``kept``,
        ``dropped`` ([first, stop) TRs of the movie, or volumes of the subject's NIfTI) and
        ``unit`` (``"TRs"`` or ``"volumes"``).

        Many runs: ``{run_id: <that dict for the run>}``, one entry per run in ``runs.ids``
        order. Each run is cropped on its own, so its ``available``, ``kept`` and ``dropped``
        count TRs of that run's movie and volumes of that run's NIfTI files (``kept`` is the
        run's ``runs.n_trs``), never store rows; add ``runs.first`` for those."""
        return self.attrs.get("cropped")

    def model_input_sizes(self) -> dict[str, int]:
        """The sizes the model config takes from the store (never from a hand-written table)."""
        return {
            "frames_per_tr": self.n_frames,
            "frame_height": self.height,
            "frame_width": self.width,
            "n_codebooks": self.n_q,
            "code_frames": self.code_frames,
            "text_slots": self.text_slots,
            "text_dim": self.text_dim,
            "n_voxels": self.n_voxels,
        }

    def subject_index(self, subject: int | str) -> int:
        """Index of a subject given its position or its id; StoreError when unknown."""
        if isinstance(subject, str):
            if subject not in self.subjects:
                raise StoreError(
                    self.path,
                    "unknown subject",
                    dataset=schema.FMRI_SUBJECTS,
                    expected=f"one of {list(self.subjects)}",
                    actual=subject,
                )
            return self.subjects.index(subject)
        if not 0 <= int(subject) < len(self.subjects):
            raise StoreError(
                self.path,
                "subject index out of range",
                dataset=schema.FMRI_SUBJECTS,
                expected=f"0..{len(self.subjects) - 1}",
                actual=subject,
            )
        return int(subject)


def open_store(path: str | Path, *, check_subjects: bool = False) -> StoreInfo:
    """Validate the store at ``path`` and describe it; raise ``StoreError`` on any fault.

    Checks: the file exists and is readable HDF5; the schema version; the build completed; every
    required dataset and attribute exists with its dtype; shapes agree (same T everywhere, V equal
    to the mask's voxel count, n_q, K and D consistent, statistics sized to their targets); splits
    lie inside [0, T), are sorted, disjoint and separated by the recorded gap; audio codes lie in
    0..1023; the subject-mean fMRI, text and statistics are finite. A NaN or Inf in any subject also
    reaches the subject mean, so the per-subject array is only scanned with ``check_subjects``.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(path, "no such store file; build one with tools/build_store.py")
    if not path.is_file():
        raise StoreError(path, "is not a file")
    try:
        handle = open_read_only(path)
    except OSError as err:
        if lock_problem(err) is not None:  # a lock fault, never reported as a damaged file
            raise StoreError(
                path, f"cannot open: HDF5 file locking failed ({err}); {LOCKING_HINT}"
            ) from None
        raise StoreError(
            path, f"not a readable HDF5 file (truncated or not a store?): {err}"
        ) from None
    checker = _Checker(path, handle)
    try:
        with handle:
            return checker.run(check_subjects)
    except StoreError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as err:
        # h5py raises these for corrupt chunks and damaged metadata deep inside a read.
        raise StoreError(
            path, f"unreadable store (corrupt or truncated?): {err}", dataset=checker.current
        ) from None


class _Checker:
    """The validation steps of ``open_store``; ``current`` names the dataset being read."""

    def __init__(self, path: Path, handle: h5py.File) -> None:
        self.path = path
        self.handle = handle
        self.current: str | None = None

    def fail(self, message: str, dataset: str | None, expected: Any = None, actual: Any = None):
        raise StoreError(self.path, message, dataset=dataset, expected=expected, actual=actual)

    def dataset(self, name: str, ndim: int) -> h5py.Dataset:
        self.current = name
        if name not in self.handle or not isinstance(self.handle[name], h5py.Dataset):
            self.fail("required dataset is missing", name)
        dset = self.handle[name]
        dtype_key = "splits" if name.startswith(schema.SPLIT_GROUP + "/") else name
        expected = schema.DTYPES[dtype_key]
        if dset.dtype != expected:
            self.fail("wrong dtype", name, expected, dset.dtype)
        if dset.ndim != ndim:
            self.fail("wrong number of dimensions", name, ndim, dset.ndim)
        return dset

    def shape(self, name: str, expected: tuple[int, ...]) -> h5py.Dataset:
        dset = self.dataset(name, len(expected))
        if tuple(dset.shape) != tuple(expected):
            self.fail("shape does not match the rest of the store", name, expected, dset.shape)
        return dset

    def attrs(self) -> dict[str, Any]:
        raw = self.handle.attrs
        self.current = "attribute schema_version"
        if "schema_version" not in raw:
            self.fail("not a giblet-ds store: no schema_version attribute", "/")
        version = int(raw["schema_version"])
        if version not in schema.SUPPORTED_VERSIONS:
            self.fail(
                f"unknown schema version {version} (this giblet-ds reads versions "
                f"{', '.join(map(str, schema.SUPPORTED_VERSIONS))}); rebuild the store with "
                "tools/build_store.py, or update giblet-ds if a newer one wrote it",
                "/ attribute schema_version",
                " or ".join(map(str, schema.SUPPORTED_VERSIONS)),
                version,
            )
        missing = [key for key in schema.REQUIRED_ATTRS if key not in raw]
        if missing:
            self.fail(f"missing file attributes {missing}", "/", None, None)
        if not bool(raw["complete"]):
            self.fail("build did not complete", "/ attribute complete", True, raw["complete"])
        out: dict[str, Any] = {}
        for key, value in raw.items():
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, str) and (value.startswith(("{", "[")) or value == "null"):
                value = json.loads(value)
            elif isinstance(value, np.generic):
                value = value.item()
            out[key] = value
        return out

    def finite(self, name: str, dset: h5py.Dataset, rows: int | None = None) -> None:
        self.current = name
        n = dset.shape[0] if rows is None else rows
        for start in range(0, max(n, 1), _BLOCK_TRS):
            block = np.asarray(dset[start : start + _BLOCK_TRS])
            bad = ~np.isfinite(block)
            if bad.any():
                where = [int(x) for x in np.argwhere(bad)[0]]
                where[0] += start
                self.fail(
                    "contains NaN or Inf",
                    name,
                    "finite values",
                    f"{block[bad][0]} at {tuple(where)}",
                )

    def held_out_in_range(
        self, name: str, dset: Any, splits: dict[str, np.ndarray], mask: np.ndarray
    ) -> None:
        """Refuse z-scored fMRI whose validation or test rows leave any plausible range.

        Training rows are z-scored by their own statistics, so they are bounded; held-out rows
        are not. A voxel far outside ``MAX_HELD_OUT_Z`` there was (nearly) constant over the
        training TRs and changed later: its clamped std blows the held-out values up.
        """
        self.current = name
        for split in ("val", "test"):
            for start, block in zip(
                range(0, len(splits[split]), _BLOCK_TRS), read_rows(dset, splits[split]),
                strict=True,
            ):  # fmt: skip
                values = np.abs(np.asarray(block, dtype=np.float32))
                if values.size and float(values.max()) > MAX_HELD_OUT_Z:
                    row, voxel = (int(x) for x in np.unravel_index(values.argmax(), values.shape))
                    where = tuple(int(x) for x in np.argwhere(mask)[voxel])
                    self.fail(
                        f"z-scored fMRI far outside a plausible range in the {split} split: "
                        f"voxel {voxel} (grid index {where}) reads {float(block[row, voxel]):.1f} "
                        f"at TR {int(splits[split][start + row])}; a voxel (nearly) constant over "
                        "the training TRs must not be in the mask (rebuild the store: voxels are "
                        "selected on the training volumes)",
                        name,
                        f"|z| <= {MAX_HELD_OUT_Z:g}",
                        f"{float(block[row, voxel]):.1f}",
                    )

    def run(self, check_subjects: bool) -> StoreInfo:
        attrs = self.attrs()
        video = self.dataset(schema.VIDEO, 5)
        t, f, h, w, c = (int(x) for x in video.shape)
        if c != 3:
            self.fail("video frames must be RGB", schema.VIDEO, 3, c)
        codes = self.dataset(schema.AUDIO_CODES, 3)
        _, n_q, n_c = (int(x) for x in codes.shape)
        text = self.dataset(schema.TEXT, 3)
        _, k, d = (int(x) for x in text.shape)
        subjects_ds = self.dataset(schema.FMRI_SUBJECTS, 3)
        s, _, v = (int(x) for x in subjects_ds.shape)
        mask_ds = self.dataset(schema.MASK, 3)
        # the sizes read from the datasets above; every other shape must follow from them
        # (subject ids are checked against S below, with the other attributes)
        mask_shape = (int(mask_ds.shape[0]), int(mask_ds.shape[1]), int(mask_ds.shape[2]))
        sizes: dict[str, Any] = dict(n_trs=t, n_frames=f, height=h, width=w, n_q=n_q, code_frames=n_c,
                     text_slots=k, text_dim=d, n_voxels=v)  # fmt: skip
        layout = StoreLayout(**sizes, mask_shape=mask_shape, subjects=("",) * s)
        expected = {**layout.shapes(), **layout.stats_shapes()}
        del expected[schema.VIDEO], expected[schema.MASK]  # the shapes these sizes came from
        dsets = {name: self.shape(name, shape) for name, shape in expected.items()}

        self.current = schema.MASK
        mask = np.asarray(mask_ds[()])
        if int(mask.sum()) != v:
            self.fail("voxel count differs from the mask", schema.FMRI_MEAN, int(mask.sum()), v)
        affine = mask_ds.attrs.get("affine")
        if affine is None:
            self.fail("mask has no affine attribute", schema.MASK)
        affine = np.asarray(affine)
        if affine.shape != (4, 4) or not np.isfinite(affine).all():
            self.fail("mask affine must be a finite 4x4 matrix", schema.MASK, (4, 4), affine.shape)
        subjects = attrs["subjects"]
        if not isinstance(subjects, list) or len(subjects) != s:
            self.fail(
                "subject ids do not match the subject axis", "/ attribute subjects", s, subjects
            )

        version = int(attrs["schema_version"])
        runs = self.run_table(version, t, s, v)
        splits = self.splits(t, int(attrs["split_gap"]), runs)

        self.current = schema.AUDIO_CODES
        all_codes = np.asarray(codes[()])
        if all_codes.size and (all_codes.min() < 0 or all_codes.max() >= schema.N_CODES):
            self.fail(
                "audio codes out of range",
                schema.AUDIO_CODES,
                f"0..{schema.N_CODES - 1}",
                f"{all_codes.min()}..{all_codes.max()}",
            )
        for name in (schema.FMRI_MEAN, schema.TEXT, schema.FMRI_STATS_MEAN, schema.FMRI_STATS_STD):
            self.finite(name, dsets[name])
        self.held_out_in_range(schema.FMRI_MEAN, dsets[schema.FMRI_MEAN], splits, mask)
        for name in ("video", "text", "fmri"):
            for part in ("mean", "var"):
                self.finite(f"stats/{name}/{part}", dsets[f"stats/{name}/{part}"])
        std = np.asarray(dsets[schema.FMRI_STATS_STD][()])
        if (std <= 0).any():
            self.fail("per-subject std must be > 0", schema.FMRI_STATS_STD, "> 0", float(std.min()))
        if check_subjects:
            for i in range(s):
                self.finite(f"{schema.FMRI_SUBJECTS}[{i}]", subjects_ds[i])
                self.held_out_in_range(
                    f"{schema.FMRI_SUBJECTS}[{subjects[i]}]", subjects_ds[i], splits, mask
                )
        self.current = None
        return StoreInfo(
            **sizes,
            path=self.path,
            schema_version=int(attrs["schema_version"]),
            subjects=tuple(str(x) for x in subjects),
            mask_shape=mask_shape,
            tr=float(attrs["tr"]),
            fps=float(attrs["fps"]),
            frame_skip=int(attrs["frame_skip"]),
            lag=int(attrs["lag"]),
            split_gap=int(attrs["split_gap"]),
            splits=splits,
            attrs=attrs,
            runs=runs,
        )

    def run_table(self, version: int, n_trs: int, n_subjects: int, n_voxels: int) -> RunTable:
        """The ``/runs`` table (schema 2), checked against the store; one run for schema 1."""
        if version >= 2:
            for name in (schema.RUNS_ID, schema.RUNS_STIMULUS):
                self.current = name
                if name not in self.handle:
                    self.fail("required dataset is missing", name)
            for name in (schema.RUNS_FIRST, schema.RUNS_N_TRS):
                self.dataset(name, 1)
            self.dataset(schema.RUNS_SUBJECTS, 2)
        self.current = schema.RUNS_GROUP
        runs = read_run_table(self.handle, version, n_trs, n_subjects)
        problems = runs.problems(n_trs, n_subjects)
        if problems:
            self.fail("inconsistent run table: " + "; ".join(problems), schema.RUNS_GROUP)
        if version >= 2:
            shape = (len(runs), n_subjects, n_voxels)
            for name in (schema.RUNS_FMRI_MEAN, schema.RUNS_FMRI_STD):
                self.finite(name, self.shape(name, shape))
            std = np.asarray(self.handle[schema.RUNS_FMRI_STD][()])
            if (std <= 0).any():
                self.fail("per-run std must be > 0", schema.RUNS_FMRI_STD, "> 0", float(std.min()))
        return runs

    def splits(self, n_trs: int, gap: int, runs: RunTable) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name in schema.SPLITS:
            path = schema.split_path(name)
            index = np.asarray(self.dataset(path, 1)[()])
            if len(index) == 0:
                self.fail("split is empty", path, "at least 1 TR", 0)
            if index.min() < 0 or index.max() >= n_trs:
                self.fail(
                    "split index outside the store",
                    path,
                    f"0..{n_trs - 1}",
                    f"{index.min()}..{index.max()}",
                )
            if (np.diff(index) <= 0).any():
                self.fail("split indices must be strictly increasing", path)
            out[name] = index
        # Within each run, rows of two splits are at least `gap` apart (the HRF tail of one
        # split's stimulus must not reach the other's volumes); runs are separate scans, so
        # nothing leaks from one run into the next and no gap is needed at a run boundary.
        owner = np.full(n_trs, -1, dtype=np.int64)
        for number, name in enumerate(schema.SPLITS):
            taken = owner[out[name]] >= 0
            if taken.any():
                row = int(out[name][taken][0])
                self.fail(
                    f"splits {schema.SPLITS[owner[row]]} and {name} overlap at TR {row}",
                    schema.split_path(name),
                )
            owner[out[name]] = number
        for run in range(len(runs)):
            rows = runs.rows(run)
            mine = owner[rows]
            used = np.flatnonzero(mine >= 0)
            changes = np.flatnonzero(mine[used][1:] != mine[used][:-1])
            for c in changes:
                before, after = used[c], used[c + 1]
                between = int(after - before - 1)
                if between < gap:
                    self.fail(
                        f"splits {schema.SPLITS[mine[before]]} and {schema.SPLITS[mine[after]]} "
                        f"are closer than the recorded gap in run {runs.ids[run]}",
                        schema.split_path(schema.SPLITS[mine[after]]),
                        f"gap >= {gap} TRs",
                        f"{between} TRs",
                    )
        return out


def load_mask(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The store's shared brain mask (3-D bool) and its affine (4x4)."""
    info = open_store(path)
    with open_read_only(info.path) as handle:
        mask = np.asarray(handle[schema.MASK][()], dtype=bool)
        affine = np.asarray(handle[schema.MASK].attrs["affine"], dtype=np.float64)
    return mask, affine


def mask_sha256(path: str | Path) -> str:
    """Identity of the store's voxel space: SHA-256 of the mask's shape, its voxels and its affine
    (to 1e-4 mm). Two stores with the same hash order the same brain voxels the same way, so a
    model's per-voxel outputs mean the same voxels on either."""
    mask, affine = load_mask(path)
    digest = hashlib.sha256(repr(mask.shape).encode())
    digest.update(np.packbits(mask.ravel()).tobytes())
    digest.update(np.round(affine, 4).astype("<f8").tobytes())
    return digest.hexdigest()


def export_mask_nifti(path: str | Path, out: str | Path) -> Path:
    """Write the store's mask as a uint8 NIfTI with the store's affine; returns ``out``."""
    import nibabel as nib  # only needed for export

    mask, affine = load_mask(path)
    out = Path(out)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(out))
    return out
