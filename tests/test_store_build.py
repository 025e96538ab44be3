"""End-to-end build from generated raw files (ffmpeg test movie, xlsx, tiny NIfTI), then read back.

Uneven sizes on purpose: 16 s movie at 25 fps, TR 0.5 s, lag 1, fMRI of 34/35/37 volumes on a
5 x 6 x 7 grid, 2 annotation slots, 9 x 16 frames.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from giblet_ds.errors import StoreError
from giblet_ds.store import export_mask_nifti, open_store
from giblet_ds.store.builder import pipeline
from giblet_ds.store.builder.pipeline import BuildInputs, BuildResult, build_store
from giblet_ds.store.builder.settings import BuildSettings
from giblet_ds.store.builder.video import decode_video

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg (make setup)")

SETTINGS = BuildSettings(
    tr=0.5,
    lag=1,
    frame_height=9,
    frame_width=16,
    encodec_bandwidth=1.5,
    clip_model="ViT-S-32-alt",
    pretrained=False,
    annotations_per_tr=2,
    split_fractions=(0.5, 0.25, 0.25),
    audio_segment_s=5.0,
)
GRID = (5, 6, 7)
VOLUMES = (34, 35, 37)


def _make_raw(folder: Path) -> BuildInputs:
    import nibabel as nib
    import openpyxl

    video = folder / "movie.m4v"
    subprocess.run(
        [
            "ffmpeg", "-v", "error", "-y",
            "-f", "lavfi", "-i", "testsrc=size=64x36:rate=25",
            "-f", "lavfi", "-i", "sine=frequency=330:sample_rate=44100",
            "-t", "16", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac",
            str(video),
        ],
        check=True,
    )  # fmt: skip
    book = openpyxl.Workbook()
    book.active.append(
        ["Start Time (s) ", "End Time (s)", "Scene Details - A Level", "Name - All", "Location "]
    )
    for k in range(9):
        book.active.append(
            [1.7 * k, 1.7 * k + 1.2, f"scene {k}", "Sherlock" if k % 2 else None, "Flat"]
        )
    book.active.append([1.7, 2.9, "scene 1", "Sherlock", "Flat"])  # duplicate row
    book.save(folder / "annotations.xlsx")
    rng = np.random.default_rng(3)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-6.0, -9.0, -12.0]
    paths = []
    for index, n in enumerate(VOLUMES):
        data = rng.normal(800.0 + 50 * index, 20.0, size=(*GRID, n)).astype(np.float32)
        data[0] = 0.0  # outside the brain in every subject
        if index == 1:
            data[2, 3, 4] = 5.0  # constant in one subject: excluded by the intersection rule
        img = nib.Nifti1Image(data, affine)
        img.header.set_zooms((3.0, 3.0, 3.0, 0.5))
        paths.append(folder / f"sub-{index + 1}.nii.gz")
        nib.save(img, str(paths[-1]))
    return BuildInputs(video=video, annotations=folder / "annotations.xlsx", fmri=tuple(paths))


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> BuildInputs:
    return _make_raw(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def built(raw: BuildInputs, tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    out = tmp_path_factory.mktemp("store") / "store.h5"
    return build_store(raw, out, SETTINGS, progress=False)


def _fast_audio(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace EnCodec with a stub: the tests using this are about files, not codes."""
    monkeypatch.setattr(pipeline.audio, "load_encodec", lambda *a, **k: (object(), None))
    monkeypatch.setattr(pipeline.audio, "init_random_codebooks", lambda *a, **k: None)
    monkeypatch.setattr(
        pipeline.audio,
        "encode_audio",
        lambda wave, model, **k: np.zeros((2, len(wave) // 320 + 1), np.int16),
    )


def test_layout(built: BuildResult) -> None:
    assert built.rebuilt and built.n_trs == 32
    info = open_store(built.path)
    assert info.model_input_sizes() == {
        "frames_per_tr": 4,  # ceil(0.5 s * 25 fps / 4)
        "frame_height": 9,
        "frame_width": 16,
        "n_codebooks": 2,  # 1.5 kbps
        "code_frames": 37,  # floor(0.5 s * 75 Hz)
        "text_slots": 2,
        "text_dim": 256,  # ViT-S-32-alt
        "n_voxels": 4 * 6 * 7 - 1,
    }
    assert info.subjects == ("sub-1", "sub-2", "sub-3")
    assert (info.tr, info.lag, info.fps, info.frame_skip, info.split_gap) == (0.5, 1, 25.0, 4, 11)
    assert info.attrs["trs_available"] == {"video": 32, "audio": 32, "fmri": 33, "n_trs": 32}
    assert info.attrs["fmri_volumes"] == [1, 33]
    assert info.pretrained == {"encodec": False, "clip": False}
    assert "RANDOM" in info.attrs["warning"]
    assert info.attrs["annotation_counts"] == {
        "rows": 10,
        "duplicates": 1,
        "empty": 0,
        "dropped": 0,
        "dropped_rows": [],
        "after_movie_end": 0,
        "trs_over_slots": 0,
        "never_in_a_slot": 0,
    }
    assert info.attrs["audio_format_changes"] == 0 and info.attrs["weight_files"] == {}
    assert info.attrs["mask_volumes"] == [1, 7]  # volumes lag .. lag + 6 training TRs
    assert set(info.attrs["input_hashes"]) == {
        "video",
        "annotations",
        "fmri:sub-1",
        "fmri:sub-2",
        "fmri:sub-3",
    }
    with h5py.File(built.path) as handle:
        assert handle["video"].chunks == (1, 4, 9, 16, 3)
        assert handle["fmri/mean"].chunks == (1, info.n_voxels)
        assert handle["fmri/subjects"].dtype == np.float16
        assert handle["audio_codes"].dtype == np.int16
        assert handle["fmri/stats/std"].shape == (3, info.n_voxels)


def test_splits_have_gaps(built: BuildResult) -> None:
    splits = open_store(built.path).splits
    assert [len(splits[k]) for k in ("train", "val", "test")] == [6, 2, 2]
    assert splits["val"][0] - splits["train"][-1] - 1 == 11  # lag + 10
    assert splits["test"][0] - splits["val"][-1] - 1 == 11


def test_video_is_the_decoded_movie(built: BuildResult, raw: BuildInputs) -> None:
    frames, _ = decode_video(raw.video, tr=0.5, frame_skip=4, n_frames=4, height=9, width=16)
    with h5py.File(built.path) as handle:
        np.testing.assert_array_equal(handle["video"][()], frames[:32])


def test_fmri_is_lagged_and_zscored_on_train(built: BuildResult, raw: BuildInputs) -> None:
    import nibabel as nib

    info = open_store(built.path)
    with h5py.File(built.path) as handle:
        mask = handle["mask"][()]
        stored = handle["fmri/subjects"][()].astype(np.float64)
        mean = handle["fmri/mean"][()].astype(np.float64)
        raw_mean = handle["fmri/stats/mean"][()]
    assert not mask[0].any() and not mask[2, 3, 4] and mask.sum() == info.n_voxels
    train = info.splits["train"]
    for s, path in enumerate(raw.fmri):
        data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
        series = data[mask][:, 1 : 1 + 32].T  # stimulus TR t <-> volume t + lag
        mu, sd = series[train].mean(0), series[train].std(0)
        np.testing.assert_allclose(raw_mean[s], mu, rtol=1e-5)
        np.testing.assert_allclose(stored[s], (series - mu) / sd, atol=4e-3, rtol=2e-3)
    np.testing.assert_allclose(mean, stored.mean(0), atol=2e-3, rtol=1e-3)


def test_mask_export_round_trip(built: BuildResult, raw: BuildInputs, tmp_path: Path) -> None:
    import nibabel as nib

    out = export_mask_nifti(built.path, tmp_path / "mask.nii.gz")
    img = nib.load(str(out))
    with h5py.File(built.path) as handle:
        np.testing.assert_array_equal(np.asarray(img.dataobj) > 0, handle["mask"][()])
    np.testing.assert_array_equal(img.affine, nib.load(str(raw.fmri[0])).affine)


def test_text_and_audio(built: BuildResult) -> None:
    with h5py.File(built.path) as handle:
        text, mask, codes = handle["text"][()], handle["text_mask"][()], handle["audio_codes"][()]
    # Annotation k spans [1.7 k, 1.7 k + 1.2): TR 0 ([0, 0.5)) holds scene 0; TR 3 ([1.5, 2))
    # holds scene 1; TR 16 ([8.0, 8.5)) falls between scenes 4 and 5 and repeats TR 15.
    assert mask[0].tolist() == [True, False] and mask[3].tolist() == [True, False]
    np.testing.assert_allclose(np.linalg.norm(text[0, 0]), 1.0, rtol=1e-5)
    assert not text[0, 1].any()
    np.testing.assert_array_equal(text[16], text[15])
    assert not np.array_equal(text[17], text[15])
    assert not np.allclose(text[0, 0], text[3, 0])
    assert codes.min() >= 0 and codes.max() < 1024 and len(np.unique(codes[:, 0])) > 5


def test_rebuild_is_a_noop_with_same_inputs(built: BuildResult, raw: BuildInputs) -> None:
    stamp = os.stat(built.path).st_mtime_ns
    again = build_store(raw, built.path, SETTINGS, progress=False)
    assert not again.rebuilt and again.build_hash == built.build_hash
    assert os.stat(built.path).st_mtime_ns == stamp


def test_changed_settings_or_inputs_rebuild(
    built: BuildResult, raw: BuildInputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fast_audio(monkeypatch)
    out = tmp_path / "store.h5"
    shutil.copy(built.path, out)
    narrow = BuildSettings(**{**SETTINGS.__dict__, "frame_width": 8})
    result = build_store(raw, out, narrow, progress=False)
    assert result.rebuilt and open_store(out).width == 8
    changed = tmp_path / "annotations.xlsx"
    shutil.copy(raw.annotations, changed)
    import openpyxl

    book = openpyxl.load_workbook(changed)
    book.active.append([20.0, 21.0, "a new row", None, None])
    book.save(changed)
    inputs = BuildInputs(video=raw.video, annotations=changed, fmri=raw.fmri)
    again = build_store(inputs, out, narrow, progress=False)
    assert again.rebuilt and again.build_hash != result.build_hash


def test_interrupted_build_leaves_no_valid_looking_file(
    built: BuildResult, raw: BuildInputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fast_audio(monkeypatch)
    calls: list[Any] = []

    def dies(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        raise KeyboardInterrupt  # Ctrl-C in the fMRI stage, after video/audio/text were written

    monkeypatch.setattr(pipeline.fmri, "masked_series", dies)
    fresh = tmp_path / "fresh.h5"
    with pytest.raises(KeyboardInterrupt):
        build_store(raw, fresh, BuildSettings(**{**SETTINGS.__dict__, "lag": 2}), progress=False)
    assert calls and sorted(p.name for p in tmp_path.iterdir()) == []
    # Over an existing store: the old file stays exactly as it was (atomic replace).
    old = tmp_path / "old.h5"
    shutil.copy(built.path, old)
    before = old.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        build_store(raw, old, BuildSettings(**{**SETTINGS.__dict__, "lag": 2}), progress=False)
    assert old.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["old.h5"]


def test_stale_temp_of_a_killed_build(
    built: BuildResult, raw: BuildInputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fast_audio(monkeypatch)
    out = tmp_path / "store.h5"
    stale = tmp_path / ".store.h5.tmp-999999999"
    shutil.copy(built.path, stale)  # a SIGKILLed build's leftover, never mistaken for the store
    with pytest.raises(StoreError, match="no such store file"):
        open_store(out)
    build_store(raw, out, SETTINGS, progress=False)
    assert not stale.exists() and open_store(out).n_trs == 32


def test_bad_inputs(raw: BuildInputs, tmp_path: Path) -> None:
    import nibabel as nib

    missing = BuildInputs(video=tmp_path / "none.m4v", annotations=raw.annotations, fmri=raw.fmri)
    with pytest.raises(StoreError, match=r"none.m4v \[--video\]: input file not found"):
        build_store(missing, tmp_path / "s.h5", SETTINGS, progress=False)
    odd = tmp_path / "odd.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 6, 8, 34), np.float32), np.eye(4)), str(odd))
    wrong_grid = BuildInputs(video=raw.video, annotations=raw.annotations, fmri=(raw.fmri[0], odd))
    with pytest.raises(
        StoreError,
        match=r"odd.nii.gz \[--fmri\]: grid differs from sub-1.nii.gz \(expected \(5, 6, 7\), got \(5, 6, 8\)\)",
    ):
        build_store(wrong_grid, tmp_path / "s.h5", SETTINGS, progress=False)
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 6, 7), np.float32), np.eye(4)), str(flat))
    with pytest.raises(
        StoreError, match=r"fMRI must be 4-D \(x, y, z, time\) \(expected 4, got 3\)"
    ):
        build_store(
            BuildInputs(raw.video, raw.annotations, (flat,)),
            tmp_path / "s.h5",
            SETTINGS,
            progress=False,
        )
    with pytest.raises(StoreError, match="subject ids \\(file names\\) must be unique"):
        BuildInputs(raw.video, raw.annotations, (raw.fmri[0], raw.fmri[0]))
    with pytest.raises(StoreError, match="a mask file goes with mask_rule 'file'"):
        build_store(
            BuildInputs(raw.video, raw.annotations, raw.fmri, mask=flat),
            tmp_path / "s.h5",
            SETTINGS,
        )
    assert not (tmp_path / "s.h5").exists()


def test_pretrained_weights_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    from encodec import EncodecModel

    from giblet_ds.store.builder import audio

    def offline(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(EncodecModel, "encodec_model_24khz", offline)
    with pytest.raises(
        StoreError, match=r"could not load pretrained EnCodec weights .*--no-pretrained"
    ):
        audio.load_encodec(6.0, pretrained=True)


def test_cli(
    built: BuildResult, raw: BuildInputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_store_cli", Path(__file__).resolve().parents[1] / "tools" / "build_store.py"
    )
    assert spec is not None and spec.loader is not None
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    config = tmp_path / "settings.yaml"
    config.write_text(
        "tr: 0.5\nlag: 1\nframe_height: 9\nframe_width: 16\nencodec_bandwidth: 1.5\n"
        "clip_model: ViT-S-32-alt\nannotations_per_tr: 2\nsplit_fractions: [0.5, 0.25, 0.25]\n"
        "audio_segment_s: 5.0\n"
    )
    common = [
        "--video",
        str(raw.video),
        "--annotations",
        str(raw.annotations),
        "--fmri",
        *map(str, raw.fmri),
    ]
    assert (
        cli.main(
            [
                *common,
                "--out",
                str(built.path),
                "--config",
                str(config),
                "--no-pretrained",
                "--quiet",
            ]
        )
        == 0
    )
    assert "up to date" in capsys.readouterr().out
    bad = config.with_name("bad.yaml")
    bad.write_text("tr: 0.5\nframes: 3\n")
    assert cli.main([*common, "--out", str(tmp_path / "x.h5"), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown build setting(s) ['frames']" in err
    assert (
        cli.main([*common, "--out", str(tmp_path / "x.h5"), "--split-gap", "3", "--lag", "1"]) == 2
    )
    assert "split_gap must be >= lag + 10 = 11 TRs" in capsys.readouterr().err
