"""Subject heads (data.target=subjects): samples, exact counts, the per-subject loss, subject
dropout and the average subject, config checks, and a bit-identical resume."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from giblet_ds.config import load_config
from giblet_ds.errors import ConfigError
from giblet_ds.losses import NormalizedLoss, TargetVariances
from giblet_ds.model import GibletAutoencoder, GibletOutput, parameter_counts
from giblet_ds.model.subject_layers import SubjectLayers, subject_layer_count
from giblet_ds.resolve import resolve
from giblet_ds.store import StoreDataset, open_store, subject_variances, write_synthetic_store
from tests.tiny_sizes import TINY_OVERRIDES
from tests.train_harness import TINY, losses_by_step, records, run_training

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "launch" / "configs"
SUBJECTS = ("data.target=subjects",)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Stores of 1, 2 and 3 subjects (the same stimulus and planted signal)."""
    folder = tmp_path_factory.mktemp("subjects")
    return {s: write_synthetic_store(folder / f"s{s}.h5", n_subjects=s) for s in (1, 2, 3)}


def tiny_run(store: Path | None, *overrides: str):  # type: ignore[no-untyped-def]
    sets = [*TINY_OVERRIDES, *overrides] + ([f"data.store={store}"] if store else [])
    return load_config(TINY, sets)


# ------------------------------------------------------------------------------ samples, config


@pytest.mark.parametrize("n_subjects", [1, 2, 3])
def test_samples_carry_every_subjects_volume(stores: dict[int, Path], n_subjects: int) -> None:
    cfg = resolve(tiny_run(stores[n_subjects], *SUBJECTS)).cfg
    assert cfg.model.n_subjects == n_subjects  # filled from the store
    info = open_store(stores[n_subjects])
    ds = StoreDataset.for_run(info, "train", cfg)
    sample = ds[4]
    t = int(info.splits["train"][4])
    with h5py.File(info.path, "r") as f:
        every = f["/fmri/subjects"][:, t].astype(np.float32)
        mean = f["/fmri/mean"][t].astype(np.float32)
    assert sample["fmri_subjects"].shape == (n_subjects, 23)
    assert np.array_equal(sample["fmri_subjects"].numpy(), every)
    assert np.array_equal(sample["fmri"].numpy(), mean)  # the mean stays: validation scores it
    ds.close()


def test_resolve_says_the_subject_count_came_from_the_store(stores: dict[int, Path]) -> None:
    resolved = resolve(tiny_run(stores[3], *SUBJECTS))
    assert resolved.from_store == {"n_subjects": 3}
    assert "n_subjects=3" in resolved.describe_sizes()


def test_subject_config_errors_name_the_key_and_the_fix(stores: dict[int, Path]) -> None:
    with pytest.raises(ConfigError, match=r"data.subject must be null with data.target=subjects"):
        tiny_run(None, *SUBJECTS, "data.subject=0")
    with pytest.raises(ConfigError, match=r"data.target must be one of \('mean', 'subjects'\)"):
        tiny_run(None, "data.target=subject")
    with pytest.raises(ConfigError, match=r"model.subject_dropout must be in \(0, 1\)"):
        tiny_run(None, "model.subject_dropout=0")
    with pytest.raises(ConfigError, match=r"model.n_subjects=2 builds subject heads but "
                       r"data.target=mean.*set data.target=subjects or model.n_subjects=0"):  # fmt: skip
        resolve(tiny_run(stores[2], "model.n_subjects=2"))
    with pytest.raises(ConfigError, match=r"model.n_subjects=2 but the store .*s3.h5 holds 3 "
                       r"subject\(s\); set model.n_subjects=0"):  # fmt: skip
        resolve(tiny_run(stores[3], *SUBJECTS, "model.n_subjects=2"))
    with pytest.raises(ConfigError, match=r"data.target=subjects with model.n_subjects=0"):
        resolve(tiny_run(None, *SUBJECTS), require_store=False)


# ------------------------------------------------------------------------------ exact counts


@pytest.mark.parametrize(("n_subjects", "heads"), [(1, 574), (2, 861), (3, 1_148)])
def test_tiny_subject_head_counts(n_subjects: int, heads: int) -> None:
    # S + 1 slots (the average subject) of rank 8 on the 10-wide fMRI hidden layer, 23 voxels:
    # 8 x (10 + 23) + 23 = 287 each.
    cfg = tiny_run(None, *SUBJECTS, f"model.n_subjects={n_subjects}").model
    counts = parameter_counts(GibletAutoencoder(cfg))
    base = parameter_counts(GibletAutoencoder(tiny_run(None).model))
    assert counts["encoder.subjects"] == heads == (n_subjects + 1) * 287
    assert heads == subject_layer_count(n_subjects, 10, 23, 8)
    assert counts["total"] == base["total"] + heads
    assert {
        k: v for k, v in counts.items() if k not in ("encoder.subjects", "encoder", "total")
    } == {k: v for k, v in base.items() if k not in ("encoder", "total")}


