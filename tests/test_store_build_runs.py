"""A store of two runs of unequal length x 3 subjects built from raw files: the /runs table,
fMRI z-scored per subject and run on that run's training TRs, splits by time and by run, and
inputs that differ between runs named in the error with no store written.

Sizes: run-1 is a 24 s movie, run-2 a 20 s one (TR 0.5 s, lag 1); subjects have 50/51/53 and
42/43/44 volumes on a 5 x 6 x 7 grid, so run-1 holds 48 TRs and run-2 40.
"""

from __future__ import annotations

import re
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
def bids_root(runs: tuple[RunInputs, ...], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _bids(runs, tmp_path_factory.mktemp("bids") / "ds")


@pytest.fixture(scope="module")
def built(bids_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2-run store, built from the BIDS layout by tools/build_store.py --bids (no tr: the
    sidecar's RepetitionTime, 0.5 s, as the NIfTI headers say)."""
    folder = tmp_path_factory.mktemp("store-runs")
    (folder / "build.yaml").write_text(BIDS_CONFIG)  # the TR from the BIDS sidecar
    out = folder / "runs.h5"
    assert _cli().main([*_bids_argv(bids_root, folder), "--out", str(out)]) == 0
    return out


def _bids_argv(root: Path, folder: Path) -> list[str]:
    return ["--bids", str(root), "--task", "movie", "--config", str(folder / "build.yaml"),
            "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def by_run(runs: tuple[RunInputs, ...], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same runs split by run: run-1 trains, run-2 is cut into val | gap | test."""
    settings = BuildSettings.from_mapping(
        {
            **SETTINGS.__dict__,
            "split_by": "run",
            "split_runs": {"train": ["run-1"], "val": ["run-2"], "test": ["run-2"]},
        }
    )
    out = tmp_path_factory.mktemp("by-run") / "by-run.h5"
    build_store(BuildInputs(runs=runs), out, settings, progress=False)
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
    assert (info.tr, info.tr_source) == (0.5, "bids_sidecar")
    assert info.sidecar_trs == {run: dict.fromkeys(SUBJECTS, 0.5) for run in RUNS}
    assert info.header_trs == {run: dict.fromkeys(SUBJECTS, 0.5) for run in RUNS}
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


def test_split_by_run_named(by_run: Path) -> None:
    out = by_run
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


def _cli():  # type: ignore[no-untyped-def]
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_store_cli", Path(__file__).resolve().parents[1] / "tools" / "build_store.py"
    )
    assert spec is not None and spec.loader is not None
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


CONFIG = (
    "tr: 0.5\nlag: 1\nframe_height: 9\nframe_width: 16\nencodec_bandwidth: 1.5\n"
    "clip_model: ViT-S-32-alt\nannotations_per_tr: 2\nsplit_fractions: [0.5, 0.25, 0.25]\n"
    "split_gap: 11\naudio_segment_s: 5.0\npretrained: false\n"
)
BIDS_CONFIG = CONFIG.replace("tr: 0.5\n", "")


def _bids(runs: tuple[RunInputs, ...], root: Path, tr: float | None = 0.5) -> Path:
    from giblet_ds.demo_data.bids import BidsRun, write_bids_dataset

    bids_runs = [
        BidsRun(
            stimulus=run.video,
            sheet=run.annotations,
            bold={sid.removeprefix("sub-"): p for sid, p in zip(SUBJECTS, run.fmri, strict=True)},
            seconds=seconds,
        )
        for run, (seconds, _) in zip(runs, RUNS.values(), strict=True)
    ]
    return write_bids_dataset(root, "movie", bids_runs, repetition_time=tr)


def test_bids_layout_finds_the_runs_listed_by_hand(
    runs: tuple[RunInputs, ...], bids_root: Path, built: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from giblet_ds.store.builder.bids_layout import find_bids_runs

    found = find_bids_runs(bids_root, "movie")
    assert [r.run_id for r in found] == ["run-1", "run-2"]
    assert [r.stimulus for r in found] == ["run-1.m4v", "run-2.m4v"]
    assert found[0].annotations == bids_root / "stimuli" / "run-1.csv"
    assert found[1].annotations is None
    assert found[0].subjects == SUBJECTS
    assert [r.sidecar_trs for r in found] == [(0.5, 0.5, 0.5)] * 2  # task-movie_bold.json
    func = bids_root / "sub-02" / "func"
    assert found[1].fmri[1] == func / "sub-02_task-movie_run-2_bold.nii.gz"
    for mine, theirs in zip(found, runs, strict=True):  # the very bytes of the hand-listed files
        for a, b in zip(mine.fmri, theirs.fmri, strict=True):
            assert a.read_bytes() == b.read_bytes()
    # the same command again: up to date
    capsys.readouterr()
    assert _cli().main([*_bids_argv(bids_root, built.parent), "--out", str(built)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_malformed_bids_layouts_are_named(
    runs: tuple[RunInputs, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from giblet_ds.store.builder.bids_layout import find_bids_runs

    root = _bids(runs, tmp_path / "bids")
    # a subject missing a run
    gone = root / "sub-03" / "func" / "sub-03_task-movie_run-2_bold.nii.gz"
    gone.rename(tmp_path / "kept.nii.gz")
    with pytest.raises(StoreError, match=r"run run-2: no BOLD file for sub-03 \(task movie\)"):
        find_bids_runs(root, "movie")
    config = tmp_path / "build.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "bad.h5"
    argv = ["--bids", str(root), "--task", "movie", "--config", str(config), "--out", str(out)]
    assert _cli().main([*argv, "--quiet"]) == 2
    assert "run run-2: no BOLD file for sub-03" in capsys.readouterr().err
    (tmp_path / "kept.nii.gz").rename(gone)
    # one subject's events of a run name another stimulus
    events = root / "sub-02" / "func" / "sub-02_task-movie_run-2_events.tsv"
    original = events.read_text()
    events.write_text(original.replace("run-2.m4v", "run-1.m4v"))
    with pytest.raises(StoreError) as other:
        find_bids_runs(root, "movie")
    assert str(other.value) == (
        f"{root} [--bids]: run run-2: the events name 2 stimuli, one is needed (expected one "
        "stim_file named in every subject's events of the run, got {'run-1.m4v': ['sub-02'], "
        "'run-2.m4v': ['sub-01', 'sub-03']})"
    )
    events.write_text(original)
    # a stimulus that is not there
    (root / "stimuli" / "run-2.m4v").unlink()
    with pytest.raises(
        StoreError, match=r"run-2.m4v \[--bids\]: run run-2: the stimulus its events name is not"
    ):
        find_bids_runs(root, "movie")
    # fMRIPrep derivatives in two spaces
    deriv = root / "derivatives" / "fmriprep"
    deriv.mkdir(parents=True)
    (deriv / "dataset_description.json").write_text(
        '{"Name": "fMRIPrep", "BIDSVersion": "1.9.0", "DatasetType": "derivative", '
        '"GeneratedBy": [{"Name": "fMRIPrep"}]}'
    )
    for space in ("MNI152NLin2009cAsym", "T1w"):
        func = deriv / "sub-01" / "func"
        func.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(
            runs[0].fmri[0],
            func / f"sub-01_task-movie_run-1_space-{space}_desc-preproc_bold.nii.gz",
        )
    with pytest.raises(
        StoreError,
        match=r"task movie: BOLD in 2 spaces \['MNI152NLin2009cAsym', 'T1w'\]; choose one with "
        r"--space",
    ):
        find_bids_runs(root, "movie", derivatives="fmriprep")
    assert not out.exists()


def test_bids_sidecar_tr_that_disagrees_is_named(
    runs: tuple[RunInputs, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --tr the sidecars' RepetitionTime decides; a sidecar that differs from another
    run's, or from its own NIfTI header beyond rounding, stops the build (exit 2) naming the
    file and the fix, and no store (nor temporary file) is written."""
    from giblet_ds.store.builder.bids_layout import find_bids_runs
    from giblet_ds.store.builder.run_stages import probe_run, resolve_run_tr

    root = _bids(runs, tmp_path / "bids")
    config = tmp_path / "build.yaml"
    config.write_text(BIDS_CONFIG)
    out = tmp_path / "bad.h5"
    argv = ["--bids", str(root), "--task", "movie", "--config", str(config), "--out", str(out),
            "--quiet"]  # fmt: skip

    def refused(*extra: str) -> str:
        capsys.readouterr()
        assert _cli().main([*argv, *extra]) == 2
        assert not out.exists() and not list(tmp_path.glob(".bad.h5.tmp-*"))
        return capsys.readouterr().err

    # one file's own sidecar overrides the inherited one (BIDS inheritance) with another TR
    func = root / "sub-02" / "func"
    own = func / "sub-02_task-movie_run-2_bold.json"
    own.write_text('{"RepetitionTime": 2.0}')
    expected = (
        f"{func / 'sub-02_task-movie_run-2_bold.nii.gz'} [--bids]: run run-2: its BIDS sidecar "
        "says RepetitionTime 2 s, the sidecar of sub-01_task-movie_run-1_bold.nii.gz (run run-1) "
        "0.5 s; one store holds one TR: build the runs of each TR into a store of their own "
        "(--runs runs.yaml lists them), or correct the RepetitionTime of the sidecar that is wrong"
    )
    assert expected in refused()
    assert expected in refused("--tr", "0.5")  # no one TR is right for both acquisitions
    own.unlink()
    # every sidecar says 1 s, every header 0.5 s
    (root / "task-movie_bold.json").write_text('{"RepetitionTime": 1.0, "TaskName": "movie"}')
    first = root / "sub-01" / "func" / "sub-01_task-movie_run-1_bold.nii.gz"
    assert (
        f"{first} [--bids]: run run-1: the NIfTI header says TR 0.5 s, the BIDS sidecars "
        "RepetitionTime 1 s. Correct the one that is wrong (the sidecar's RepetitionTime, or the "
        "header's pixdim[4] and time unit), or decide with --tr: --tr 1 if the sidecar is right"
    ) in refused()
    # --tr decides (explicit > sidecar > header): the sidecar and the headers are noted
    found = find_bids_runs(root, "movie")
    infos = [probe_run(run) for run in found]
    tr, source, notes = resolve_run_tr(0.5, found, infos)
    assert (tr, source) == (0.5, "given")
    assert notes == ["the BIDS sidecars say RepetitionTime 1 s; using the given tr 0.5 s"]
    # a sidecar within header rounding (1%) is used as it is
    (root / "task-movie_bold.json").write_text('{"RepetitionTime": 0.502}')
    found = find_bids_runs(root, "movie")
    assert resolve_run_tr(None, found, infos) == (0.502, "bids_sidecar", [])
    # no sidecar states a TR: the headers decide, as outside BIDS (0.5 s is not the default)
    (root / "task-movie_bold.json").unlink()
    found = find_bids_runs(root, "movie")
    assert [r.sidecar_trs for r in found] == [(None, None, None)] * 2
    with pytest.raises(StoreError, match=r"every NIfTI header says TR 0.5 s"):
        resolve_run_tr(None, found, infos)
    # a RepetitionTime that is no number of seconds
    own.write_text('{"RepetitionTime": "fast"}')
    with pytest.raises(
        StoreError,
        match=r"sub-02_task-movie_run-2_bold.nii.gz \[--bids\]: its BIDS sidecar's "
        r"RepetitionTime is 'fast', not a positive number of seconds",
    ):
        find_bids_runs(root, "movie")


def test_runs_yaml_run_missing_a_subject_is_named(
    runs: tuple[RunInputs, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--runs: a run that lacks a subject the first run has is named with the subject; exit 2,
    no store."""
    one, two = runs
    listed = tmp_path / "runs.yaml"
    fmri = [", ".join(f"{s}: {p}" for s, p in zip(SUBJECTS[:n], run.fmri, strict=False))
            for run, n in ((one, 3), (two, 2))]  # fmt: skip
    listed.write_text(
        f"runs:\n  - id: run-1\n    video: {one.video}\n    fmri: {{{fmri[0]}}}\n"
        f"  - id: run-2\n    video: {two.video}\n    fmri: {{{fmri[1]}}}\n"
    )
    config = tmp_path / "build.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "bad.h5"
    argv = ["--runs", str(listed), "--config", str(config), "--out", str(out), "--quiet"]
    assert _cli().main(argv) == 2
    assert (
        "error: run run-2 [--fmri]: subjects differ from run run-1: missing ['sub-03'], extra [] "
        "(expected ['sub-01', 'sub-02', 'sub-03'], got ['sub-01', 'sub-02'])"
    ) in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".bad.h5.tmp-*"))


def test_a_store_that_fails_validation_is_never_published(
    runs: tuple[RunInputs, ...], built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The written file is validated before it is renamed into place: a store open_store
    refuses (here: a NaN planted in its training statistics) leaves an earlier store at the
    path byte for byte, and its temporary file is removed."""
    from giblet_ds.store.builder import writer

    out = tmp_path / "runs.h5"
    shutil.copyfile(built, out)  # a good store of other inputs: the build replaces it
    before = out.read_bytes()
    real = writer.compute_target_stats

    def poisoned(handle: h5py.File, train: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        stats = real(handle, train)
        stats["fmri"]["mean"][3] = np.nan
        return stats

    monkeypatch.setattr(writer, "compute_target_stats", poisoned)
    with pytest.raises(
        StoreError,
        match=rf"{re.escape(str(out))}: the written store failed validation and was not published "
        rf"\(.*\.runs\.h5\.tmp-\d+ \[stats/fmri/mean\]: .*\); its temporary file removed",
    ):
        build_store(BuildInputs(runs=runs), out, SETTINGS, progress=False)
    assert out.read_bytes() == before
    assert not list(tmp_path.glob(".runs.h5.tmp-*"))
    fresh = tmp_path / "fresh.h5"  # no store before: none after
    with pytest.raises(StoreError, match="failed validation and was not published"):
        build_store(BuildInputs(runs=runs), fresh, SETTINGS, progress=False)
    assert not fresh.exists() and not list(tmp_path.glob(".fresh.h5.tmp-*"))


def test_runs_yaml(runs: tuple[RunInputs, ...], tmp_path: Path) -> None:
    from giblet_ds.store.builder.run_list import read_runs_yaml

    listed = tmp_path / "runs.yaml"
    one = runs[0]
    listed.write_text(
        "runs:\n  - id: first\n"
        f"    video: {one.video}\n    annotations: {one.annotations}\n"
        "    fmri: {"
        + ", ".join(f"{s}: {p}" for s, p in zip(SUBJECTS, one.fmri, strict=True))
        + "}\n  - id: second\n    video: other.m4v\n    fmri: {sub-01: a.nii.gz}\n"
    )
    read = read_runs_yaml(listed)
    assert [r.run_id for r in read] == ["first", "second"]
    assert read[0].fmri == one.fmri and read[0].subjects == SUBJECTS
    assert read[1].video == tmp_path / "other.m4v" and read[1].annotations is None
    listed.write_text("runs:\n  - id: x\n    video: a.m4v\n    fmri: {s: b}\n    movie: c\n")
    with pytest.raises(
        StoreError,
        match=r"runs\[0\]: unknown key\(s\) \['movie'\]; valid keys: \['id', 'video', "
        r"'annotations', 'fmri'\]",
    ):
        read_runs_yaml(listed)


def test_trains_resumes_and_evaluates_on_run_splits(
    by_run: Path, runs: tuple[RunInputs, ...], tmp_path: Path
) -> None:
    """The tiny preset on the split-by-run store, one rank: 2 steps, resumed to 4, evaluated on
    the held-out run's test rows by tools/evaluate.py (and leave-one-run-out), reconstructions
    plotted, the model exported and run on run-2's movie."""
    import json

    from tests.test_tools_common import load_tool
    from tests.train_harness import run_training

    run = tmp_path / "run"
    first = run_training(run, by_run, world=1, sets=("train.max_steps=2",))
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_training(run, by_run, world=1, sets=("train.max_steps=4",))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resum" in (again.stdout + again.stderr).lower()
    out = tmp_path / "eval"
    args = [str(run), "--store", str(by_run), "--out", str(out), "--device", "cpu",
            "--ridge-cache", str(tmp_path / "cache"), "--shifts", "5", "--leave-one-run-out"]  # fmt: skip
    assert load_tool("evaluate").main(args) == 0
    data = json.loads((out / "evaluation.json").read_text())
    assert data["split"] == "test" and data["n_trs"] == 15  # rows 73..87 of run-2
    loro = json.loads((out / "leave_one_run_out.json").read_text())
    assert {k: (v["n_trs"], v["fit_trs"]) for k, v in loro["runs"].items()} == {
        "run-1": (48, 40),
        "run-2": (40, 48),
    }
    for row in loro["runs"].values():
        assert len(row["ridge_r"]) == open_store(by_run).n_voxels
        assert row["ridge_r_mean"] == pytest.approx(np.mean(row["ridge_r"]), abs=1e-5)
    assert loro["ridge_r_mean"] == pytest.approx(
        (loro["runs"]["run-1"]["ridge_r_mean"] + loro["runs"]["run-2"]["ridge_r_mean"]) / 2
    )
    plots = tmp_path / "plots"
    assert load_tool("plot_reconstructions").main(
        ["--checkpoint", str(run), "--store", str(by_run), "--out", str(plots),
         "--num-samples", "1", "--device", "cpu"]
    ) == 0  # fmt: skip
    assert len(list(plots.glob("*.png"))) == 6
    model_dir = tmp_path / "model"
    export = [str(run), "--out", str(model_dir)]
    assert load_tool("export_model").main(export) == 2  # random weights: the training movie
    # the codebooks of a random-weight store come from its first run's movie
    assert load_tool("export_model").main([*export, "--training-video", str(runs[0].video)]) == 0
    predicted = tmp_path / "pred.nii.gz"
    assert load_tool("predict").main(
        [str(model_dir), "--video", str(runs[1].video), "--out", str(predicted)]
    ) == 0  # fmt: skip
    import nibabel as nib

    assert nib.load(str(predicted)).shape == (*GRID, 40)  # run-2's movie: 20 s = 40 TRs


def test_fmriprep_confounds_are_regressed_out_per_run_before_zscoring(
    runs: tuple[RunInputs, ...], tmp_path: Path
) -> None:
    """fMRIPrep derivatives whose BOLD carries 40 x trans_x in every voxel: with motion
    (basic) + high_pass regressed out (split by run: fitted on all of each run's rows), the
    stored z-scores are those of the least-squares residual computed here by hand; with a split
    by time the 10 training rows of run-2 cannot fit 7 regressors, and the run is named."""
    import nibabel as nib

    from giblet_ds.store.builder.bids_layout import find_bids_runs

    root = _bids(runs, tmp_path / "ds")
    deriv = root / "derivatives" / "fmriprep"
    deriv.mkdir(parents=True)
    (deriv / "dataset_description.json").write_text(
        '{"Name": "fMRIPrep", "BIDSVersion": "1.9.0", "DatasetType": "derivative", '
        '"GeneratedBy": [{"Name": "fMRIPrep"}]}'
    )
    rng = np.random.default_rng(7)
    columns = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "cosine00"]
    for r, run in enumerate(runs):
        for s, path in enumerate(run.fmri):
            img = nib.load(str(path))
            data = np.asarray(img.dataobj, dtype=np.float32)
            n = data.shape[3]
            table = rng.normal(size=(n, len(columns)))
            table[:, -1] = np.cos(np.pi * (np.arange(n) + 0.5) / n)
            data[1:] += 40.0 * table[:, 0].astype(np.float32)  # motion in every brain voxel
            func = deriv / SUBJECTS[s] / "func"
            func.mkdir(parents=True, exist_ok=True)
            stem = f"{SUBJECTS[s]}_task-movie_run-{r + 1}"
            out_img = nib.Nifti1Image(data, img.affine, img.header)
            nib.save(
                out_img, str(func / f"{stem}_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz")
            )
            lines = ["\t".join(columns)] + ["\t".join(f"{v:.6f}" for v in row) for row in table]
            (func / f"{stem}_desc-confounds_timeseries.tsv").write_text("\n".join(lines) + "\n")
    config = tmp_path / "build.yaml"
    config.write_text(CONFIG + "confounds: {strategy: [motion, high_pass], motion: basic}\n")
    out = tmp_path / "confounds.h5"
    argv = ["--bids", str(root), "--task", "movie", "--derivatives", "fmriprep",
            "--config", str(config), "--out", str(out), "--quiet"]  # fmt: skip
    with pytest.raises(
        StoreError,
        match=r"run run-1 \[confounds\]: 7 confound regressors \(and an intercept\) need "
        r"at least 32 fitting rows, the run z-scores on 14",
    ):
        build_store(
            BuildInputs(runs=find_bids_runs(root, "movie", derivatives="fmriprep")), out,
            BuildSettings(**{**SETTINGS.__dict__, "confounds": {
                "strategy": ["motion", "high_pass"], "motion": "basic"}}), progress=False,
        )  # fmt: skip
    assert not out.exists()
    split = "split_by: run\nsplit_runs: {train: [run-1], val: [run-2], test: [run-2]}\n"
    config.write_text(config.read_text() + split)
    assert _cli().main(argv) == 0
    info = open_store(out)
    assert info.attrs["settings"]["confounds"] == {
        "motion": "basic",
        "strategy": ["motion", "high_pass"],
    }
    assert any(key.endswith("confounds:sub-02") for key in info.attrs["input_hashes"])
    found = {r.run_id: r for r in find_bids_runs(root, "movie", derivatives="fmriprep")}
    with h5py.File(out) as handle:
        mask = handle["mask"][()]
        stored = handle["fmri/subjects"][()].astype(np.float64)
    for r, run_id in enumerate(info.runs.ids):
        first, n = int(info.runs.first[r]), int(info.runs.n_trs[r])
        train = np.arange(n)  # split by run: every row of a run is z-scored and fitted on
        for s, path in enumerate(found[run_id].fmri):
            data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
            series = data[mask][:, 1 : 1 + n].T
            table = np.loadtxt(found[run_id].confounds[s], skiprows=1)[1 : 1 + n]
            table = table - table.mean(0)  # nilearn demeans the confounds
            design = np.column_stack([table, np.ones(n)])
            beta = np.linalg.lstsq(design[train], series[train], rcond=None)[0]
            clean = series - design[:, :-1] @ beta[:-1]
            mu, sd = clean[train].mean(0), clean[train].std(0)
            np.testing.assert_allclose(
                stored[s, first : first + n], (clean - mu) / sd, atol=6e-3, rtol=3e-3
            )
