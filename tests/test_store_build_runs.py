"""A store of two runs of unequal length x 3 subjects built from raw files: the /runs table,
fMRI z-scored per subject and run on that run's training TRs, splits by time and by run, and
inputs that differ between runs named in the error with no store written.

Sizes: run-1 is a 24 s movie, run-2 a 20 s one (TR 0.5 s, lag 1); subjects have 50/51/53 and
42/43/44 volumes on a 5 x 6 x 7 grid, so run-1 holds 48 TRs and run-2 40.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from giblet_ds.errors import StoreError
from giblet_ds.store import StoreDataset, open_store
from giblet_ds.store.builder.pipeline import BuildInputs, RunInputs, build_store
from giblet_ds.store.builder.settings import BuildSettings
from giblet_ds.store.builder.splits import make_splits

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
    split_gap=11,
    audio_segment_s=5.0,
)
GRID = (5, 6, 7)
RUNS = {"run-1": (24, (50, 51, 53)), "run-2": (20, (42, 43, 44))}
SUBJECTS = ("sub-01", "sub-02", "sub-03")


def _movie(path: Path, seconds: int, freq: int) -> None:
    subprocess.run(
        [
            "ffmpeg", "-v", "error", "-y",
            "-f", "lavfi", "-i", "testsrc=size=64x36:rate=25",
            "-f", "lavfi", "-i", f"sine=frequency={freq}:sample_rate=44100",
            "-t", str(seconds), "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac",
            str(path),
        ],
        check=True,
    )  # fmt: skip


def _nifti(path: Path, n: int, seed: int, zoom: float = 0.5, grid: tuple = GRID) -> None:
    import nibabel as nib

    data = np.random.default_rng(seed).normal(800.0 + seed, 20.0, size=(*grid, n))
    data = data.astype(np.float32)
    data[0] = 0.0  # outside the brain
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms((3.0, 3.0, 3.0, zoom))
    nib.save(img, str(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunInputs, ...]:
    folder = tmp_path_factory.mktemp("raw-runs")
    (folder / "sheet.csv").write_text(
        "Start Time (s),End Time (s),Scene Details - A Level,Name - All,Location\n"
        + "".join(f"{1.5 * k},{1.5 * k + 1},scene {k},Sherlock,Flat\n" for k in range(7))
    )
    out = []
    for r, (run_id, (seconds, volumes)) in enumerate(RUNS.items()):
        _movie(folder / f"{run_id}.m4v", seconds, 330 + 110 * r)
        paths = []
        for s, n in enumerate(volumes):
            paths.append(folder / f"{SUBJECTS[s]}_{run_id}.nii.gz")
            _nifti(paths[-1], n, seed=10 * r + s)
        sheet = folder / "sheet.csv" if r == 0 else None  # run-2 has no annotations
        out.append(RunInputs(run_id, folder / f"{run_id}.m4v", sheet, tuple(paths), SUBJECTS))
    return tuple(out)


@pytest.fixture(scope="module")
def built(runs: tuple[RunInputs, ...], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store-runs") / "runs.h5"
    build_store(BuildInputs(runs=runs), out, SETTINGS, progress=False)
    return out


def test_runs_table_and_time_splits(built: Path) -> None:
    info = open_store(built, check_subjects=True)
    assert info.n_trs == 48 + 40
    assert info.runs.ids == ("run-1", "run-2")
    assert info.runs.stimuli == ("run-1.m4v", "run-2.m4v")
    assert info.runs.first.tolist() == [0, 48]
    assert info.runs.n_trs.tolist() == [48, 40]
    assert info.subjects == SUBJECTS
    # split_by time: each run cut into train | 11 | val | 11 | test (26 and 18 usable TRs)
    assert info.splits["train"].tolist() == list(range(0, 14)) + list(range(48, 58))
    assert info.splits["val"].tolist() == list(range(25, 31)) + list(range(69, 73))
    assert info.splits["test"].tolist() == list(range(42, 48)) + list(range(84, 88))
    assert info.attrs["cropped"]["run-2"]["limited_by"] == "video"
    assert info.attrs["annotation_counts"]["run-2"]["rows"] == 0
    with h5py.File(built) as handle:
        assert not handle["text_mask"][48:].any()  # run-2 has no sheet: every slot empty
        assert handle["text_mask"][:48].any()


def test_fmri_zscored_per_subject_and_run_on_its_training_trs(
    built: Path, runs: tuple[RunInputs, ...]
) -> None:
    import nibabel as nib

    info = open_store(built)
    with h5py.File(built) as handle:
        mask = handle["mask"][()]
        stored = handle["fmri/subjects"][()].astype(np.float64)
        run_mean = handle["runs/fmri_mean"][()]
        run_std = handle["runs/fmri_std"][()]
        summary = handle["fmri/stats/mean"][()]
    for r, run in enumerate(runs):
        first, n = int(info.runs.first[r]), int(info.runs.n_trs[r])
        train = make_splits(n, (0.5, 0.25, 0.25), 11)["train"]
        for s, path in enumerate(run.fmri):
            data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
            series = data[mask][:, 1 : 1 + n].T  # stimulus TR t <-> volume t + lag, in the run
            mu, sd = series[train].mean(0), series[train].std(0)
            np.testing.assert_allclose(run_mean[r, s], mu, rtol=1e-5)
            np.testing.assert_allclose(run_std[r, s], sd, rtol=1e-4)
            np.testing.assert_allclose(
                stored[s, first : first + n], (series - mu) / sd, atol=4e-3, rtol=2e-3
            )
    # the (S, V) summary weights each run's raw mean by its TR count
    np.testing.assert_allclose(summary, (48 * run_mean[0] + 40 * run_mean[1]) / 88, rtol=1e-5)


def test_split_by_run_named(runs: tuple[RunInputs, ...], tmp_path: Path) -> None:
    settings = BuildSettings.from_mapping(
        {
            **{k: v for k, v in SETTINGS.__dict__.items() if k not in ("split_gap",)},
            "split_gap": 11,
            "split_by": "run",
            "split_runs": {"train": ["run-1"], "val": ["run-2"], "test": ["run-2"]},
        }
    )
    out = tmp_path / "by-run.h5"
    build_store(BuildInputs(runs=runs), out, settings, progress=False)
    info = open_store(out)
    assert info.splits["train"].tolist() == list(range(48))
    # run-2 (40 TRs) cut in time: val 14 TRs | 11 | test 15 TRs (29 usable, 1:1, rounded)
    assert info.splits["val"].tolist() == list(range(48, 62))
    assert info.splits["test"].tolist() == list(range(73, 88))
    assert info.attrs["split_runs"] == {"train": ["run-1"], "val": ["run-2"], "test": ["run-2"]}
    # whole runs: each z-scored on all its own rows (mean 0 over the run, per voxel)
    with h5py.File(out) as handle:
        rows = handle["fmri/subjects"][1, 48:88].astype(np.float64)
    np.testing.assert_allclose(rows.mean(0), 0.0, atol=5e-3)
    # a window of a training TR never reaches into run-2 (train is rows 0..47 of run-1 only)
    train = StoreDataset(out, "train", info=info, context_trs=3, context_end="volume")
    assert train[47]["context_mask"].tolist() == [True, False, True]


def test_inputs_that_differ_between_runs_are_named(
    runs: tuple[RunInputs, ...], tmp_path: Path
) -> None:
    one, two = runs
    out = tmp_path / "bad.h5"
    missing = RunInputs("run-2", two.video, None, two.fmri[:2], SUBJECTS[:2])
    with pytest.raises(
        StoreError,
        match=r"run run-2 \[--fmri\]: subjects differ from run run-1: missing \['sub-03'\], "
        r"extra \[\]",
    ):
        build_store(BuildInputs(runs=(one, missing)), out, SETTINGS, progress=False)
    slow = [tmp_path / f"slow{s}.nii.gz" for s in range(3)]
    for s, path in enumerate(slow):
        _nifti(path, 42, seed=s, zoom=2.0)
    mixed = RunInputs("run-2", two.video, None, tuple(slow), SUBJECTS)
    with pytest.raises(
        StoreError, match=r"runs have different TRs: \{'run-1': 0.5, 'run-2': 2.0\}"
    ):
        build_store(
            BuildInputs(runs=(one, mixed)), out, BuildSettings(**{**SETTINGS.__dict__, "tr": None}),
            progress=False,
        )  # fmt: skip
    big = tmp_path / "big"
    big.mkdir()
    grid = []
    for s in range(3):
        grid.append(big / f"{s}.nii.gz")
        _nifti(grid[-1], 42, seed=s, grid=(5, 6, 8))
    other = RunInputs("run-2", two.video, None, tuple(grid), SUBJECTS)
    with pytest.raises(
        StoreError,
        match=r"run run-2 \[--fmri\]: fMRI grid differs from run run-1 \(expected \(5, 6, 7\), "
        r"got \(5, 6, 8\)\)",
    ):
        build_store(BuildInputs(runs=(one, other)), out, SETTINGS, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".bad.h5.tmp-*"))
