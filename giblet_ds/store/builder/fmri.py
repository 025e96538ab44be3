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

__all__ = ["FmriInfo", "probe_fmri", "subject_id", "compute_mask", "masked_series"]


@dataclass(frozen=True)
class FmriInfo:
    """Header facts of one subject's 4-D NIfTI."""

    path: Path
    shape: tuple[int, int, int]
    n_volumes: int
    affine: np.ndarray
    header_tr: float


def subject_id(path: str | Path) -> str:
    """Subject id from a file name: ``sherlock_movie_s1.nii.gz`` -> ``sherlock_movie_s1``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


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
        zooms = img.header.get_zooms()
        infos.append(
            FmriInfo(
                path=path,
                shape=(shape[0], shape[1], shape[2]),
                n_volumes=shape[3],
                affine=np.asarray(img.affine, dtype=np.float64),
                header_tr=float(zooms[3]) if len(zooms) > 3 else 0.0,
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
