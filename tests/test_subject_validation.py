"""Validation with subject heads: the val record carries each subject's own-head r on the reliable
voxels beside the average subject's, which alone drives early stopping; a mean-target record has
no per-subject numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from giblet_ds.config import RunConfig, load_config
from giblet_ds.losses import NormalizedLoss, TargetVariances
from giblet_ds.model import GibletAutoencoder
from giblet_ds.model.subject_layers import SubjectLayers
from giblet_ds.resolve import resolve
from giblet_ds.run.records import read_metrics
from giblet_ds.store import (
    StoreDataset,
    StoreInfo,
    load_target_stats,
    open_store,
    read_split_subjects,
    subject_variances,
    write_synthetic_store,
)
from giblet_ds.train.run_log import RunLog
from giblet_ds.train.validator import Validator
from tests.tiny_sizes import TINY_OVERRIDES
from tests.train_harness import TINY


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("val_subjects")
    return {s: write_synthetic_store(folder / f"s{s}.h5", n_subjects=s) for s in (2, 3)}


def _validate(store: Path, run_dir: Path, *overrides: str) -> tuple[
    RunConfig, StoreInfo, GibletAutoencoder, Validator
]:  # fmt: skip
    """One Validator.run on a model whose subject heads differ, writing run_dir/metrics.jsonl."""
    cfg = resolve(load_config(TINY, [*TINY_OVERRIDES, f"data.store={store}", *overrides])).cfg
    info = open_store(store)
    torch.manual_seed(0)
    model = GibletAutoencoder(cfg.model)
    model.init_weights()
    if isinstance(model.encoder.subjects, SubjectLayers):
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():  # heads start equal to the shared readout: make them differ
            model.encoder.subjects.up.normal_(generator=g)
            model.encoder.subjects.bias.normal_(std=0.1, generator=g)
    per_subject = subject_variances(store, info=info) if cfg.data.target == "subjects" else None
    stats = load_target_stats(store, info=info)
    loss_fn = NormalizedLoss(TargetVariances.from_stats(stats, per_subject), cfg.loss.weights())
    validator = Validator(cfg, info, StoreDataset.for_run(info, "val", cfg), loss_fn)
    run_dir.mkdir()
    log = RunLog(run_dir, enabled=True, wandb_mode="disabled", wandb_project="",
                 wandb_run_name="", wandb_run_id="", config={})  # fmt: skip
    validator.run(model, lambda batch: batch, log, step=7, epoch=1)
    return cfg, info, model, validator


def _voxel_r(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(T, V) x (T, V) -> (V,) Pearson r over time, by the textbook formula."""
    p = prediction - prediction.mean(0)
    t = truth - truth.mean(0)
    return (p * t).sum(0) / np.sqrt((p * p).sum(0) * (t * t).sum(0))


@pytest.mark.parametrize("n_subjects", [2, 3])
def test_val_record_scores_each_subjects_own_head(
    stores: dict[int, Path], tmp_path: Path, n_subjects: int
) -> None:
    # The synthetic subjects agree well (training ISC 0.92-0.99): a high threshold keeps about
    # half of the voxels, so the test sees which voxels are averaged.
    cfg, info, model, validator = _validate(
        stores[n_subjects], tmp_path / "run", "data.target=subjects",
        "data.reliable_isc_threshold=0.975",
    )  # fmt: skip
    val = read_metrics(tmp_path / "run").val[-1]
    reliable = validator.reference.reliable
    assert 0 < reliable.sum() < info.n_voxels  # a real subset, so the voxel choice is tested
    # By hand: the model's eval-mode prediction of every val TR, each subject's head against
    # that subject's own volumes, per-voxel r, mean over the reliable voxels.
    ds = StoreDataset.for_run(info, "val", cfg)
    samples = [ds[i] for i in range(len(ds))]
    with torch.no_grad():
        out = model.eval()(*(torch.stack([s[k] for s in samples]) for k in ("video",
                           "audio_codes", "text")))  # fmt: skip
    assert out.fmri_subjects is not None
    heads = out.fmri_subjects.double().numpy()  # (T_val, S, V)
    volumes = read_split_subjects(info.path, "val", info=info).astype(np.float64)  # (S, T, V)
    by_hand = {
        subject: float(_voxel_r(heads[:, s], volumes[s])[reliable].mean())
        for s, subject in enumerate(info.subjects)
    }
    assert val.fmri_r_reliable_by_subject is not None
    assert list(val.fmri_r_reliable_by_subject) == list(info.subjects)  # store order, by id
    assert val.fmri_r_reliable_by_subject == pytest.approx(by_hand, abs=1e-6)
    assert len(set(by_hand.values())) == n_subjects  # the heads really differ
    # The average subject against the subject mean still drives early stopping and best.
    target = torch.stack([s["fmri"] for s in samples]).double().numpy()  # the stored mean
    mean_r = _voxel_r(out.fmri.double().numpy(), target)[reliable].mean()
    assert val.fmri_r_reliable == pytest.approx(mean_r, abs=1e-6)
    assert val.best_metric == val.fmri_r_reliable and val.is_best
    assert all(abs(r - mean_r) > 1e-4 for r in by_hand.values())  # not the mean's number


def test_mean_target_val_record_has_no_subject_numbers(
    stores: dict[int, Path], tmp_path: Path
) -> None:
    _, info, model, validator = _validate(stores[3], tmp_path / "run")
    val = read_metrics(tmp_path / "run").val[-1]
    assert val.fmri_r_reliable_by_subject is None
    line = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"fmri_r_reliable_by_subject": null' in line
    assert val.best_metric == val.fmri_r_reliable


def test_normalized_r_with_a_zero_ceiling_is_refused_before_training(
    stores: dict[int, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Subjects that disagree on the validation TRs give a ceiling of 0 on the reliable voxels:
    # validation would log no fmri_r_normalized (a KeyError at the first validation before).
    from giblet_ds.errors import GibletError
    from giblet_ds.train import validator as validator_module
    from giblet_ds.train.evaluate import ValReference

    def zero_ceiling(info: StoreInfo, **_: object) -> ValReference:
        n = info.n_voxels
        return ValReference(np.ones(n, bool), np.zeros(n), 1.0, "constructed: ceiling 0")

    monkeypatch.setattr(validator_module, "val_reference", zero_ceiling)
    with pytest.raises(GibletError) as info:
        _validate(stores[2], tmp_path / "run", "train.early_stopping.metric=fmri_r_normalized")
    assert str(info.value) == (
        "train.early_stopping.metric=fmri_r_normalized needs a noise ceiling > 0, but the mean "
        "ceiling of the reliable voxels on the validation TRs is 0; set "
        "train.early_stopping.metric=fmri_r_reliable"
    )
