"""The store on messy lab files (issue 10): media that change format, sheets with a short declared
range or formulas without saved values, dropped rows, voxels constant while training, and file
systems where HDF5 cannot lock. Every input is made here, small and with uneven sizes."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from giblet_ds.errors import StoreError
from giblet_ds.store import StoreDataset, open_store, write_synthetic_store
from giblet_ds.store import locking as store_locking
from giblet_ds.store.builder import fmri
from giblet_ds.store.builder.audio import decode_audio
from giblet_ds.store.builder.pipeline import _report_rows
from giblet_ds.store.builder.sheet import format_rows, read_annotations

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg (make setup)")
HEADER = ["Start Time (s)", "End Time (s)", "Scene Details - A Level", "Name - All", "Location"]


# -- 1. audio whose layout and rate change mid-file ------------------------------------------------
def _ts_part(path: Path, seconds: float, freq: int, rate: int, channels: int) -> Path:
    subprocess.run(
        [
            "ffmpeg", "-v", "error", "-y",
            "-f", "lavfi", "-i", "testsrc=size=32x18:rate=25",
            "-f", "lavfi", "-i", f"sine=frequency={freq}:sample_rate={rate}",
            "-t", str(seconds), "-ac", str(channels), "-c:v", "libx264", "-c:a", "aac",
            "-f", "mpegts", str(path),
        ],
        check=True,
    )  # fmt: skip
    return path


@needs_ffmpeg
def test_audio_follows_layout_and_rate_changes(tmp_path: Path) -> None:
    # An MPEG-TS whose AAC track goes from 3 s of mono 44.1 kHz (440 Hz) to 4 s of stereo 48 kHz
    # (880 Hz), joined by ffmpeg's concat demuxer (as broadcast recordings are).
    parts = [
        _ts_part(tmp_path / "a.ts", 3, 440, 44100, 1),
        _ts_part(tmp_path / "b.ts", 4, 880, 48000, 2),
    ]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"file '{p}'\n" for p in parts))
    movie = tmp_path / "switch.ts"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "concat", "-safe", "0", "-i", str(listing),
         "-c", "copy", str(movie)],
        check=True,
    )  # fmt: skip
    report: dict[str, int] = {}
    wave = decode_audio(movie, report=report)
    assert report == {"bad_packets": 0, "format_changes": 1}
    # MPEG-TS starts its clock at 1.4 s: the sound sits at 1.4 .. 8.4 s of the container clock,
    # plus up to ~0.15 s of AAC encoder padding kept at the joint (ffmpeg decodes it too).
    start = 1.4
    assert start + 7.0 <= len(wave) / 24000 <= start + 7.15

    def pitch(a: float, b: float) -> float:
        piece = wave[int((start + a) * 24000) : int((start + b) * 24000)]
        return float(np.argmax(np.abs(np.fft.rfft(piece))) / (len(piece) / 24000))

    assert pitch(0.5, 2.5) == pytest.approx(440, abs=1)
    assert pitch(3.5, 6.5) == pytest.approx(880, abs=1)


# -- 2. sheets whose declared used range is smaller than their rows --------------------------------
def _xlsx(path: Path, rows: list[list[object]], dimension: str | None = None) -> Path:
    import openpyxl

    book = openpyxl.Workbook()
    for row in rows:
        book.active.append(row)
    book.save(path)
    if dimension is not None:  # what some writers leave behind: a stale <dimension ref=...>
        with zipfile.ZipFile(path) as source:
            files = {name: source.read(name) for name in source.namelist()}
        sheet = files["xl/worksheets/sheet1.xml"].decode()
        sheet, n = re.subn(r'<dimension ref="[^"]*"', f'<dimension ref="{dimension}"', sheet)
        assert n == 1
        files["xl/worksheets/sheet1.xml"] = sheet.encode()
        with zipfile.ZipFile(path, "w") as target:
            for name, data in files.items():
                target.writestr(name, data)
    return path


def _rows(n: int) -> list[list[object]]:
    return [[2.5 * k, 2.5 * k + 2.0, f"scene {k}", "Sherlock", f"room {k % 3}"] for k in range(n)]


@pytest.mark.parametrize("dimension", ["A1:F10", "A1"])
def test_every_row_is_read_whatever_the_declared_range(tmp_path: Path, dimension: str) -> None:
    path = _xlsx(tmp_path / "short.xlsx", [HEADER, *_rows(23)], dimension)
    annotations, counts = read_annotations(path)
    assert len(annotations) == 23 and counts["rows"] == 23
    assert annotations[-1].text == "scene 22; Sherlock; room 1" and annotations[-1].end == 57.0


# -- 3. formulas without saved values; dropped rows -----------------------------------------------
def test_formulas_without_saved_values_are_an_error_naming_the_rows(tmp_path: Path) -> None:
    rows = [HEADER, *_rows(20)]
    for k in (3, 4, 5, 9, 12, 13, 19):  # end time = start + 2, as a formula (no cached result)
        rows[k][1] = f"=A{k + 1}+2"
    path = _xlsx(tmp_path / "formulas.xlsx", rows)
    with pytest.raises(StoreError) as err:
        read_annotations(path)
    message = str(err.value)
    assert "formulas without saved values in rows 4-6, 10, 13-14, 20 (7 rows)" in message
    assert "spreadsheet program" in message and "CSV" in message
    # Formulas in columns the build does not use are no problem.
    other = [[*HEADER, "Notes"], *[[*r, f"=A{i + 2}*2"] for i, r in enumerate(_rows(4))]]
    assert len(read_annotations(_xlsx(tmp_path / "notes.xlsx", other))[0]) == 4


def test_dropped_rows_are_named_counted_and_limited(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [HEADER, *_rows(60)]
    rows[8][1] = None  # sheet row 9: no end time
    rows.insert(30, [None] * 5)  # an empty line, not data
    annotations, counts = read_annotations(_xlsx(tmp_path / "one.xlsx", rows))
    assert len(annotations) == 59
    assert counts == {
        "rows": 60,
        "duplicates": 0,
        "empty": 1,
        "dropped": 1,
        "dropped_rows": [[9, "no end time"]],
    }
    _report_rows(tmp_path / "one.xlsx", counts)
    assert "one.xlsx: 1 of 60 rows dropped (row 9: no end time)" in capsys.readouterr().err
    many = [HEADER, *_rows(20)]
    for k in (2, 3, 4, 11):
        many[k][0] = None
    many[11][1] = ""
    path = _xlsx(tmp_path / "many.xlsx", many)
    with pytest.raises(StoreError) as err:
        read_annotations(path)
    assert "4 of 20 rows have no start or end time and would be dropped (rows 3-5, 12)" in str(
        err.value
    )
    assert "--max-dropped-fraction" in str(err.value)
    annotations, counts = read_annotations(path, max_dropped_fraction=0.25)
    assert len(annotations) == 16 and counts["dropped_rows"][-1] == [12, "no start or end time"]


def test_format_rows() -> None:
    assert format_rows([7, 3, 4, 5, 9]) == "3-5, 7, 9"
    assert format_rows(list(range(0, 60, 2)), limit=2) == "0, 2 and 28 more runs"


# -- 4. voxels selected on the training volumes; the gate refuses implausible held-out rows --------
def test_mask_uses_training_volumes_only(tmp_path: Path) -> None:
    import nibabel as nib

    rng = np.random.default_rng(5)
    data = rng.normal(600.0, 9.0, size=(3, 4, 5, 41)).astype(np.float32)
    data[1, 2, 3, :] = 0.0
    data[1, 2, 3, 25:] = 1000.0 + rng.normal(0, 5, 16)  # 0 while training, ~1,000 afterwards
    data[2, 0, 1, 40] = np.nan  # not finite in a used, held-out volume: never selectable
    path = tmp_path / "sub-1.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    infos = fmri.probe_fmri([path])
    # Volumes 2..41 are used, 2..20 are the training ones.
    mask = fmri.compute_mask(infos, start=2, stop=41, train_stop=20, rule="intersection")
    assert not mask[1, 2, 3] and not mask[2, 0, 1] and mask.sum() == 3 * 4 * 5 - 2
    everything = fmri.compute_mask(infos, start=2, stop=41, rule="intersection")
    assert everything[1, 2, 3]  # the old rule (all used volumes) kept it
    series = fmri.masked_series(infos[0], mask, start=2, stop=40)
    np.testing.assert_array_equal(series, data[mask][:, 2:40].T)


def test_gate_refuses_held_out_fmri_far_out_of_range(tmp_path: Path) -> None:
    path = write_synthetic_store(tmp_path / "s.h5", n_trs=37, n_voxels=23)
    info = open_store(path)
    val_row = int(info.splits["val"][1])
    with h5py.File(path, "r+") as handle:
        handle["fmri/mean"][val_row, 17] = 995.0
    with pytest.raises(StoreError) as err:
        open_store(path)
    message = str(err.value)
    assert "[fmri/mean]" in message and "in the val split: voxel 17" in message
    assert f"reads 995.0 at TR {val_row}" in message and "(expected |z| <= 50" in message
    # Per-subject series are checked with check_subjects.
    path2 = write_synthetic_store(tmp_path / "s2.h5", n_trs=37, n_voxels=23)
    test_row = int(open_store(path2).splits["test"][0])
    with h5py.File(path2, "r+") as handle:
        handle["fmri/subjects"][1, test_row, 4] = -700.0
    open_store(path2)
    with pytest.raises(StoreError, match=r"\[fmri/subjects\[sub-02\]\].*test split: voxel 4"):
        open_store(path2, check_subjects=True)


# -- 5. HDF5 file locking unavailable or held -----------------------------------------------------
def test_a_held_write_lock_is_named_not_called_truncated(tiny_store: Path, tmp_path: Path) -> None:
    path = tmp_path / "held.h5"
    shutil.copy(tiny_store, path)
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a writer holding the file open does (real flock)
        with pytest.raises(StoreError) as err:
            open_store(path)
    finally:
        os.close(fd)
    message = str(err.value)
    assert "another process holds a write lock" in message and "errno = 11" in message
    assert "truncated" not in message and "HDF5_USE_FILE_LOCKING=FALSE" in message
    assert open_store(path).n_trs == 37  # lock released: opens normally


def _no_locks(monkeypatch: pytest.MonkeyPatch, unlocked_fails: bool = False) -> list[object]:
    """h5py as it behaves where flock() fails with ENOLCK (NFS without lockd, some Lustre
    mounts): any open that asks for locking raises h5py's real message; locking=False works."""
    real_file = h5py.File
    calls: list[object] = []

    def file(path: object, mode: str = "r", *args: object, **kwargs: object) -> h5py.File:
        calls.append(kwargs.get("locking"))
        if kwargs.get("locking") is not False or unlocked_fails:
            raise OSError(
                errno.ENOLCK,
                "Unable to synchronously open file (unable to lock file, errno = 37, "
                "error message = 'No locks available')",
            )
        return real_file(path, mode, *args, **kwargs)

    monkeypatch.setattr(store_locking.h5py, "File", file)
    monkeypatch.setattr(store_locking, "_UNLOCKED", set())
    return calls


