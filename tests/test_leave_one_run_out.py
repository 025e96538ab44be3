"""Leave-one-run-out of trained models: one tiny model per held-out run of a 3-run store split by
run (runs of 19, 23 and 26 TRs: unequal, so a fold scored on another run's rows fails), each
trained by launch/train.py with data.split_runs and scored by tools/evaluate.py --folds on its
own held-out run beside a ridge fitted on its own training run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from giblet_ds.checkpoint.loading import load_model
from giblet_ds.errors import ConfigError
from giblet_ds.evaluation import predict_split
from giblet_ds.evaluation import ridge as ridge_module
from giblet_ds.run.manifest import METADATA_NAME
from giblet_ds.store import StoreDataset, mask_sha256, open_store, schema, write_synthetic_store
from giblet_ds.store.run_splits import with_split_runs
from giblet_ds.store.runs import RunTable, write_run_table
from tests.test_tools_common import load_tool
from tests.train_harness import run_training

RUNS = ("run-a", "run-b", "run-c")
LENGTHS = (19, 23, 26)


def _three_runs(path: Path) -> Path:
    """The synthetic store relabelled as 3 runs split by run (its own splits: a, b, c)."""
    write_synthetic_store(path, n_trs=sum(LENGTHS), n_voxels=23, seed=3)
    first = np.concatenate([[0], np.cumsum(LENGTHS)[:-1]]).astype(np.int64)
    with h5py.File(path, "r+") as handle:
        per_run = {n: handle[n][()] for n in (schema.RUNS_FMRI_MEAN, schema.RUNS_FMRI_STD)}
        n_subjects = handle[schema.FMRI_SUBJECTS].shape[0]
        del handle[schema.RUNS_GROUP]
        write_run_table(handle, RunTable(
            ids=RUNS, stimuli=("a.mp4", "b.mp4", "c.mp4"), first=first,
            n_trs=np.array(LENGTHS, dtype=np.int64), subjects=np.ones((3, n_subjects), bool),
        ))  # fmt: skip
        for name, value in per_run.items():
            handle.create_dataset(name, data=np.concatenate([value] * 3))
        for i, split in enumerate(("train", "val", "test")):
            del handle[schema.split_path(split)]
            rows = np.arange(first[i], first[i] + LENGTHS[i], dtype=np.int64)
            handle.create_dataset(schema.split_path(split), data=rows)
        handle.attrs["split_by"] = "run"
        handle.attrs["split_runs"] = json.dumps({"train": ["run-a"], "val": ["run-b"],
                                                 "test": ["run-c"]})  # fmt: skip
    return path


def _fold(test: str) -> dict[str, list[str]]:
    """Test run ``test``, validation the next run, training the last one."""
    i = RUNS.index(test)
    return {"train": [RUNS[(i + 2) % 3]], "val": [RUNS[(i + 1) % 3]], "test": [test]}


def _flow(split_runs: dict[str, list[str]]) -> str:
    return "{" + ", ".join(f"{k}: [{', '.join(v)}]" for k, v in split_runs.items()) + "}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    folder = tmp_path_factory.mktemp("loro")
    store = _three_runs(folder / "store.h5")
    runs = {}
    for test in RUNS:
        run_dir = folder / f"loro-{test}"
        done = run_training(
            run_dir, store, world=1,
            sets=("train.max_steps=3", "train.val_every_steps=3", f"data.split_runs={_flow(_fold(test))}"),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        runs[test] = run_dir
    return store, runs


def _r(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-voxel Pearson r, by numpy (0 where either series is constant)."""
    p = prediction - prediction.mean(0)
    t = target - target.mean(0)
    denom = np.sqrt((p**2).sum(0) * (t**2).sum(0))
    return np.where(denom > 0, (p * t).sum(0) / np.where(denom > 0, denom, 1), 0.0)