def test_3p5b_with_subject_heads_stays_within_5_percent() -> None:
    default = 3_513_060_994
    with torch.device("meta"):
        five = GibletAutoencoder(
            load_config(CONFIGS / "giblet_3p5b.yaml", [*SUBJECTS, "model.n_subjects=5"]).model
        )
        seventeen = GibletAutoencoder(
            load_config(CONFIGS / "giblet_3p5b.yaml", [*SUBJECTS, "model.n_subjects=17"]).model
        )
    # 6 slots x (8 x (16,384 + 83,138) + 83,138) = 6 x 879,314 (the Sherlock report's 5 subjects)
    counts = parameter_counts(five)
    assert counts["encoder.subjects"] == 5_275_884
    assert counts["total"] == default + 5_275_884 == 3_518_336_878
    every = parameter_counts(seventeen)  # all 17 Sherlock subjects: 18 slots, +0.45%
    assert every["encoder.subjects"] == 18 * 879_314 == 15_827_652
    assert every["total"] / default < 1.05


# ------------------------------------------------------------------------------ loss and heads


@pytest.mark.parametrize("n_subjects", [1, 2, 3])
def test_per_subject_loss_on_known_inputs(n_subjects: int) -> None:
    # Predicting 0 for subject s whose target is the constant (s + 1) with training variance
    # v_s costs (s + 1)^2 / v_s; the term is the mean over subjects.
    variances = (0.5, 2.0, 4.0)[:n_subjects]
    loss = NormalizedLoss(
        TargetVariances(fmri=1.0, video=1.0, text=1.0, audio=1.0, fmri_subjects=variances),
        {"fmri": 1.0},
    )
    b, v = 2, 5
    target = torch.stack([torch.full((b, v), s + 1.0) for s in range(n_subjects)], dim=1)
    output = GibletOutput(
        fmri=torch.full((b, v), 99.0),  # the average subject: not in the term
        video=torch.zeros(b, 3),
        audio=torch.zeros(b, 1, 1, 4),
        text=torch.zeros(b, 2),
        bottleneck=torch.zeros(b, 1),
        fmri_subjects=torch.zeros(b, n_subjects, v),
    )
    batch = {
        "fmri": torch.zeros(b, v),
        "fmri_subjects": target,
        "video": torch.zeros(b, 1, 1, 1, 3),
        "audio_codes": torch.zeros(b, 1, 1, dtype=torch.long),
        "text": torch.zeros(b, 1, 2),
    }
    expected = {1: 1 / 0.5, 2: (1 / 0.5 + 4 / 2.0) / 2, 3: (1 / 0.5 + 4 / 2.0 + 9 / 4.0) / 3}
    result = loss(output, batch)
    assert result.terms["fmri"].item() == pytest.approx(expected[n_subjects], rel=1e-6)
    assert result.total.item() == pytest.approx(expected[n_subjects], rel=1e-6)
    with pytest.raises(ValueError, match="batch has no fmri_subjects.*data.target=subjects"):
        loss(output, {k: v for k, v in batch.items() if k != "fmri_subjects"})


def test_subject_variances_are_the_training_variances(stores: dict[int, Path]) -> None:
    info = open_store(stores[3])
    train = info.splits["train"]
    with h5py.File(info.path, "r") as f:
        every = f["/fmri/subjects"][:, train].astype(np.float64)  # (S, T_train, V)
    by_hand = every.var(axis=1).mean(axis=1)
    assert np.allclose(subject_variances(info.path, info=info), by_hand, rtol=1e-5)
    assert np.allclose(by_hand, 1.0, atol=1e-3)  # z-scored on these TRs (float16 rounding)


