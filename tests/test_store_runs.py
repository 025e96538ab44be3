"""Runs in the store (schema 2's /runs): the table, one-run files of schema 1, and windows that
never reach across a run boundary. Unequal runs on purpose: 16 + 21 rows of a 37-TR store."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from giblet_ds.errors import StoreError
from giblet_ds.store import StoreDataset, open_store, schema, write_synthetic_store
from giblet_ds.store.runs import RunTable, write_run_table


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_store(tmp_path_factory.mktemp("runs") / "store.h5")


def _two_runs(base: Path, folder: Path, lengths: tuple[int, int] = (16, 21)) -> Path:
    """The synthetic store relabelled as two runs of ``lengths`` rows (per-run stats copied)."""
    path = folder / "two.h5"
    shutil.copy(base, path)
    with h5py.File(path, "r+") as handle:
        n_subjects = handle[schema.FMRI_SUBJECTS].shape[0]
        per_run = {name: handle[name][()] for name in (schema.RUNS_FMRI_MEAN, schema.RUNS_FMRI_STD)}
        del handle[schema.RUNS_GROUP]
        table = RunTable(
            ids=("task-a_run-1", "task-a_run-2"),
            stimuli=("a.mp4", "b.mp4"),
            first=np.array([0, lengths[0]], dtype=np.int64),
            n_trs=np.array(lengths, dtype=np.int64),
            subjects=np.ones((2, n_subjects), dtype=bool),
        )
        write_run_table(handle, table)
        for name, value in per_run.items():
            handle.create_dataset(name, data=np.concatenate([value, value]))
    return path


def test_a_new_store_has_a_one_run_table(base: Path) -> None:
    info = open_store(base)
    assert info.schema_version == 2
    assert info.runs.ids == ("run-1",)
    assert info.runs.first.tolist() == [0]
    assert info.runs.n_trs.tolist() == [37]
    assert info.runs.subjects.tolist() == [[True, True]]


def test_schema_1_file_reads_as_one_run(base: Path, tmp_path: Path) -> None:
    path = tmp_path / "v1.h5"
    shutil.copy(base, path)
    with h5py.File(path, "r+") as handle:
        del handle[schema.RUNS_GROUP]
        handle.attrs["schema_version"] = 1
    info = open_store(path)
    assert info.schema_version == 1
    assert info.runs.ids == ("run-1",)
    assert info.runs.n_trs.tolist() == [37]
    assert info.build_hash == open_store(base).build_hash


def test_schema_2_without_runs_is_named(base: Path, tmp_path: Path) -> None:
    path = tmp_path / "norun.h5"
    shutil.copy(base, path)
    with h5py.File(path, "r+") as handle:
        del handle[schema.RUNS_ID]
    with pytest.raises(StoreError, match=r"\[runs/id\]: required dataset is missing"):
        open_store(path)


def test_runs_must_cover_the_rows(base: Path, tmp_path: Path) -> None:
    path = _two_runs(base, tmp_path, lengths=(16, 20))
    with pytest.raises(
        StoreError,
        match=r"\[runs\]: inconsistent run table: runs must cover rows 0..36 in order: "
        r"first \[0, 16\], TR counts \[16, 20\]",
    ):
        open_store(path)


def test_windows_never_cross_a_run_boundary(base: Path, tmp_path: Path) -> None:
    info = open_store(_two_runs(base, tmp_path))
    assert info.runs.run_of(np.array([0, 15, 16, 36])).tolist() == [0, 0, 1, 1]
    train = StoreDataset(info.path, "train", info=info, context_trs=4)
    # the synthetic train split is rows 0..N, one contiguous stretch that spans both runs
    assert int(train.indices[0]) == 0 and int(train.indices[-1]) > 18
    item = int(np.flatnonzero(train.indices == 17)[0])
    sample = train[item]
    # TR 17 is the second row of run 2: rows 14..16 would be the window, 14 and 15 are run 1's
    assert sample["context_mask"].tolist() == [False, False, True, True]
    with h5py.File(info.path, "r") as handle:
        np.testing.assert_array_equal(
            sample["audio_codes"][2].numpy(), handle[schema.AUDIO_CODES][16].astype(np.int64)
        )
    # the last row of run 1 sees its own run only, never row 16
    last = train[int(np.flatnonzero(train.indices == 15)[0])]
    assert last["context_mask"].tolist() == [True, True, True, True]
    ahead = StoreDataset(info.path, "train", info=info, context_trs=4, context_end="volume")
    lead = ahead.lead
    assert lead == info.lag and lead >= 1
    window = ahead[int(np.flatnonzero(ahead.indices == 15)[0])]
    # with the window ending at the paired volume, rows after 15 would be run 2's: all padding
    assert window["context_mask"].tolist() == [True] * (3 - lead) + [False] * lead + [True]


def test_leave_one_run_out_needs_two_runs(base: Path) -> None:
    from giblet_ds.errors import GibletError
    from giblet_ds.evaluation.leave_one_run_out import leave_one_run_out

    with pytest.raises(GibletError, match=r"leave-one-run-out needs a store of 2 or more runs; "
                       r"it holds 1 \(build one with --bids or --runs\)"):  # fmt: skip
        leave_one_run_out(open_store(base))


def test_one_run_settings_hash_as_before_runs_existed() -> None:
    """The settings hash of a split by time without confounds is the one schema 1 builds wrote
    (pinned from the code before runs), so an existing one-run store is not rebuilt; the
    split-by-run keys and confounds enter the hash only when used."""
    from giblet_ds.store.builder.hashing import settings_sha256
    from giblet_ds.store.builder.settings import BuildSettings

    before = "6987d4d70a8317ffc70a909536b84509cc6e021d50060926db05b96c5d31224d"
    assert settings_sha256(BuildSettings(tr=0.5, lag=1).hashed()) == before
    by_run = BuildSettings(tr=0.5, lag=1, split_by="run").hashed()
    assert by_run["split_by"] == "run" and by_run["split_seed"] == 0
    assert "confounds" not in by_run
    cleaned = BuildSettings(tr=0.5, lag=1, confounds={"strategy": ["motion"]}).hashed()
    assert cleaned["confounds"] == {"strategy": ["motion"]} and "split_by" not in cleaned


def test_split_runs_with_an_empty_split_say_how_two_runs_are_split() -> None:
    from giblet_ds.errors import ConfigError
    from giblet_ds.store.builder.splits import make_run_splits

    runs = [("run-1", 40), ("run-2", 50)]
    with pytest.raises(ConfigError) as empty:  # a leave-one-run-out loop's fold on 2 runs
        make_run_splits(runs, (0.6, 0.2, 0.2), 2, split_by="run",
                        split_runs={"train": [], "val": ["run-1"], "test": ["run-2"]})  # fmt: skip
    assert str(empty.value) == (
        "split_runs: the train split holds no run (2 runs: ['run-1', 'run-2']); every split needs "
        "one. With 2 runs, train on one and name the other as both val and test (it is then cut "
        "in time into val | gap | test)"
    )
    splits, _, _ = make_run_splits(runs, (0.6, 0.2, 0.2), 2, split_by="run",
                                   split_runs={"train": ["run-1"], "val": ["run-2"],
                                               "test": ["run-2"]})  # fmt: skip
    assert splits["train"].tolist() == list(range(40))
    assert splits["val"].max() < splits["test"].min() - 2  # run-2 cut: val | gap | test
