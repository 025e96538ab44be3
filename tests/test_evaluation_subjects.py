"""Per-subject evaluation and seed ensembles (tools/evaluate.py): each subject's own ceiling on
constructed data with a known answer, per-subject scores and maps recomputed by hand, and the
ensemble's averaged prediction beside its members on the same TRs and voxels."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from giblet_ds.config import config_to_dict, load_config
from giblet_ds.errors import GibletError
from giblet_ds.evaluation import evaluate, fit_ridge_baseline
from giblet_ds.evaluation.output import format_table
from giblet_ds.metrics import pairwise_isc, subject_ceiling_r, voxel_r
from giblet_ds.model import GibletAutoencoder
from giblet_ds.resolve import resolve
from giblet_ds.store import load_mask, open_store, write_synthetic_store
from tests.test_tools_common import load_tool
from tests.train_harness import TINY

evaluate_tool = load_tool("evaluate")


# ------------------------------------------------------------------ the ceiling, known answer


def planted(n_subjects: int, signal: float, noise: float, n_trs: int = 40) -> torch.Tensor:
    """(S, T, 3): subject s = signal * x + noise * n_s, with x and every n_s zero-mean and
    exactly orthonormal, so every correlation is exact: r(s, signal) = signal / sqrt(signal^2 +
    noise^2) in each of 3 voxels (the second and third scaled, which r ignores)."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(n_trs, 1 + n_subjects, generator=g, dtype=torch.float64)
    basis, _ = torch.linalg.qr(raw - raw.mean(0))
    series = torch.stack(
        [signal * basis[:, 0] + noise * basis[:, 1 + s] for s in range(n_subjects)]
    )
    return torch.stack([series, 2 * series, 0.5 * series + 3], dim=-1)


@pytest.mark.parametrize("n_subjects", [2, 3, 5])
@pytest.mark.parametrize(("signal", "noise"), [(1.0, 1.5), (1.0, 0.5)])
def test_subject_ceiling_is_the_correlation_with_the_noise_free_signal(
    n_subjects: int, signal: float, noise: float
) -> None:
    data = planted(n_subjects, signal, noise)
    expected = signal / np.sqrt(signal**2 + noise**2)  # 0.5547 and 0.8944
    ceiling = subject_ceiling_r(data)
    assert ceiling.shape == (n_subjects, 3)
    np.testing.assert_allclose(ceiling.numpy(), expected, rtol=1e-10)
    # the uncorrected r with the others' mean is lower: their mean still holds noise
    others = data[1:].mean(0)
    assert voxel_r(others, data[0])[0].item() < expected - 0.01


def test_subject_ceiling_is_zero_without_shared_signal_and_needs_two_subjects() -> None:
    pure_noise = planted(3, 0.0, 1.0)
    assert torch.equal(subject_ceiling_r(pure_noise), torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"needs \(subjects >= 2"):
        subject_ceiling_r(planted(1, 1.0, 1.0))


