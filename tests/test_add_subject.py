"""Adding a subject (giblet_ds.train.add_subject, tools/add_subject.py): the new head starts as the
average subject, only it moves, its loss falls, and the result loads and predicts like any run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from giblet_ds.checkpoint.loading import load_model
from giblet_ds.errors import GibletError
from giblet_ds.model import parameter_counts
from giblet_ds.store import (
    StoreDataset,
    load_mask,
    load_target_stats,
    open_store,
    write_synthetic_store,
)
from giblet_ds.store.smoothing import MaskedGaussianSmoothing, voxel_sizes_mm
from giblet_ds.train.add_subject import add_subject
from tests.test_evaluation_subjects import member
from tests.test_tools_common import load_tool

add_subject_tool = load_tool("add_subject")


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The training store (3 subjects) and a store of the same movie and mask holding a fourth
    subject (the same seed draws the same stimulus, mask and first subjects, then one more)."""
    base = tmp_path_factory.mktemp("add_subject")
    trained = write_synthetic_store(base / "three.h5", n_trs=80, n_voxels=29, n_subjects=3)
    new = write_synthetic_store(base / "four.h5", n_trs=80, n_voxels=29, n_subjects=4)
    return trained, new


def test_new_head_starts_as_the_average_and_only_it_moves(
    stores: tuple[Path, Path], tmp_path: Path
) -> None:
    trained, new = stores
    folder = member(tmp_path / "run", trained, 0, "data.target=subjects")
    model, cfg, _ = load_model(folder, verify=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = open_store(new)
    added = add_subject(model, cfg, info, subject="sub-04", epochs=15, lr=0.02)

    assert added.slot == 3 and added.cfg.model.n_subjects == 4
    counts = parameter_counts(added.model)
    assert (
        counts["encoder.subjects"]
        == parameter_counts(model)["encoder.subjects"] + 8 * (10 + 29) + 29
    )
    # the model given is untouched, and in the new one only slot 3 of the heads moved
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    after = added.model.state_dict()
    for name, value in before.items():
        if name.startswith("encoder.subjects."):
            new_value = after[name]
            assert torch.equal(new_value[:3], value[:3]), name  # subjects 1-3
            assert torch.equal(new_value[4], value[3]), name  # the average subject
            assert not torch.equal(new_value[3], value[3]), name  # the new head moved
        else:
            assert torch.equal(after[name], value), name
    # the starting loss is the average subject's on the new subject, computed here by hand
    one = StoreDataset(new, "train", subject=3)
    batch = {k: torch.stack([one[i][k] for i in range(len(one))]) for k in one[0]}
    with torch.no_grad():
        out = model(batch["video"], batch["audio_codes"], batch["text"])
    var = float(np.mean(load_target_stats(new, subject=3)["fmri"]["var"]))
    start = float((out.fmri - batch["fmri"]).pow(2).mean()) / var
    assert added.train_loss[0] == pytest.approx(start, rel=1e-5)
    assert len(added.train_loss) == 16
    assert added.train_loss[-1] < 0.9 * added.train_loss[0]


def test_tool_writes_a_loadable_model_and_refuses_a_mean_model(
    stores: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trained, new = stores
    folder = member(tmp_path / "run", trained, 1, "data.target=subjects")
    out = tmp_path / "with_sub04"
    code = add_subject_tool.main([str(folder), "--store", str(new), "--subject", "sub-04",
                                  "--out", str(out), "--epochs", "2", "--no-verify"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "subject sub-04 is head 3" in capsys.readouterr().out
    model, cfg, _ = load_model(out, verify=False)
    assert cfg.model.n_subjects == 4 and model.encoder.subjects is not None
    assert model.encoder.subjects.n_subjects == 4

    mean_model = member(tmp_path / "mean", trained, 2)
    code = add_subject_tool.main([str(mean_model), "--store", str(new), "--out",
                                  str(tmp_path / "x"), "--no-verify"])  # fmt: skip
    assert code == 2
    assert "has no subject heads" in capsys.readouterr().err
    with pytest.raises(GibletError, match="does not fit the model:\n  - model.n_voxels=29"):
        other = write_synthetic_store(tmp_path / "other.h5", n_trs=80, n_voxels=31)
        model, cfg, _ = load_model(folder, verify=False)
        add_subject(model, cfg, open_store(other), epochs=1)


def test_a_smoothed_run_fits_the_new_head_to_smoothed_targets(
    stores: tuple[Path, Path], tmp_path: Path
) -> None:
    """data.smoothing_fwhm_mm: the new head's loss is against the smoothed volumes of the new
    subject, divided by their training variance, as the run's own heads were trained."""
    trained, new = stores
    folder = member(
        tmp_path / "run", trained, 0, "data.target=subjects", "data.smoothing_fwhm_mm=9"
    )
    model, cfg, _ = load_model(folder, verify=False)
    added = add_subject(model, cfg, open_store(new), subject="sub-04", epochs=1, lr=0.02)
    mask, affine = load_mask(new)
    smoothing = MaskedGaussianSmoothing(mask, voxel_sizes_mm(affine), 9.0)
    one = StoreDataset(new, "train", subject=3)
    batch = {k: torch.stack([one[i][k] for i in range(len(one))]) for k in one[0]}
    with torch.no_grad():
        out = model(batch["video"], batch["audio_codes"], batch["text"])
        target = smoothing(batch["fmri"])
    var = float(target.double().var(dim=0, unbiased=False).mean())
    start = float((out.fmri - target).pow(2).mean()) / var
    assert added.train_loss[0] == pytest.approx(start, rel=1e-4)
