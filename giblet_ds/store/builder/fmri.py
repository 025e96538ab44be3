"""fMRI stage: per-subject 4-D NIfTI -> one shared mask -> z-scored (T, V) series per subject.

The mask is stored in the file (REFERENCE.md: the voxel count changed with the subject set), so V
always comes from the mask, never from a config. Rules: ``intersection`` keeps voxels that are
finite and vary over the training volumes in every subject; ``file`` takes a mask NIfTI on the same grid (for a
voxel set that does not depend on which subjects were built).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from giblet_ds.errors import StoreError

_BLOCK_VOLUMES = 32

__all__ = [
    "FmriInfo",
    "probe_fmri",
    "subject_id",
    "header_tr",
    "resolve_tr",
    "same_tr",
    "compute_mask",
    "masked_series",
]

_TIME_UNITS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}
_TR_TOLERANCE = 0.01
"""Relative difference under which two TRs count as the same (header rounding)."""


@dataclass(frozen=True)
class FmriInfo:
    """Header facts of one subject's 4-D NIfTI."""

    path: Path
    shape: tuple[int, int, int]
    n_volumes: int
    affine: np.ndarray
    header_tr: float | None
    """Seconds, from the header's 4th zoom and its time unit; None when it states none."""


def subject_id(path: str | Path) -> str:
    """Subject id from a file name: ``sherlock_movie_s1.nii.gz`` -> ``sherlock_movie_s1``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def header_tr(header: Any) -> float | None:
    """The TR a NIfTI header states, in seconds (its time unit applied: ``msec``, ``usec``;
    ``sec`` or unknown as seconds), or None when it states none (no 4th zoom, or 0)."""
    zooms = header.get_zooms()
    if len(zooms) < 4 or not np.isfinite(zooms[3]) or float(zooms[3]) <= 0:
        return None
    unit = header.get_xyzt_units()[1]
    return float(zooms[3]) * _TIME_UNITS.get(unit, 1.0)


def same_tr(a: float, b: float) -> bool:
    """Whether two TRs in seconds are the same within header rounding (1%)."""
    return abs(a - b) <= _TR_TOLERANCE * b


def resolve_tr(
    given: float | None, infos: Sequence[FmriInfo], default: float
) -> tuple[float, str, list[str]]:
    """The TR a build uses: ``(tr, source, notes)`` with ``source`` ``"given"`` or ``"default"``.

    A given TR is used; headers that differ from it are noted (the user has decided). Without
    one, ``default`` is used when every header that states a TR agrees with it (or none does);
    headers that agree on another TR, or disagree among themselves, raise ``StoreError``
    asking for ``--tr``: a wrong TR pairs every stimulus window with the wrong volume, and a
    header is often wrong, so it is never taken silently either.
    """
    stated: dict[float, list[str]] = {}
    for info in infos:
        if info.header_tr is not None:
            key = next((t for t in stated if same_tr(info.header_tr, t)), info.header_tr)
            stated.setdefault(key, []).append(subject_id(info.path))

    def says(tr: float, ids: list[str]) -> str:
        return f"TR {tr:g} s ({', '.join(ids)})"

    if given is not None:
        notes = [
            f"the NIfTI headers say {says(tr, ids)}; using the given tr {given:g} s"
            for tr, ids in stated.items()
            if not same_tr(tr, given)
        ]
        return float(given), "given", notes
    if len(stated) > 1:
        raise StoreError(
            "--tr",
            "no TR was given and the NIfTI headers disagree: "
            + ", ".join(says(tr, ids) for tr, ids in stated.items())
            + ". Give the scan's repetition time with --tr",
        )
    if stated:
        ((tr, ids),) = stated.items()
        if not same_tr(tr, default):
            every = "every NIfTI header says" if len(ids) == len(infos) else "the NIfTI headers say"
            raise StoreError(
                "--tr",
                f"no TR was given and {every} {says(tr, ids)}, not the default {default:g} s. "
                f"Give the scan's repetition time: --tr {tr:g} if the headers are right, "
                f"--tr {default:g} if they are not (headers are often wrong: check the protocol)",
            )
        return default, "default", []
    return default, "default", [f"no TR was given and no NIfTI header states one; using the "
                                f"default {default:g} s"]  # fmt: skip


def _load(path: Path):
    import nibabel as nib

    if not path.is_file():
        raise StoreError(path, "fMRI file not found", dataset="--fmri")
    try:
        return nib.load(str(path))
    except Exception as err:  # nibabel raises ImageFileError, OSError, EOFError for bad files
        raise StoreError(path, f"not a readable NIfTI file: {err}", dataset="--fmri") from None


def probe_fmri(paths: Sequence[str | Path]) -> list[FmriInfo]:
    """Headers of every subject; all must be 4-D on the same grid (shape and affine)."""
    infos = []
    for raw in paths:
        path = Path(raw)
        img = _load(path)
        shape = tuple(int(x) for x in img.shape)
        if len(shape) != 4:
            raise StoreError(
                path,
                "fMRI must be 4-D (x, y, z, time)",
                dataset="--fmri",
                expected=4,
                actual=len(shape),
            )
        infos.append(
            FmriInfo(
                path=path,
                shape=(shape[0], shape[1], shape[2]),
                n_volumes=shape[3],
                affine=np.asarray(img.affine, dtype=np.float64),
                header_tr=header_tr(img.header),
            )
        )
    first = infos[0]
    for info in infos[1:]:
        if info.shape != first.shape:
            raise StoreError(
                info.path,
                f"grid differs from {first.path.name}",
                dataset="--fmri",
                expected=first.shape,
                actual=info.shape,
            )
        if not np.allclose(info.affine, first.affine, atol=1e-3):
            raise StoreError(
                info.path,
                f"affine differs from {first.path.name}",
                dataset="--fmri",
                expected=first.affine.round(3).tolist(),
                actual=info.affine.round(3).tolist(),
            )
    return infos


def _blocks(path: Path, start: int, stop: int, block: int = _BLOCK_VOLUMES):
    """Yield ``(first, volumes)`` for volumes ``start:stop`` of ``path`` as float32 (x, y, z, n),
    ``block`` volumes at a time: a 4-D NIfTI stores time slowest, so each block is one
    contiguous read, and the file handle stays open so a .nii.gz is decompressed once, forward.
    Memory is one block, never the subject's whole 4-D array."""
    import nibabel as nib

    if not path.is_file():
        raise StoreError(path, "fMRI file not found", dataset="--fmri")
    try:
        img: Any = nib.load(str(path), keep_file_open=True)
        for first in range(start, stop, block):
            last = min(first + block, stop)
            yield first, np.asarray(img.dataobj[..., first:last], dtype=np.float32)
    except StoreError:
        raise
    except Exception as err:  # truncated gzip streams raise EOFError / zlib.error / OSError
        raise StoreError(
            path, f"cannot read volumes {start}..{stop}: {err}", dataset="--fmri"
        ) from None