# ------------------------------------------------------------------ tools/evaluate.py, by hand


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 subjects, 120 TRs (test split 17 TRs), 41 voxels."""
    base = tmp_path_factory.mktemp("eval_subjects")
    return write_synthetic_store(base / "store.h5", n_trs=120, n_voxels=41, n_subjects=3)


def member(folder: Path, store: Path, seed: int, *overrides: str) -> Path:
    """A model saved as consolidated weights beside its resolved run config (what a finished run
    gives a tool), its weights random but fixed by ``seed`` so that predictions vary."""
    cfg = resolve(load_config(TINY, [f"data.store={store}", *overrides])).cfg
    torch.manual_seed(seed)
    model = GibletAutoencoder(cfg.model)
    model.init_weights()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    folder.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors"
    )
    (folder / "run_config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return folder


def predictions(folder: Path, store: Path) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """A member's test predictions recomputed outside the evaluation: (mean (T, V), subjects
    (S, T, V) or None, the subject-mean target (T, V))."""
    from giblet_ds.checkpoint.loading import load_model
    from giblet_ds.store import StoreDataset

    model, cfg, _ = load_model(folder, verify=False)
    info = open_store(store)
    ds = StoreDataset.for_run(info, "test", cfg)
    samples = [ds[i] for i in range(len(ds))]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    with torch.no_grad():
        out = model(batch["video"], batch["audio_codes"], batch["text"])
    subjects = None if out.fmri_subjects is None else out.fmri_subjects.numpy().transpose(1, 0, 2)
    return out.fmri.numpy(), subjects, batch["fmri"].numpy()


def mean_r(prediction: np.ndarray, target: np.ndarray) -> float:
    return float(voxel_r(torch.from_numpy(prediction), torch.from_numpy(target)).mean())


def test_per_subject_scores_maps_and_ceiling_by_hand(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    heads = member(tmp_path / "heads", store, 0, "data.target=subjects")
    out = tmp_path / "eval"
    code = evaluate_tool.main([str(heads), "--store", str(store), "--out", str(out),
                               "--shifts", "5", "--no-verify"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "evaluation.json").read_text())
    info = open_store(store)
    test = info.splits["test"]
    with h5py.File(store, "r") as f:
        volumes = f["/fmri/subjects"][:, test].astype(np.float32)  # (3, 17, 41)
        train_volumes = f["/fmri/subjects"][:, info.splits["train"]].astype(np.float32)
    _, subjects, _ = predictions(heads, store)
    assert subjects is not None and subjects.shape == (3, 17, 41)
    ceiling = subject_ceiling_r(torch.from_numpy(volumes)).numpy()
    mask, _ = load_mask(store)
    assert [row["subject"] for row in report["subjects"]] == ["sub-01", "sub-02", "sub-03"]
    for s, row in enumerate(report["subjects"]):
        assert row["prediction"] == "own head"
        scores = row["sets"]["all"]
        own_r = voxel_r(torch.from_numpy(subjects[s]), torch.from_numpy(volumes[s])).numpy()
        assert scores["model_r"] == pytest.approx(float(own_r.mean()), abs=1e-6)
        # no ceiling averaged over the whole mask, as in the subject-mean table
        assert scores["ceiling_r"] is None and scores["model_r_normalized"] is None
        reliable = pairwise_isc(torch.from_numpy(train_volumes)).numpy() > 0.1
        assert row["sets"]["reliable"]["n_voxels"] == int(reliable.sum()) > 0
        assert row["sets"]["reliable"]["ceiling_r"] == pytest.approx(
            float(ceiling[s][reliable].mean()), abs=1e-9
        )
        assert row["sets"]["reliable"]["model_r_normalized"] == pytest.approx(
            float(own_r[reliable].mean()) / float(ceiling[s][reliable].mean()), abs=1e-6
        )
        ridge = fit_ridge_baseline(info, subject=s)  # the cached per-subject fit
        assert scores["ridge_r"] == pytest.approx(
            mean_r(ridge.predictions["test"], volumes[s]), abs=1e-6
        )
        saved = nib.load(str(out / f"sub-0{s + 1}_ceiling_r.nii.gz")).get_fdata()[mask]
        np.testing.assert_allclose(saved, ceiling[s], atol=1e-6)
        assert (out / f"sub-0{s + 1}_model_r.nii.gz").is_file()
        assert (out / f"sub-0{s + 1}_ridge_r.nii.gz").is_file()
    # the subject-mean table of today stays, scored on the average subject
    assert report["sets"]["all"]["n_voxels"] == 41
    printed = capsys.readouterr().out
    assert "per subject (prediction: own head" in printed and "sub-03 ceiling r" in printed


def test_seed_ensemble_scores_the_average_beside_each_member(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = member(tmp_path / "a", store, 1)
    second = member(tmp_path / "b", store, 2, "data.target=subjects")  # heads: mixed is fine
    third = member(tmp_path / "c", store, 3)
    out = tmp_path / "ens"
    code = evaluate_tool.main([str(first), str(second), str(third), "--store", str(store),
                               "--out", str(out), "--shifts", "5", "--no-verify",
                               "--no-ridge", "--subjects"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "evaluation.json").read_text())
    means, target = [], None
    for folder in (first, second, third):
        mean, _, target = predictions(folder, store)
        means.append(mean)
    assert target is not None
    average = np.mean(means, axis=0)
    assert report["n_trs"] == 17
    assert report["sets"]["all"]["model_r"] == pytest.approx(mean_r(average, target), abs=1e-6)
    assert [m["sets"]["all"] for m in report["members"]] == pytest.approx(
        [mean_r(m, target) for m in means], abs=1e-6
    )
    # per subject, a member without heads contributes its mean prediction to every subject
    _, heads, _ = predictions(second, store)
    assert heads is not None
    mixed = (means[0] + heads[1] + means[2]) / 3
    with h5py.File(store, "r") as f:
        volume = f["/fmri/subjects"][1, open_store(store).splits["test"]].astype(np.float32)
    assert report["subjects"][1]["sets"]["all"]["model_r"] == pytest.approx(
        mean_r(mixed.astype(np.float32), volume), abs=1e-5
    )
    printed = capsys.readouterr().out
    assert "seed ensemble of 3" in printed and "member 3 model r" in printed


def test_ensemble_refuses_members_of_another_target(store: Path, tmp_path: Path) -> None:
    mean_run = member(tmp_path / "mean", store, 1)
    one_subject = member(tmp_path / "one", store, 2, "data.subject=1")
    with pytest.raises(GibletError, match="ensemble member 2 was trained on another target"):
        evaluate([mean_run, one_subject], store, ridge=False, n_shifts=2, verify=False)
    with pytest.raises(GibletError, match="--config names one run's config"):
        evaluate([mean_run, mean_run], store, config=TINY, ridge=False, verify=False)


def test_ridge_fits_the_smoothed_training_targets_of_a_smoothed_run(
    store: Path, tmp_path: Path
) -> None:
    """data.smoothing_fwhm_mm: the baseline fits what the network fitted (the smoothed training
    targets, by hand here with scipy) and is scored, like the network, on the unsmoothed fMRI."""
    from scipy.ndimage import gaussian_filter

    from giblet_ds.evaluation.ridge import read_target, ridge_estimator
    from giblet_ds.evaluation.ridge_inputs import ridge_design
    from giblet_ds.store.smoothing import voxel_sizes_mm

    smoothed = member(tmp_path / "smoothed", store, 1, "data.smoothing_fwhm_mm=7")
    report = evaluate(smoothed, store, n_shifts=2, verify=False, ridge_cache=tmp_path / "cache")
    info = open_store(store)
    mask, affine = load_mask(store)
    sigma = 7.0 / np.sqrt(8 * np.log(2)) / np.array(voxel_sizes_mm(affine))
    weight = gaussian_filter(mask.astype(np.float64), sigma, mode="constant", truncate=3.0)
    train, test = (np.asarray(info.splits[s]) for s in ("train", "test"))
    rows = []
    for row in read_target(info, train, None):
        grid = np.zeros(mask.shape)
        grid[mask] = row
        rows.append(
            gaussian_filter(grid, sigma, mode="constant", truncate=3.0)[mask] / weight[mask]
        )
    design, _ = ridge_design(info)
    ridge = ridge_estimator()
    ridge.fit(design[train], np.asarray(rows, np.float32))
    by_hand = np.asarray(ridge.predict(design[test]), np.float32)
    target = read_target(info, test, None)
    assert report.sets["all"].ridge_r == pytest.approx(mean_r(by_hand, target), abs=1e-5)
    assert report.ridge is not None and "_fwhm7.0_" in report.ridge["cache"]
    assert report.ridge["target_smoothing_fwhm_mm"] == 7.0
    assert "training targets smoothed at FWHM 7 mm (data.smoothing_fwhm_mm)" in format_table(report)
    plain = evaluate(
        member(tmp_path / "plain", store, 1), store, n_shifts=2, verify=False,
        ridge_cache=tmp_path / "cache",
    )  # fmt: skip
    assert plain.sets["all"].ridge_r != pytest.approx(report.sets["all"].ridge_r, abs=1e-4)
    with pytest.raises(
        GibletError, match=r"smoothed differently \(data.smoothing_fwhm_mm \[0.0, 7"
    ):
        evaluate([smoothed, tmp_path / "plain"], store, n_shifts=2, verify=False)
    # without a baseline nothing is ambiguous: the members' average is scored
    mixed = evaluate([smoothed, tmp_path / "plain"], store, ridge=False, n_shifts=2, verify=False)
    assert mixed.ridge is None and mixed.members is not None
