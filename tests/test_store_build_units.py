"""Build-stage units: frame sampling by timestamp, audio code windows, annotations, HRF, splits."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from giblet_ds.demo_data.hrf import convolve_causal, glover_hrf
from giblet_ds.errors import ConfigError, StoreError
from giblet_ds.store.builder.align import common_trs, whole_trs
from giblet_ds.store.builder.audio import codes_per_tr
from giblet_ds.store.builder.normalize import zscore_train
from giblet_ds.store.builder.settings import BuildSettings
from giblet_ds.store.builder.splits import make_splits
from giblet_ds.store.builder.text import Annotation, annotations_per_tr, read_annotations
from giblet_ds.store.builder.video import decode_video, frames_per_tr, probe_video

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg (make setup)")


def _ramp_video(path: Path, rate: str, seconds: float) -> Path:
    """Frame N is uniformly grey with luma 20 + N (lossless FFV1), so pixels name the frame."""
    source = f"color=c=black:s=32x18:r={rate}:d={seconds},geq=lum='20+N':cb=128:cr=128"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", source, "-c:v", "ffv1", str(path)],
        check=True,
    )
    return path


@needs_ffmpeg
@pytest.mark.parametrize("rate,fps", [("25", 25.0), ("24000/1001", 24000 / 1001)])
def test_frames_sampled_by_timestamp(tmp_path: Path, rate: str, fps: float) -> None:
    path = _ramp_video(tmp_path / "ramp.mkv", rate, 8.0)
    assert probe_video(path).fps == pytest.approx(fps)
    tr, skip = 0.5, 3
    n_frames = frames_per_tr(tr, fps, skip)
    assert n_frames == math.ceil(tr * fps / skip)  # 5 at 25 fps (12.5 / 3), 4 at 23.976
    frames, real_fps = decode_video(
        path, tr=tr, frame_skip=skip, n_frames=n_frames, height=9, width=16
    )
    assert real_fps == pytest.approx(fps)
    total = round(8.0 * fps)
    assert frames.shape == (math.floor(total / fps / tr + 1e-9), n_frames, 9, 16, 3)
    # Grey level of every decoded frame after the same resize: strictly increasing with N.
    import av

    with av.open(str(path)) as container:
        decoded = [
            (
                f.time,
                f.reformat(width=16, height=9, format="rgb24", interpolation="AREA")
                .to_ndarray()
                .mean(),
            )
            for f in container.decode(video=0)
        ]
    times = np.array([t for t, _ in decoded])
    levels = [level for _, level in decoded]
    np.testing.assert_allclose(times, np.arange(total) / fps, atol=1e-3)  # ms time base
    assert len(levels) == total and (np.diff(levels) > 0).all()
    got = frames.astype(np.float64).mean(axis=(2, 3, 4))
    for i in range(frames.shape[0]):
        for j in range(n_frames):
            # The frame on screen at i * tr + j * skip / fps: the last to start by then (1 ms
            # tolerance for the container's rounded timestamps).
            expected = int(np.searchsorted(times, i * tr + j * skip / fps + 1e-3, "right")) - 1
            assert got[i, j] == levels[expected], (i, j)


def test_frames_per_tr_matches_reference() -> None:
    assert frames_per_tr(1.5, 25.0, 4) == 10  # REFERENCE.md: 10 frames, every 4th of 38
    assert frames_per_tr(1.5, 24000 / 1001, 4) == 9


def test_codes_per_tr_windows() -> None:
    codes = np.tile(np.arange(400, dtype=np.int16), (3, 1))
    codes[1] += 1
    out = codes_per_tr(codes, 1.5, 4)
    assert out.shape == (4, 3, 112)
    assert out[1, 0, 0] == 112 and out[2, 0, 0] == 225 and out[3, 0, 0] == 337
    assert out[1, 1, 0] == 113
    # TR 3 needs frames 337..448 but there are 400: padded with the last frame (399).
    assert out[3, 0, 62] == 399 and out[3, 0, -1] == 399 and out[3, 0, 61] == 398


def test_hrf_is_causal_and_peaks_4_trs_later() -> None:
    kernel = glover_hrf(1.5)
    assert int(np.argmax(kernel)) == 4
    assert kernel[0] == 0.0 and kernel.sum() == pytest.approx(1.0)
    impulse = np.zeros((40, 2))  # 30 TRs after the impulse: longer than the 22-sample kernel
    impulse[10, 0] = 1.0
    response = convolve_causal(impulse, kernel)
    assert int(np.argmax(response[:, 0])) == 14  # 4 TRs (6 s) after the impulse
    assert not response[:11].any() and not response[:, 1].any()
    assert response[10 : 10 + len(kernel), 0] == pytest.approx(kernel)
    assert len(kernel) == 22  # 32 s at 1.5 s
    assert int(np.argmax(glover_hrf(1.0))) in (5, 6)  # the peak is in seconds, not samples
    with pytest.raises(ValueError, match="tr must be > 0"):
        glover_hrf(0.0)


def test_splits_and_gaps() -> None:
    splits = make_splits(100, (0.7, 0.15, 0.15), 13)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [52, 11, 11]
    assert splits["val"][0] - splits["train"][-1] - 1 == 13
    assert splits["test"][0] - splits["val"][-1] - 1 == 13 and splits["test"][-1] == 99
    with pytest.raises(
        ConfigError, match=r"37 TRs cannot hold .* gaps of 17 TRs \(sizes would be 3/0/0\)"
    ):
        make_splits(37, (0.7, 0.15, 0.15), 17)
    with pytest.raises(ConfigError, match=r"split_gap must be >= lag \+ 10 = 13 TRs"):
        BuildSettings(split_gap=5)
    assert BuildSettings(lag=2).gap == 12


def test_settings_validation_and_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"tr must be > 0, got 0(.|\n)*encodec_bandwidth must be"):
        BuildSettings(tr=0, encodec_bandwidth=5.0)
    with pytest.raises(ConfigError, match=r"unknown build setting\(s\) \['fps'\]; valid keys: \["):
        BuildSettings.from_mapping({"fps": 25})
    settings = BuildSettings.from_mapping({"split_fractions": [0.8, 0.1, 0.1], "device": "cuda"})
    assert settings.split_fractions == (0.8, 0.1, 0.1)
    assert "device" not in settings.hashed() and settings.hashed()["split_gap"] == 13


def test_common_trs_crops_never_warps() -> None:
    assert whole_trs(1426.0, 1.5) == 950 and whole_trs(1419.7, 1.5) == 946
    counts = common_trs(video=950, audio=946, fmri_volumes=976, lag=3)
    assert counts == {"video": 950, "audio": 946, "fmri": 973, "n_trs": 946}
    with pytest.raises(StoreError, match="no TR is covered by every modality"):
        common_trs(video=5, audio=5, fmri_volumes=3, lag=3)


def test_zscore_train_only() -> None:
    rng = np.random.default_rng(1)
    series = rng.normal(5.0, 2.0, size=(29, 11))
    series[:, 3] = 7.0  # constant voxel: no division by zero
    train = np.arange(0, 17)
    z, mean, std = zscore_train(series, train)
    np.testing.assert_allclose(mean, series[:17].mean(0), rtol=1e-6)
    np.testing.assert_allclose(z[:17].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.delete(z[:17].std(0), 3), 1.0, rtol=1e-5)
    assert std[3] == 1.0 and not z[:, 3].any()
    assert abs(z[17:].mean()) > 1e-3  # held-out TRs were not used


def _write_xlsx(path: Path, rows: list[list[object]]) -> Path:
    import openpyxl

    book = openpyxl.Workbook()
    for row in rows:
        book.active.append(row)
    book.save(path)
    return path


def test_read_annotations_xlsx(tmp_path: Path) -> None:
    header = [
        "Start Time (s) ",
        "End Time (s)",
        "Scene Details - A Level  ",
        "Name - All",
        "Location",
    ]
    rows = [
        header,
        [3.0, 4.0, "Watson sits", "John Watson", "Flat"],
        [0.5, 2.0, "Sherlock  enters", None, "Baker St "],
        [3.0, 4.0, "Watson sits", "John Watson", "Flat"],  # a repeated row (the sheet's 479-961)
        [None, None, None, None, None],
    ]
    annotations, counts = read_annotations(_write_xlsx(tmp_path / "a.xlsx", rows))
    assert annotations == [
        Annotation(0.5, 2.0, "Sherlock enters; Baker St"),
        Annotation(3.0, 4.0, "Watson sits; John Watson; Flat"),
    ]
    assert counts == {"rows": 3, "duplicates": 1, "empty": 1, "dropped": 0, "dropped_rows": []}
    bad = _write_xlsx(tmp_path / "b.xlsx", [["Start Time (s)", "End Time (s)", "Location"]])
    with pytest.raises(
        StoreError, match=r"b.xlsx \[--annotations\]: missing column 'Scene Details"
    ):
        read_annotations(bad)
    with pytest.raises(StoreError, match=r"unsupported annotation format \(expected .xlsx or .csv"):
        read_annotations(_write_text(tmp_path / "a.txt"))


def _write_text(path: Path) -> Path:
    path.write_text("x")
    return path


def test_annotations_per_tr_slots_and_forward_fill() -> None:
    notes = [
        Annotation(0.2, 0.4, "a"),
        Annotation(0.3, 2.2, "b"),
        Annotation(0.9, 1.0, "c"),
        Annotation(5.0, 5.0, "d"),  # zero length: counts in the TR where it starts
    ]
    emb = np.eye(4, 5, dtype=np.float32)
    text, mask = annotations_per_tr(notes, emb, tr=1.0, n_trs=7, slots=2)
    assert text.shape == (7, 2, 5) and mask.dtype == bool
    assert mask.tolist() == [
        [True, True], [True, False], [True, False], [True, False], [True, False],
        [True, False], [True, False],
    ]  # fmt: skip
    # TR 0 holds a and b (c is the third, over the limit), TRs 1-2 hold b, 3-4 repeat TR 2, TR 5 d.
    assert text[0, 0, 0] == 1 and text[0, 1, 1] == 1
    assert text[1, 0, 1] == 1 and text[2, 0, 1] == 1 and not text[2, 1].any()
    np.testing.assert_array_equal(text[3], text[2])
    np.testing.assert_array_equal(text[4], text[2])
    assert text[5, 0, 3] == 1 and text[6, 0, 3] == 1
    late = [Annotation(2.5, 3.0, "x")]
    t2, m2 = annotations_per_tr(late, emb[:1], tr=1.0, n_trs=4, slots=3)
    assert m2[:2].sum() == 0 and not t2[:2].any() and m2[2, 0] and m2[3, 0]