def compute_mask(
    infos: Sequence[FmriInfo],
    *,
    start: int,
    stop: int,
    train_stop: int | None = None,
    rule: str,
    mask_file: str | Path | None = None,
    progress: Callable[[int], object] | None = None,
) -> np.ndarray:
    """The shared 3-D bool mask for volumes ``start:stop`` of every subject (see module doc).

    ``intersection``: a voxel is kept when it is finite in every used volume ``start:stop`` and
    varies (max > min) over the *training* volumes ``start:train_stop`` of every subject: the
    rows the z-score statistics use. Selecting on held-out volumes would keep a voxel that is
    constant while training and changes later; its clamped std would blow its held-out rows up.
    """
    grid = infos[0].shape
    train_stop = stop if train_stop is None else train_stop
    if rule == "file":
        if mask_file is None:
            raise StoreError("--mask", "mask rule 'file' needs a mask file")
        path = Path(mask_file)
        img = _load(path)
        mask = np.asarray(img.dataobj) > 0
        if mask.shape != grid:
            raise StoreError(
                path,
                "mask grid differs from the fMRI",
                dataset="--mask",
                expected=grid,
                actual=mask.shape,
            )
        if not np.allclose(img.affine, infos[0].affine, atol=1e-3):
            raise StoreError(path, "mask affine differs from the fMRI", dataset="--mask")
    elif rule == "intersection":
        mask = np.ones(grid, dtype=bool)
        for info in infos:
            finite = np.ones(grid, dtype=bool)
            low = np.full(grid, np.inf, dtype=np.float32)
            high = np.full(grid, -np.inf, dtype=np.float32)
            for first, data in _blocks(info.path, start, stop):
                finite &= np.isfinite(data).all(axis=3)
                train = data[..., : max(0, train_stop - first)]
                if train.shape[3]:
                    np.fmin(low, train.min(axis=3), out=low)
                    np.fmax(high, train.max(axis=3), out=high)
            mask &= finite & (high > low)
            if progress is not None:
                progress(1)
    else:
        raise StoreError(
            "--mask-rule", "unknown mask rule", expected="intersection or file", actual=rule
        )
    if not mask.any():
        raise StoreError(
            infos[0].path, "the mask is empty: no voxel is valid in every subject", dataset="--fmri"
        )
    return mask


def masked_series(info: FmriInfo, mask: np.ndarray, *, start: int, stop: int) -> np.ndarray:
    """Volumes ``start:stop`` of one subject inside ``mask`` as float32 (T, V), checked finite.

    Filled block by block: memory is the (T, V) result plus one block of volumes."""
    out = np.empty((stop - start, int(mask.sum())), dtype=np.float32)
    for first, data in _blocks(info.path, start, stop):
        out[first - start : first - start + data.shape[3]] = data[mask].T
    if not np.isfinite(out).all():
        t, v = np.argwhere(~np.isfinite(out))[0]
        raise StoreError(
            info.path,
            "NaN or Inf inside the mask",
            dataset="--fmri",
            expected="finite values",
            actual=f"volume {start + int(t)}, voxel {int(v)}",
        )
    return out
