"""The synthetic store, read back through open_store, StoreDataset and load_target_stats."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from giblet_ds.errors import StoreError
from giblet_ds.store import (
    SCHEMA_VERSION,
    StoreDataset,
    load_target_stats,
    open_store,
    write_synthetic_store,
)
from tests.tiny_sizes import TINY_SIZES


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_store(tmp_path_factory.mktemp("syn") / "store.h5")


def test_sizes_and_splits(store: Path) -> None:
    info = open_store(store)
    assert info.schema_version == SCHEMA_VERSION
    assert (info.n_trs, info.n_voxels, info.n_frames, info.height, info.width) == (37, 23, 2, 6, 10)
    assert (info.n_q, info.code_frames, info.text_slots, info.text_dim) == (2, 5, 2, 7)
    assert info.subjects == ("sub-01", "sub-02")
    assert info.mask_shape == (2, 3, 4)
    assert (info.tr, info.lag, info.split_gap) == (1.5, 3, 2)
    assert info.split_sizes == {"train": 23, "val": 5, "test": 5}
    np.testing.assert_array_equal(info.splits["val"], np.arange(25, 30))
    np.testing.assert_array_equal(info.splits["test"], np.arange(32, 37))


def test_the_layout_table_is_what_the_file_holds(store: Path) -> None:
    info = open_store(store)  # a StoreInfo is the store's StoreLayout: one table, written and read
    expected = {**info.shapes(), **info.stats_shapes()}
    assert expected["stats/video/mean"] == (6 * 10 * 3,)
    assert expected["fmri/subjects"] == (2, 37, 23)
    with h5py.File(store, "r") as handle:
        assert {name: tuple(handle[name].shape) for name in expected} == expected
    assert info.model_input_sizes() == TINY_SIZES
    assert info.pretrained == {"encodec": False, "clip": False}
    assert len(info.build_hash) == 64 and info.build_hash != info.settings_hash


def test_other_sizes(tmp_path: Path) -> None:
    path = write_synthetic_store(
        tmp_path / "s.h5", n_trs=41, n_voxels=17, n_frames=3, n_q=4, text_slots=3, n_subjects=3
    )
    info = open_store(path)
    assert (info.n_trs, info.n_voxels, info.n_frames, info.n_q, info.text_slots) == (
        41,
        17,
        3,
        4,
        3,
    )
    assert info.n_subjects == 3
    assert sum(info.split_sizes.values()) == 41 - 2 * 2


def test_sample_dict(store: Path) -> None:
    ds = StoreDataset(store, "val")
    assert len(ds) == 5
    sample = ds[1]
    expected = {
        "video": (torch.float32, (2, 6, 10, 3)),
        "audio_codes": (torch.int64, (2, 5)),
        "text": (torch.float32, (2, 7)),
        "text_mask": (torch.bool, (2,)),
        "fmri": (torch.float32, (23,)),
        "index": (torch.int64, ()),
    }
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sample.items()} == expected
    assert int(sample["index"]) == 26
    with h5py.File(store) as handle:
        np.testing.assert_array_equal(sample["video"].numpy() * 255, handle["video"][26])
        np.testing.assert_array_equal(sample["audio_codes"].numpy(), handle["audio_codes"][26])
        subjects = handle["fmri/subjects"][:, 26].astype(np.float32)
    assert float(sample["video"].min()) >= 0.0 and float(sample["video"].max()) <= 1.0
    # The mean over z-scored subjects, stored as float16.
    np.testing.assert_allclose(sample["fmri"].numpy(), subjects.mean(0), atol=2e-3)
    # Masked text slots are exactly zero.
    assert not sample["text"][~sample["text_mask"]].any()
    one = StoreDataset(store, "val", subject="sub-02")[1]
    np.testing.assert_array_equal(one["fmri"].numpy(), subjects[1])
    with pytest.raises(IndexError):
        ds[5]


def test_unknown_subject_and_split(store: Path) -> None:
    with pytest.raises(StoreError, match=r"unknown subject \(expected one of"):
        StoreDataset(store, "train", subject="sub-09")
    with pytest.raises(ValueError, match="split must be one of"):
        StoreDataset(store, "validation")


def test_zscore_uses_train_trs_only(store: Path) -> None:
    info = open_store(store)
    with h5py.File(store) as handle:
        subject = handle["fmri/subjects"][0].astype(np.float64)
    train = subject[info.splits["train"]]
    np.testing.assert_allclose(train.mean(0), 0.0, atol=2e-3)
    np.testing.assert_allclose(train.std(0), 1.0, atol=2e-3)
    # Validation TRs were not part of the statistics, so their mean is not forced to zero.
    assert np.abs(subject[info.splits["val"]].mean(0)).max() > 0.05


def test_target_stats_match_training_data(store: Path) -> None:
    info = open_store(store)
    stats = load_target_stats(store)
    train = info.splits["train"]
    with h5py.File(store) as handle:
        last = handle["video"][train, -1].reshape(len(train), -1) / 255.0
        fmri = handle["fmri/mean"][train].astype(np.float64)
        text = handle["text"][train].reshape(len(train), -1)
        codes = handle["audio_codes"][train]
    np.testing.assert_allclose(stats["video"]["mean"], last.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["video"]["var"], last.var(0), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(stats["fmri"]["var"], fmri.var(0), rtol=1e-4)
    np.testing.assert_allclose(stats["text"]["mean"], text.mean(0), rtol=1e-4, atol=1e-6)
    assert stats["audio"]["counts"].shape == (2, 1024)
    assert stats["audio"]["counts"].sum(axis=1).tolist() == [23 * 5, 23 * 5]
    np.testing.assert_array_equal(
        stats["audio"]["counts"][1], np.bincount(codes[:, 1].ravel(), minlength=1024)
    )
    one = load_target_stats(store, subject=0)["fmri"]
    np.testing.assert_allclose(one["var"], 1.0, atol=5e-3)


def test_planted_signal_is_learnable(store: Path) -> None:
    """Ridge regression from the last frame (train TRs) predicts held-out fMRI with r > 0."""
    info = open_store(store)
    with h5py.File(store) as handle:
        x = handle["video"][:, -1].reshape(info.n_trs, -1).astype(np.float64) / 255.0
        y = handle["fmri/mean"][()].astype(np.float64)
    tr, te = info.splits["train"], np.concatenate([info.splits["val"], info.splits["test"]])
    mu = x[tr].mean(0)
    xt = x[tr] - mu
    w = np.linalg.solve(xt.T @ xt + 1.0 * np.eye(x.shape[1]), xt.T @ (y[tr] - y[tr].mean(0)))
    pred = (x[te] - mu) @ w
    r = [np.corrcoef(pred[:, v], y[te, v])[0, 1] for v in range(info.n_voxels)]
    assert np.mean(r) > 0.5


def test_dataset_pickles_and_works_in_workers(store: Path) -> None:
    ds = StoreDataset(store, "train")
    first = ds[0]  # opens a handle in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._handle is None
    torch.testing.assert_close(clone[0]["fmri"], first["fmri"])
    loader = DataLoader(ds, batch_size=4, num_workers=1)
    batch = next(iter(loader))
    assert batch["video"].shape == (4, 2, 6, 10, 3)
    assert batch["index"].tolist() == [0, 1, 2, 3]


def test_interrupted_synthetic_write_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    from giblet_ds.store.builder import writer

    def boom(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.StoreWriter, "write_text", boom)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_store(tmp_path / "s.h5")
    assert list(tmp_path.iterdir()) == []


def test_read_split_subjects_returns_every_subject_on_the_split(tmp_path: Path) -> None:
    from giblet_ds.store import read_split_subjects

    path = write_synthetic_store(tmp_path / "s.h5")
    got = read_split_subjects(path, "val")
    assert got.shape == (2, 5, 23) and got.dtype == np.float32
    with h5py.File(path, "r") as handle:
        want = handle["fmri/subjects"][:, 25:30].astype(np.float32)
    np.testing.assert_array_equal(got, want)
