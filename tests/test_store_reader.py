"""open_store: every bad input gives a StoreError naming file, dataset, expected and actual."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from giblet_ds.errors import GibletError, StoreError
from giblet_ds.store import export_mask_nifti, load_mask, open_store, write_synthetic_store


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_store(tmp_path_factory.mktemp("base") / "store.h5")


def _broken(base: Path, tmp_path: Path, edit: Callable[[h5py.File], None]) -> Path:
    path = tmp_path / "broken.h5"
    shutil.copy(base, path)
    with h5py.File(path, "r+") as handle:
        edit(handle)
    return path


def _replace(name: str, data: np.ndarray) -> Callable[[h5py.File], None]:
    def edit(handle: h5py.File) -> None:
        del handle[name]
        handle.create_dataset(name, data=data)

    return edit


def _set(name: str, index: tuple, value: float) -> Callable[[h5py.File], None]:
    def edit(handle: h5py.File) -> None:
        data = handle[name][()]
        data[index] = value
        handle[name][...] = data

    return edit


def _attr(key: str, value: object) -> Callable[[h5py.File], None]:
    def edit(handle: h5py.File) -> None:
        if value is None:
            del handle.attrs[key]
        else:
            handle.attrs[key] = value

    return edit


CASES = {
    "schema": (
        _attr("schema_version", 99),
        r"\[/ attribute schema_version\]: unknown schema version 99 \(this giblet-ds reads "
        r"versions 1, 2\); rebuild .* \(expected 1 or 2, got 99\)",
    ),
    "no-schema": (
        _attr("schema_version", None),
        r"\[/\]: not a giblet-ds store: no schema_version",
    ),
    "incomplete": (_attr("complete", False), r"build did not complete"),
    "missing-attr": (_attr("lag", None), r"missing file attributes \['lag'\]"),
    "missing-dataset": (lambda h: h.__delitem__("text"), r"\[text\]: required dataset is missing"),
    "dtype": (
        _replace("video", np.zeros((37, 2, 6, 10, 3), np.float32)),
        r"\[video\]: wrong dtype \(expected uint8, got float32\)",
    ),
    "short-T": (
        _replace("text_mask", np.ones((36, 2), bool)),
        r"\[text_mask\]: shape does not match the rest of the store \(expected \(37, 2\), got \(36, 2\)\)",
    ),
    "mask-voxels": (
        lambda h: _flip_mask(h),
        r"\[fmri/mean\]: voxel count differs from the mask \(expected 24, got 23\)",
    ),
    "stats-size": (
        _replace("stats/audio/counts", np.zeros((3, 1024), np.int64)),
        r"\[stats/audio/counts\]: shape does not match .* \(expected \(2, 1024\), got \(3, 1024\)\)",
    ),
    "nan-fmri": (
        _set("fmri/mean", (30, 4), np.nan),
        r"\[fmri/mean\]: contains NaN or Inf \(expected finite values, got nan at \(30, 4\)\)",
    ),
    "inf-stats": (
        _set("stats/fmri/var", (3,), np.inf),
        r"\[stats/fmri/var\]: contains NaN or Inf \(expected finite values, got inf at \(3,\)\)",
    ),
    "zero-std": (
        _set("fmri/stats/std", (1, 2), 0.0),
        r"\[fmri/stats/std\]: per-subject std must be > 0",
    ),
    "codes": (
        _set("audio_codes", (2, 1, 3), 1024),
        r"\[audio_codes\]: audio codes out of range \(expected 0..1023, got \d+..1024\)",
    ),
    "split-range": (
        _replace("splits/test", np.array([35, 36, 37], np.int64)),
        r"\[splits/test\]: split index outside the store \(expected 0..36, got 35..37\)",
    ),
    "split-overlap": (
        _replace("splits/val", np.array([20, 21], np.int64)),
        r"\[splits/val\]: splits train and val overlap at TR 20",
    ),
    "split-empty": (
        _replace("splits/val", np.zeros(0, np.int64)),
        r"\[splits/val\]: split is empty",
    ),
    "subjects": (
        _attr("subjects", '["a"]'),
        r"subject ids do not match the subject axis \(expected 2, got \['a'\]\)",
    ),
    "no-affine": (
        lambda h: h["mask"].attrs.__delitem__("affine"),
        r"\[mask\]: mask has no affine attribute",
    ),
}


def _flip_mask(handle: h5py.File) -> None:
    mask = handle["mask"][()]
    mask.flat[np.flatnonzero(~mask)[0]] = True
    handle["mask"][...] = mask


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_store(base: Path, tmp_path: Path, case: str) -> None:
    edit, pattern = CASES[case]
    path = _broken(base, tmp_path, edit)
    with pytest.raises(StoreError, match=pattern) as err:
        open_store(path)
    assert str(err.value).startswith(str(path))
    assert isinstance(err.value, GibletError)


def test_nan_in_one_subject_needs_deep_check(base: Path, tmp_path: Path) -> None:
    path = _broken(base, tmp_path, lambda h: _nan_subject(h))
    with pytest.raises(StoreError, match=r"\[fmri/subjects\[1\]\]: contains NaN"):
        open_store(path, check_subjects=True)


def _nan_subject(handle: h5py.File) -> None:
    # A NaN written after the mean was computed (a damaged file); the mean itself stays finite.
    handle["fmri/subjects"][1, 5, 0] = np.nan


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(
        StoreError, match=r"no such store file; build one with tools/build_store.py"
    ):
        open_store(tmp_path / "absent.h5")
    with pytest.raises(StoreError, match="is not a file"):
        open_store(tmp_path)


def test_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "junk.h5"
    path.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(
        StoreError, match=r"not a readable HDF5 file \(truncated or not a store\?\)"
    ):
        open_store(path)


def test_truncated_file(base: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.h5"
    data = base.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match=r"cut.h5: (not a readable HDF5|unreadable store)"):
        open_store(path)


def test_mask_round_trip(base: Path, tmp_path: Path) -> None:
    import nibabel as nib

    mask, affine = load_mask(base)
    assert mask.shape == (2, 3, 4) and mask.dtype == bool and int(mask.sum()) == 23
    out = export_mask_nifti(base, tmp_path / "mask.nii.gz")
    img = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(img.dataobj).astype(bool), mask)
    np.testing.assert_array_equal(img.affine, affine)
    assert affine[0, 0] == 3.0 and affine[0, 3] == -90.0