@pytest.mark.parametrize("n_subjects", [1, 2, 3])
def test_heads_start_as_the_shared_readout_and_drop_to_the_average(n_subjects: int) -> None:
    cfg = tiny_run(None, *SUBJECTS, f"model.n_subjects={n_subjects}", "model.subject_dropout=0.5")
    torch.manual_seed(0)
    model = GibletAutoencoder(cfg.model)
    model.init_weights()
    g = torch.Generator().manual_seed(1)
    video = torch.rand(4, 2, 6, 10, 3, generator=g)
    codes = torch.randint(0, 1024, (4, 2, 5), generator=g)
    text = torch.randn(4, 2, 7, generator=g)
    out = model.eval()(video, codes, text)
    assert out.fmri_subjects is not None and out.fmri_subjects.shape == (4, n_subjects, 23)
    # zero out-weights and biases: every subject and the average subject are the shared readout
    shared = model.encoder.fmri_head(model.encoder.trunk(model.encoder.per_tr_features(
        video, codes, text)))  # fmt: skip
    assert torch.equal(out.fmri, shared)
    assert torch.equal(out.fmri_subjects, shared.unsqueeze(1).expand(-1, n_subjects, -1))
    # Move the residuals so subjects differ, then check which outputs subject dropout replaced.
    heads = model.encoder.subjects
    assert isinstance(heads, SubjectLayers)
    with torch.no_grad():
        heads.up.normal_(generator=g)
        heads.bias.normal_(generator=g)
    evaluation = model.eval()(video, codes, text)
    assert evaluation.fmri_subjects is not None
    torch.manual_seed(5)
    training = model.train()(video, codes, text)
    torch.manual_seed(5)
    drop = torch.rand(4, n_subjects) < 0.5  # the draw SubjectLayers makes after the encoders
    assert training.fmri_subjects is not None
    for b in range(4):
        for s in range(n_subjects):
            want = evaluation.fmri[b] if drop[b, s] else evaluation.fmri_subjects[b, s]
            assert torch.equal(training.fmri_subjects[b, s], want)
    assert drop.any() and not drop.all()


def test_subject_dropout_trains_the_average_subject_to_the_subject_mean() -> None:
    # Subjects are different linear maps of one hidden layer; each slot can fit its subject
    # exactly. The average slot only sees the samples subject dropout hands it, from every
    # subject alike: its least-squares answer is the mean of the subjects' maps.
    torch.manual_seed(0)
    n, h, v, s = 64, 5, 4, 3
    hidden = torch.randn(n, h)
    maps = torch.randn(s, h, v)
    targets = torch.einsum("nh,shv->nsv", hidden, maps)
    layers = SubjectLayers(s, h, v, rank=h, subject_dropout=0.3)
    layers.reset_parameters()
    optimizer = torch.optim.Adam(layers.parameters(), lr=0.02)
    for step in range(3000):
        for group in optimizer.param_groups:
            group["lr"] = 0.02 * (1 - step / 3000) + 1e-4
        average, own = layers.train()(hidden, torch.zeros(n, v))
        loss = (own - targets).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    average, own = layers.eval()(hidden, torch.zeros(n, v))
    mean_target = targets.mean(1)
    assert (own - targets).abs().max().item() < 0.05
    error = (average - mean_target).pow(2).mean() / mean_target.pow(2).mean()
    assert error.item() < 0.01
    # and it is not merely near any one subject
    for j in range(s):
        assert (average - targets[:, j]).pow(2).mean() / mean_target.pow(2).mean() > 0.2


# ------------------------------------------------------------------------------ training


@pytest.mark.distributed
def test_subject_run_resumes_bit_for_bit(stores: dict[int, Path], tmp_path: Path) -> None:
    from giblet_ds.checkpoint.loading import load_model

    sets = (
        *SUBJECTS,
        "model.subject_dropout=0.5",
        "train.max_steps=6",
        "checkpoint.save_every_steps=2",
        "checkpoint.keep_last=5",
        "train.val_every_steps=3",
    )
    store = stores[3]
    here = {"PYTHONPATH": str(ROOT)}  # this checkout's giblet_ds, whatever the venv points at
    reference = tmp_path / "reference"
    result = run_training(reference, store, world=1, sets=sets, env=here)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    killed = run_training(
        run_dir, store, world=1, sets=sets, env={**here, "GIBLET_FAULT_KILL_AT_STEP": "3"}
    )
    assert killed.returncode != 0
    resumed = run_training(run_dir, store, world=1, sets=sets, env=here)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = records(run_dir, "start")[-1]
    assert start["start_step"] == 2
    assert start["param_counts"]["encoder.subjects"] == 1_148
    assert losses_by_step(run_dir) == losses_by_step(reference)
    assert losses_by_step(run_dir, "val") == losses_by_step(reference, "val")
    model, cfg, _ = load_model(run_dir / "checkpoints" / "step-00000006", verify=False)
    assert cfg.data.target == "subjects" and cfg.model.n_subjects == 3
    assert isinstance(model.encoder.subjects, SubjectLayers)
    assert model.encoder.subjects.up.abs().sum() > 0  # training moved the residuals
