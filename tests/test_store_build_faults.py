"""The store builder on inputs that used to go silently wrong (issue 20): a full disk, an
annotation CSV saved by Excel on Windows, NIfTI headers with another TR than the default, and a
subject with fewer volumes than the others. Raw inputs are those of tests/test_store_build.py
(16 s movie, TR 0.5 s, lag 1, 5 x 6 x 7 grid), with NIfTIs made here."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from giblet_ds.errors import StoreError
from giblet_ds.store import open_store
from giblet_ds.store.builder.pipeline import BuildInputs, _report_rows
from giblet_ds.store.builder.sheet import read_annotations
from tests.test_store_build import GRID, _fast_audio, _make_raw

REPO = Path(__file__).resolve().parents[1]
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg (make setup)")
HEADER = "Start Time (s),End Time (s),Scene Details - A Level,Name - All,Location\r\n"

# The settings of tests/test_store_build.py as flags, without --tr (each test adds its own).
FLAGS = [
    "--lag", "1", "--frame-height", "9", "--frame-width", "16", "--encodec-bandwidth", "1.5",
    "--clip-model", "ViT-S-32-alt", "--no-pretrained", "--annotations-per-tr", "2",
    "--split-fractions", "0.5", "0.25", "0.25", "--audio-segment-s", "5", "--quiet",
]  # fmt: skip


def _cli() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_store_cli", REPO / "tools" / "build_store.py"
    )
    assert spec is not None and spec.loader is not None
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def _nifti(path: Path, n_volumes: int, tr: float, seed: int) -> Path:
    import nibabel as nib

    data = np.random.default_rng(seed).normal(700.0, 15.0, size=(*GRID, n_volumes))
    img = nib.Nifti1Image(data.astype(np.float32), np.diag([3.0, 3.0, 3.0, 1.0]))
    img.header.set_zooms((3.0, 3.0, 3.0, tr))
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> BuildInputs:
    return _make_raw(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def long_raw(raw: BuildInputs, tmp_path_factory: pytest.TempPathFactory) -> BuildInputs:
    """The same annotations with a 48 s movie: 32 TRs at 1.5 s, 96 at 0.5 s (room for splits)."""
    video = tmp_path_factory.mktemp("long") / "movie48.m4v"
    subprocess.run(
        [
            "ffmpeg", "-v", "error", "-y",
            "-f", "lavfi", "-i", "testsrc=size=32x18:rate=25",
            "-f", "lavfi", "-i", "sine=frequency=330:sample_rate=24000",
            "-t", "48", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac",
            str(video),
        ],
        check=True,
    )  # fmt: skip
    return BuildInputs(video=video, annotations=raw.annotations, fmri=raw.fmri)


def _args(raw: BuildInputs, fmri: list[Path], out: Path) -> list[str]:
    return [
        "--video", str(raw.video), "--annotations", str(raw.annotations),
        "--fmri", *map(str, fmri), "--out", str(out), *FLAGS,
    ]  # fmt: skip


# -- 7. headers that agree on another TR than the default, and no TR given -----------------------
@needs_ffmpeg
def test_headers_with_another_tr_and_no_tr_given_stop_the_build(
    long_raw: BuildInputs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _fast_audio(monkeypatch)
    fmri = [_nifti(tmp_path / f"sub-{k}.nii.gz", 37, 2.0, k) for k in (1, 2, 3)]
    out = tmp_path / "store.h5"
    assert _cli().main(_args(long_raw, fmri, out)) == 2
    err = capsys.readouterr().err
    assert (
        "error: --tr: no TR was given and every NIfTI header says TR 2 s (sub-1, sub-2, sub-3), "
        "not the default 1.5 s. Give the scan's repetition time: --tr 2 if the headers are "
        "right, --tr 1.5 if they are not (headers are often wrong: check the protocol)"
    ) in err
    assert not out.exists() and list(tmp_path.glob(".store.h5.tmp-*")) == []
    # Given explicitly, the build goes on, notes the disagreement and records the headers.
    assert _cli().main([*_args(long_raw, fmri, out), "--tr", "0.5"]) == 0
    err = capsys.readouterr().err
    assert (
        "note: the NIfTI headers say TR 2 s (sub-1, sub-2, sub-3); using the given tr 0.5 s" in err
    )
    info = open_store(out)
    assert info.tr == 0.5 and info.tr_source == "given"
    assert info.header_trs == {"sub-1": 2.0, "sub-2": 2.0, "sub-3": 2.0}


@needs_ffmpeg
def test_headers_that_disagree_and_no_tr_given_stop_the_build(
    long_raw: BuildInputs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _fast_audio(monkeypatch)
    fmri = [
        _nifti(tmp_path / "sub-1.nii.gz", 37, 1.5, 1),
        _nifti(tmp_path / "sub-2.nii.gz", 37, 2.0, 2),
    ]
    assert _cli().main(_args(long_raw, fmri, tmp_path / "s.h5")) == 2
    assert (
        "error: --tr: no TR was given and the NIfTI headers disagree: TR 1.5 s (sub-1), "
        "TR 2 s (sub-2). Give the scan's repetition time with --tr"
    ) in capsys.readouterr().err


def test_header_tr_units() -> None:
    import nibabel as nib

    from giblet_ds.store.builder.fmri import header_tr

    img = nib.Nifti1Image(np.zeros((2, 3, 4, 5), np.float32), np.eye(4))
    img.header.set_zooms((1.0, 1.0, 1.0, 1500.0))
    img.header.set_xyzt_units("mm", "msec")
    assert header_tr(img.header) == 1.5
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((1.0, 1.0, 1.0, 0.0))
    assert header_tr(img.header) is None  # a zero TR says nothing


# -- 8. one subject with fewer volumes --------------------------------------------------------------
@needs_ffmpeg
def test_a_short_subject_is_named_and_every_volume_count_recorded(
    long_raw: BuildInputs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _fast_audio(monkeypatch)
    fmri = [
        _nifti(tmp_path / "sub-1.nii.gz", 100, 0.5, 1),
        _nifti(tmp_path / "sub-2.nii.gz", 98, 0.5, 2),
        _nifti(tmp_path / "sub-3.nii.gz", 60, 0.5, 3),
    ]
    out = tmp_path / "store.h5"
    assert _cli().main([*_args(long_raw, fmri, out), "--tr", "0.5"]) == 0
    err = capsys.readouterr().err
    assert (
        "TRs available: video 96, audio 96, fMRI 59 (sub-3: 60 volumes - lag 1); using the "
        "common 59 TRs (29.5 s), set by the fMRI of sub-3" in err
    )
    assert "fMRI volumes per subject: sub-1 100, sub-2 98, sub-3 60" in err
    assert (
        "WARNING: cropped video: TRs 59..95 (37 of 96, 29.5..48.0 s) dropped: the fMRI of sub-3 "
        "has 60 volumes (59 TRs after lag 1)" in err
    )
    assert (
        "WARNING: cropped fMRI sub-1: volumes 60..99 (40 of 100) dropped: the fMRI of sub-3 has "
        "60 volumes (59 TRs after lag 1)" in err
    )
    info = open_store(out)
    assert info.n_trs == 59
    assert info.fmri_volume_counts == {"sub-1": 100, "sub-2": 98, "sub-3": 60}
    assert info.cropped == {
        "limited_by": "fmri:sub-3",
        "video": {"available": 96, "kept": 59, "dropped": [59, 96], "unit": "TRs"},
        "audio": {"available": 96, "kept": 59, "dropped": [59, 96], "unit": "TRs"},
        "fmri:sub-1": {"available": 100, "kept": 59, "dropped": [60, 100], "unit": "volumes"},
        "fmri:sub-2": {"available": 98, "kept": 59, "dropped": [60, 98], "unit": "volumes"},
    }


# -- 6. an annotation CSV saved by Excel on Windows -------------------------------------------------
def test_csv_in_windows_1252_is_read_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "excel.csv"
    text = HEADER + "0,2,Baker Street,Holmes,Flat\r\n2.5,4,Watson’s blog,John Watson,Café\r\n"
    path.write_bytes(text.encode("cp1252"))  # "’" is byte 0x92, "é" 0xe9
    annotations, counts = read_annotations(path)
    assert [a.text for a in annotations] == [
        "Baker Street; Holmes; Flat",
        "Watson’s blog; John Watson; Café",
    ]
    assert counts["encoding"] == "cp1252"
    _report_rows(path, counts)
    assert (
        "note: excel.csv is not UTF-8 (byte 0x92 on line 3); read as Windows-1252 (cp1252), "
        'the encoding Excel on Windows saves CSV in: check its text (e.g. "Watson’s blog"), '
        'or save it as "CSV UTF-8"'
    ) in capsys.readouterr().err
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    annotations, counts = read_annotations(bom)
    assert (
        annotations[1].text == "Watson’s blog; John Watson; Café"
        and counts["encoding"] == "utf-8-sig"
    )


def test_csv_in_no_known_encoding_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "odd.csv"
    # 0x81 is undefined in Windows-1252 and invalid UTF-8: neither reading fits.
    path.write_bytes((HEADER + "0,2,a,b,c\r\n").encode() + b"3,4,Watson\x81s,b,c\r\n")
    with pytest.raises(StoreError) as err:
        read_annotations(path)
    assert str(err.value) == (
        f"{path} [--annotations]: line 3 is neither UTF-8 nor Windows-1252 (byte 0x81 at "
        'column 11). Save the sheet as "CSV UTF-8" (Excel: File > Save As > CSV UTF-8), or '
        "give the .xlsx"
    )


# -- 4. a full disk ---------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A tmpfs of ``request.param`` KiB, unmounted afterwards."""
    size = int(request.param)
    folder = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}k", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        reason = f"cannot mount a tmpfs here: {mount.stderr.strip() or mount.returncode}"
        print(reason)
        pytest.skip(reason)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