def _reliable(store: Path, rows: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Voxels whose mean pairwise inter-subject r on ``rows`` exceeds the threshold (2 subjects:
    the one pair)."""
    with h5py.File(store, "r") as handle:
        subjects = handle[schema.FMRI_SUBJECTS][:, rows.tolist()].astype(np.float64)
    return _r(subjects[0], subjects[1]) > threshold


def test_folds_score_each_model_on_its_own_held_out_run(
    trained: tuple[Path, dict[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, runs = trained
    info = open_store(store)
    fitted: list[np.ndarray] = []
    read_target = ridge_module.read_target

    def spy(info_, rows, subject):  # type: ignore[no-untyped-def]
        fitted.append(np.asarray(rows))
        return read_target(info_, rows, subject)

    monkeypatch.setattr(ridge_module, "read_target", spy)
    out = tmp_path / "eval"
    args = [*map(str, runs.values()), "--folds", "--store", str(store), "--out", str(out),
            "--device", "cpu", "--ridge-cache", str(tmp_path / "cache"), "--shifts", "5"]  # fmt: skip
    assert load_tool("evaluate").main(args) == 0
    data = json.loads((out / "evaluation.json").read_text())
    assert [f["test_run"] for f in data["folds"]] == list(RUNS)
    assert (out / "table.txt").is_file() and (out / "model_r.nii.gz").is_file()

    with h5py.File(store, "r") as handle:
        mean = handle[schema.FMRI_MEAN][()].astype(np.float32)
    model_pred, ridge_pred, targets = [], [], []
    for i, fold in enumerate(data["folds"]):
        test = fold["test_run"]
        split = _fold(test)
        assert fold["split_runs"] == split and fold["run_dir"] == str(runs[test])
        train_rows = info.runs.rows(RUNS.index(split["train"][0]))
        test_rows = info.runs.rows(i)
        # the ridge was fitted on exactly this fold's training run: the rows the network trained on
        view = with_split_runs(info, split)
        network_rows = StoreDataset(store, "train", info=view).indices
        np.testing.assert_array_equal(fitted[i], train_rows)
        np.testing.assert_array_equal(network_rows, train_rows)
        assert fold["ridge_fit_trs"] == len(train_rows) and fold["n_trs"] == len(test_rows)
        # the model's r, by hand from the fold's best checkpoint on its held-out run's rows
        model, cfg, _ = load_model(runs[test], device="cpu")
        assert cfg.data.split_runs == split
        prediction, target = predict_split(model, cfg, view, "test", device=torch.device("cpu"))
        np.testing.assert_array_equal(target, mean[test_rows])
        r = _r(prediction.astype(np.float64), target.astype(np.float64))
        reliable = _reliable(store, train_rows)
        assert fold["sets"]["all"]["model_r"] == pytest.approx(r.mean(), abs=1e-5)
        assert fold["sets"]["all"]["n_voxels"] == info.n_voxels
        assert fold["sets"]["reliable"]["n_voxels"] == int(reliable.sum())
        assert fold["sets"]["reliable"]["model_r"] == pytest.approx(r[reliable].mean(), abs=1e-5)
        ridge = ridge_module.fit_ridge_baseline(view, cache_dir=tmp_path / "cache").predictions
        assert fold["sets"]["all"]["ridge_r"] == pytest.approx(
            _r(ridge["test"].astype(np.float64), target.astype(np.float64)).mean(), abs=1e-5
        )
        model_pred.append(prediction)
        ridge_pred.append(ridge["test"])
        targets.append(target)

    pooled = data["pooled"]
    for kind in ("model_r", "ridge_r"):
        for name in ("all", "reliable"):
            assert pooled["mean_over_folds"][name][kind] == pytest.approx(
                np.mean([f["sets"][name][kind] for f in data["folds"]])
            )
    target = np.concatenate(targets).astype(np.float64)
    concat = pooled["concatenated"]
    assert concat["all"]["n_trs"] == sum(LENGTHS)
    model_r = _r(np.concatenate(model_pred).astype(np.float64), target)
    assert concat["all"]["model_r"] == pytest.approx(model_r.mean(), abs=1e-5)
    ridge_r = _r(np.concatenate(ridge_pred).astype(np.float64), target)
    assert concat["all"]["ridge_r"] == pytest.approx(ridge_r.mean(), abs=1e-5)
    every = np.logical_and.reduce([_reliable(store, info.runs.rows((i + 2) % 3)) for i in range(3)])
    assert concat["reliable"]["n_voxels"] == int(every.sum())
    assert concat["reliable"]["model_r"] == pytest.approx(model_r[every].mean(), abs=1e-5)


def _copy_with(run_dir: Path, to: Path, *, config: dict | None = None,
               metadata: dict | None = None) -> Path:  # type: ignore[type-arg]  # fmt: skip
    """A copy of a fold's run dir whose best tag says another config or metadata."""
    shutil.copytree(run_dir, to)
    tag = to / "checkpoints" / "best"
    for name, change in (("run_config.yaml", config), (METADATA_NAME, metadata)):
        if change:
            path = tag / name
            body = yaml.safe_load(path.read_text()) if name.endswith("yaml") else json.loads(
                path.read_text())  # fmt: skip
            for key, value in change.items():
                node = body
                *parents, leaf = key.split(".")
                for part in parents:
                    node = node[part]
                node[leaf] = value
            text = yaml.safe_dump(body) if name.endswith("yaml") else json.dumps(body)
            path.write_text(text)
    return to


def test_folds_are_refused_by_name_and_nothing_is_written(
    trained: tuple[Path, dict[str, Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, runs = trained
    tool = load_tool("evaluate")
    out = tmp_path / "eval"

    def refused(*dirs: Path) -> str:
        args = [*map(str, dirs), "--folds", "--store", str(store), "--out", str(out)]
        assert tool.main(args) == 2
        assert not out.exists()
        return capsys.readouterr().err

    a, b, c = (runs[r] for r in RUNS)
    err = refused(a, b, b)
    assert f"run run-b is held out by 2 folds ({b}, {b}): give one fold per held-out run" in err
    err = refused(a, b)
    assert "no fold holds out run(s) ['run-c']: the folds must cover the store's runs " in err
    plain = _copy_with(c, tmp_path / "plain", config={"data.split_runs": None})
    err = refused(a, b, plain)
    assert f"{plain}: trained on the store's own splits (data.split_runs is null)" in err
    smoothed = _copy_with(c, tmp_path / "smoothed", config={"data.smoothing_fwhm_mm": 6.0})
    err = refused(a, b, smoothed)
    assert (
        f"{smoothed}: trained on targets smoothed at data.smoothing_fwhm_mm=6.0, {a} at 0.0: "
        "pooled folds (and their ridges) must fit the same targets" in err
    )

    other = write_synthetic_store(tmp_path / "other.h5", n_trs=68, n_voxels=23, seed=9)
    moved = _copy_with(c, tmp_path / "moved", config={"data.store": str(other)}, metadata={
        "store_hash": open_store(other).build_hash, "mask_hash": mask_sha256(other)})  # fmt: skip
    err = refused(a, b, moved)
    assert f"{moved}: {moved}/checkpoints/best was trained on store" in err
    assert "whose brain mask differs from that of" in err
    same_mask = _copy_with(c, tmp_path / "same_mask", metadata={"store_hash": "f" * 64})
    err = refused(a, b, same_mask)
    assert f"{same_mask}: trained on store ffffffffffff" in err
    assert "every fold must be trained on the store it is scored on" in err
    assert "refused (1 problem)" in err


def test_split_runs_needs_a_store_split_by_run(tmp_path: Path) -> None:
    info = open_store(write_synthetic_store(tmp_path / "time.h5"))
    with pytest.raises(ConfigError, match=r"data.split_runs needs a store built with split_by: "
                       r"run; .* is split by time"):  # fmt: skip
        with_split_runs(info, {"train": ["run-1"], "val": ["run-1"], "test": ["run-1"]})
    runs = open_store(_three_runs(tmp_path / "three.h5"))
    with pytest.raises(ConfigError, match=r"data.split_runs leaves run\(s\) \['run-c'\] in no "
                       r"split; name every run"):  # fmt: skip
        with_split_runs(runs, {"train": ["run-a"], "val": ["run-b"], "test": []})
    fold = with_split_runs(runs, _fold("run-a"))
    assert fold.split_override == _fold("run-a")
    assert fold.splits["test"].tolist() == list(range(19))


def test_a_folds_reconstructions_read_its_own_held_out_run(
    trained: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    """tools/plot_reconstructions.py (and export) see the store through the fold's data.split_runs:
    fold run-a's test split is run-a's 19 TRs, not the build's test run (run-c, 26 TRs)."""
    from giblet_ds.report.reconstructions import render_reconstructions

    store, runs = trained
    result = render_reconstructions(
        runs["run-a"] / "checkpoints" / "best", store, tmp_path / "plots", split="test",
        num_samples=2, device="cpu", verify=False,
    )  # fmt: skip
    assert (result.metrics["split"], result.metrics["n_trs"]) == ("test", LENGTHS[0])


def test_a_folds_health_report_shows_the_splits_it_trained_with(
    trained: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    store, runs = trained
    health = load_tool("health_report")
    out = tmp_path / "health.md"
    health.main([str(runs["run-a"]), "--out", str(out), "--no-audit"])
    text = out.read_text()
    # fold run-a: train run-c (26 TRs), val run-b (23), test run-a (19); the build's were 19/23/26
    assert "; splits train 26, val 23, test 19;" in text


def test_ridge_only_leave_one_run_out_fits_smoothed_rows_and_scores_raw(tmp_path: Path) -> None:
    """tools/evaluate.py --leave-one-run-out on a smoothed run: each run's ridge fits the other
    runs' smoothed targets (as the run's network did) and is scored on the held-out run unsmoothed."""
    from giblet_ds.evaluation.leave_one_run_out import leave_one_run_out
    from giblet_ds.evaluation.ridge import read_target, ridge_estimator
    from giblet_ds.evaluation.ridge_inputs import ridge_design
    from giblet_ds.store import load_mask
    from giblet_ds.store.smoothing import MaskedGaussianSmoothing, voxel_sizes_mm

    info = open_store(_three_runs(tmp_path / "store.h5"))
    mask, affine = load_mask(info.path)
    smoothing = MaskedGaussianSmoothing(mask, voxel_sizes_mm(affine), 8.0)
    data = leave_one_run_out(info, smoothing=smoothing)
    assert data["target_smoothing_fwhm_mm"] == 8.0
    design, _ = ridge_design(info)
    target = read_target(info, np.arange(info.n_trs), None)
    held = info.runs.rows(1)
    fit = np.setdiff1d(np.arange(info.n_trs), held)
    ridge = ridge_estimator()
    with torch.no_grad():
        ridge.fit(design[fit], smoothing(torch.from_numpy(target)).numpy()[fit])
    predicted = np.asarray(ridge.predict(design[held]), np.float32)
    np.testing.assert_allclose(
        data["runs"]["run-b"]["ridge_r"], _r(predicted, target[held]), atol=1e-5
    )
    plain = leave_one_run_out(info)
    assert plain["target_smoothing_fwhm_mm"] == 0.0
    assert plain["runs"]["run-b"]["ridge_r_mean"] != pytest.approx(
        data["runs"]["run-b"]["ridge_r_mean"], abs=1e-4
    )
