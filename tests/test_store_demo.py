"""The demo raw data: real footage with sound, the lab's formats, and a ground truth the store keeps.

One short (60 s, 2 subjects) demo; the build uses a stub EnCodec to stay fast (the audio stage is
covered by test_store_build.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from giblet_ds.demo_data import DemoParams, DemoPaths, make_demo_data
from giblet_ds.demo_data.brain import AFFINE, GRID
from giblet_ds.demo_data.sources import CLIP_DIR
from giblet_ds.store import open_store
from giblet_ds.store.builder import pipeline
from giblet_ds.store.builder.pipeline import BuildInputs, build_store
from giblet_ds.store.builder.settings import BuildSettings, load_settings_yaml
from giblet_ds.store.builder.text import read_annotations
from giblet_ds.store.builder.video import probe_video

pytestmark = pytest.mark.skipif(
    shutil.which("ffmpeg") is None
    or shutil.which("espeak-ng") is None
    or not (CLIP_DIR / "vtest.avi").is_file(),
    reason="ffmpeg, espeak-ng and opencv-doc (make setup)",
)

PARAMS = DemoParams(duration_s=60.0, n_subjects=2)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoPaths:
    return make_demo_data(tmp_path_factory.mktemp("demo"), PARAMS)


def test_movie_and_annotations(demo: DemoPaths) -> None:
    info = probe_video(demo.video)
    assert demo.video.suffix == ".m4v"
    assert (info.fps, info.width, info.height, info.has_audio) == (25.0, 640, 360, True)
    assert info.duration_s == pytest.approx(60.0, abs=0.05)
    annotations, counts = read_annotations(demo.annotations)
    truth = json.loads(demo.truth_json.read_text())
    n_rows = len(truth["movie"]["shots"]) + len(truth["movie"]["narration"])
    assert counts == {
        "rows": n_rows + n_rows // 3,
        "duplicates": n_rows // 3,
        "empty": 0,
        "dropped": 0,
        "dropped_rows": [],
    }
    assert any(a.text.startswith("Pedestrians cross") for a in annotations)
    assert truth["params"]["duration_s"] == 60.0 and truth["n_volumes"] == [44, 46]


def test_nifti_on_the_mni_grid(demo: DemoPaths) -> None:
    import nibabel as nib

    with np.load(demo.truth_npz) as truth:
        mask, weights = truth["mask"], truth["weights"]
    assert mask.shape == GRID and 60_000 < mask.sum() < 80_000
    assert weights.shape == (5, int(mask.sum()))
    for path, n in zip(demo.fmri, (44, 46), strict=True):
        img = nib.load(str(path))
        assert img.shape == (*GRID, n)
        np.testing.assert_array_equal(img.affine, AFFINE)
        assert img.header.get_zooms() == (3.0, 3.0, 3.0, 1.5)
        first = np.asarray(img.dataobj[..., 0])
        np.testing.assert_array_equal(first != 0, mask)


def test_rerun_is_a_noop(demo: DemoPaths) -> None:
    stamp = os.stat(demo.fmri[0]).st_mtime_ns
    again = make_demo_data(demo.root, PARAMS)
    assert again == demo and os.stat(demo.fmri[0]).st_mtime_ns == stamp


def test_demo_store_keeps_the_planted_answer(
    demo: DemoPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline.audio, "load_encodec", lambda *a, **k: (object(), None))
    monkeypatch.setattr(pipeline.audio, "init_random_codebooks", lambda *a, **k: None)
    monkeypatch.setattr(
        pipeline.audio,
        "encode_audio",
        lambda wave, model, **k: np.zeros((4, len(wave) // 320 + 1), np.int16),
    )
    settings = BuildSettings.from_mapping(load_settings_yaml(demo.settings_yaml))
    assert settings.pretrained is False and settings.clip_model == "ViT-S-32-alt"
    inputs = BuildInputs(demo.video, demo.annotations, demo.fmri)
    out = build_store(inputs, tmp_path / "demo.h5", settings, progress=False).path
    info = open_store(out)
    assert (info.n_trs, info.n_frames, info.height, info.width) == (40, 10, 45, 80)
    assert info.subjects == ("demo_movie_s1", "demo_movie_s2")
    # 40 TRs, gaps of 13: 14 TRs split 0.65 / 0.15 / 0.2 (the demo keeps >= 50 test TRs at 450 s)
    assert info.split_sizes == {"train": 9, "val": 2, "test": 3}
    with np.load(demo.truth_npz) as truth:
        response, weights, mask = truth["response"], truth["weights"], truth["mask"]
    with h5py.File(out) as handle:
        assert handle["mask"].shape == GRID
        stored_mask = handle["mask"][()]
        fmri = handle["fmri/mean"][()].astype(np.float64)
    # Every MNI brain voxel varies over time in both subjects, so the intersection is the mask.
    np.testing.assert_array_equal(stored_mask, mask)
    responsive = np.abs(weights).max(axis=0) > 0.1
    # Store TR t holds volume t + lag: it must match the planted response at t + 3, not at t.
    paired = response[3 : 3 + 40].astype(np.float64)[:, responsive]
    unpaired = response[:40].astype(np.float64)[:, responsive]
    data = fmri[:, responsive]

    def mean_r(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a - a.mean(0), b - b.mean(0)
        return float(np.mean((a * b).sum(0) / np.sqrt((a**2).sum(0) * (b**2).sum(0))))

    assert mean_r(paired, data) > 0.4
    assert mean_r(paired, data) > mean_r(unpaired, data) + 0.1


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "tools" / "make_demo_data.py"
    spec = importlib.util.spec_from_file_location("make_demo_data_cli", script)
    assert spec is not None and spec.loader is not None
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(tmp_path / "x"), "--seconds", "20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: demo needs duration_s >= 60") and "got 20.0" in err
    assert not (tmp_path / "x").exists()