# The build runs in its own process: a fault inside HDF5 must not take pytest with it. EnCodec is
# stubbed (the tests are about files); ``disk.free_bytes`` lies when asked to, so the write itself fails.
DRIVER = """
import sys
import numpy as np
from giblet_ds.store.builder import disk, pipeline
pipeline.audio.load_encodec = lambda *a, **k: (object(), None)
pipeline.audio.init_random_codebooks = lambda *a, **k: None
pipeline.audio.encode_audio = lambda wave, model, **k: np.zeros((2, len(wave) // 320 + 1), np.int16)
if sys.argv[1] == "lie":
    disk.free_bytes = lambda folder: 1 << 40
sys.argv[0] = "tools/build_store.py"
import runpy
sys.argv = sys.argv[1:]
runpy.run_path("tools/build_store.py", run_name="__main__")
"""


def _build_in_process(raw: BuildInputs, out: Path, lie: bool) -> subprocess.CompletedProcess[str]:
    args = _args(raw, list(raw.fmri), out)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", DRIVER, "lie" if lie else "truth", *args, "--tr", "0.5"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@needs_ffmpeg
@pytest.mark.parametrize("small_disk", [100], indirect=True)
def test_full_disk_is_refused_before_writing(raw: BuildInputs, small_disk: Path) -> None:
    done = _build_in_process(raw, small_disk / "s.h5", lie=False)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("[build_store]")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {small_disk}: not enough free space")
    assert lines[0].endswith(
        "not enough free space for s.h5: it needs at least 0.28 MB, 0.10 MB free. Free some "
        "space, or give --out on another file system"
    )
    assert sorted(os.listdir(small_disk)) == []