def test_store_opens_without_locking_where_locks_are_unavailable(
    tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "nfs.h5"
    shutil.copy(tiny_store, path)
    calls = _no_locks(monkeypatch)
    with pytest.warns(RuntimeWarning, match="file locking is not available here.*No locks"):
        info = open_store(path)
    assert info.n_trs == 37 and calls == [None, False]
    # From then on this process opens the file without locking only (never mixed flags).
    sample = StoreDataset(path, "train", info=info)[0]
    assert sample["fmri"].shape == (23,) and calls[2:] == [False]


def test_lock_failure_without_fallback_names_the_lock(
    tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "nfs.h5"
    shutil.copy(tiny_store, path)
    _no_locks(monkeypatch, unlocked_fails=True)
    with pytest.raises(StoreError) as err:
        open_store(path)
    message = str(err.value)
    assert "HDF5 file locking failed" in message and "No locks available" in message
    assert "HDF5_USE_FILE_LOCKING=FALSE" in message and "truncated" not in message


def test_lock_problem_classifies_h5py_messages() -> None:
    def err(text: str, code: int = 0) -> OSError:
        return OSError(code, text)

    text = (
        "Unable to synchronously open file (unable to lock file, errno = {}, error message = 'x')"
    )
    assert store_locking.lock_problem(err(text.format(37))) == "unavailable"
    assert store_locking.lock_problem(err(text.format(38))) == "unavailable"
    assert store_locking.lock_problem(err(text.format(11))) == "held"
    mismatch = "Unable to synchronously open file (file locking flag values don't match)"
    assert store_locking.lock_problem(err(mismatch)) == "mismatch"
    assert store_locking.lock_problem(err("file signature not found")) is None