@needs_ffmpeg
@pytest.mark.parametrize("small_disk", [160], indirect=True)
def test_write_error_is_one_line_and_leaves_no_file(raw: BuildInputs, small_disk: Path) -> None:
    done = _build_in_process(raw, small_disk / "s.h5", lie=True)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("[build_store]")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1, done.stderr[-3000:]
    # (the free space in the message is the lie the driver told)
    assert lines[0].startswith(
        f"error: {small_disk}: writing the store failed: no space left on the device ("
    )
    assert lines[0].endswith(
        "the store needs about 0.33 MB); its temporary file removed. Free some space, or give "
        "--out on another file system"
    )
    assert "Exception ignored" not in done.stderr
    assert sorted(os.listdir(small_disk)) == []


# -- a sibling: annotations the text slots leave out are counted ------------------------------------
def test_annotations_left_out_of_the_slots_are_counted() -> None:
    from giblet_ds.store.builder.sheet import Annotation
    from giblet_ds.store.builder.text import annotations_per_tr

    # TR 0 ([0, 1)) is overlapped by a, b, c and TR 1 by a, b, c, d: two slots hold a and b in
    # both, so c and d are in no slot; TR 2 overlaps none (forward fill). "e" starts after the
    # last TR (counted as after_movie_end, not here).
    notes = [
        Annotation(0.0, 1.5, "a"), Annotation(0.1, 1.2, "b"), Annotation(0.2, 1.9, "c"),
        Annotation(1.3, 1.4, "d"), Annotation(5.0, 6.0, "e"),
    ]  # fmt: skip
    report: dict[str, int] = {}
    _, mask = annotations_per_tr(
        notes, np.eye(5, dtype=np.float32), tr=1.0, n_trs=3, slots=2, report=report
    )
    assert mask.tolist() == [[True, True], [True, True], [True, True]]
    assert report == {"trs_over_slots": 2, "never_in_a_slot": 2}


def test_settings_yaml_in_another_encoding_or_broken_is_a_config_error(tmp_path: Path) -> None:
    from giblet_ds.errors import ConfigError
    from giblet_ds.store.builder.settings import load_settings_yaml

    path = tmp_path / "build.yaml"
    path.write_bytes("clip_model: ViT-S-32-alt  # Watson’s\n".encode("cp1252"))
    with pytest.raises(ConfigError) as err:
        load_settings_yaml(path)
    assert str(err.value) == f"{path}: not UTF-8 text (byte 0x92 at offset 34); save it as UTF-8"
    path.write_text("tr: [1.5\n")
    with pytest.raises(ConfigError, match=r"build.yaml: not valid YAML: while parsing"):
        load_settings_yaml(path)


def test_a_store_without_the_new_records_stays_readable(tiny_store: Path) -> None:
    info = open_store(tiny_store)  # written without tr_source, cropped, ... (like older stores)
    assert (info.tr_source, info.header_trs, info.fmri_volume_counts, info.cropped) == (
        None,
        None,
        None,
        None,
    )
