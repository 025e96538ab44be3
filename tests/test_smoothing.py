"""Smoothed training targets (data.smoothing_fwhm_mm): the kernel, the mask, the loss, the config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from giblet_ds.checkpoint.loading import load_model
from giblet_ds.config import load_config
from giblet_ds.errors import ConfigError
from giblet_ds.evaluation import predict_split
from giblet_ds.losses import NormalizedLoss, TargetVariances
from giblet_ds.metrics import voxel_r
from giblet_ds.model.autoencoder import GibletOutput
from giblet_ds.store import StoreInfo, load_mask, load_target_stats, open_store, schema
from giblet_ds.store.smoothing import MaskedGaussianSmoothing, voxel_sizes_mm
from giblet_ds.train.evaluate import ValReference, val_reference
from giblet_ds.train.loss_setup import run_loss
from tests.test_model import CONFIGS
from tests.train_harness import run_training


def test_an_impulse_is_half_height_at_half_the_fwhm() -> None:
    # a line of 21 voxels of 1 mm: the impulse response at +-2 mm of a 4 mm FWHM kernel is half
    # its peak (the definition of the full width at half maximum)
    mask = np.ones((21, 1, 1), bool)
    smoothing = MaskedGaussianSmoothing(mask, (1.0, 1.0, 1.0), 4.0)
    impulse = torch.zeros(21)
    impulse[10] = 1.0
    # the blur before the division by the blurred mask (constant in the line's middle)
    out = smoothing(impulse) * smoothing.get_buffer("weight")
    assert out[12] / out[10] == pytest.approx(0.5, rel=1e-5)
    assert out[8] / out[10] == pytest.approx(0.5, rel=1e-5)
    sigma = 4.0 / math.sqrt(8 * math.log(2))
    assert out[11] / out[10] == pytest.approx(math.exp(-0.5 / sigma**2), rel=1e-5)


def test_smoothing_within_the_mask_equals_scipy_normalized_by_the_blurred_mask() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((9, 10, 11)) > 0.3
    voxel = (3.0, 2.0, 2.5)
    smoothing = MaskedGaussianSmoothing(mask, voxel, 6.0)
    values = rng.standard_normal((2, 4, int(mask.sum()))).astype(np.float32)
    out = smoothing(torch.from_numpy(values)).numpy()
    assert out.shape == values.shape
    sigma = [6.0 / math.sqrt(8 * math.log(2)) / v for v in voxel]
    weight = gaussian_filter(mask.astype(np.float64), sigma, mode="constant", truncate=3.0)
    for index in np.ndindex(values.shape[:2]):
        grid = np.zeros(mask.shape)
        grid[mask] = values[index]
        blurred = gaussian_filter(grid, sigma, mode="constant", truncate=3.0)
        np.testing.assert_allclose(out[index], blurred[mask] / weight[mask], atol=2e-5)
    # a constant inside the mask stays that constant, also at the mask's edge (3dBlurInMask)
    flat = smoothing(torch.full((int(mask.sum()),), 2.5))
    torch.testing.assert_close(flat, torch.full_like(flat, 2.5))


def test_voxel_sizes_are_read_from_the_affine() -> None:
    affine = np.array([[-3.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.5, -72], [0, 0, 0, 1]])
    assert voxel_sizes_mm(affine) == (3.0, 2.0, 2.5)


def test_bad_smoothing_is_refused() -> None:
    with pytest.raises(ValueError, match="need fwhm_mm > 0"):
        MaskedGaussianSmoothing(np.ones((2, 2, 2), bool), (3.0, 3.0, 3.0), 0.0)
    smoothing = MaskedGaussianSmoothing(np.ones((2, 2, 2), bool), (3.0, 3.0, 3.0), 6.0)
    with pytest.raises(ValueError, match="values have 7 voxels, the smoothing mask 8"):
        smoothing(torch.zeros(7))
    for value in (-1, "6mm", 50):
        with pytest.raises(ConfigError, match="data.smoothing_fwhm_mm"):
            load_config(CONFIGS / "tiny.yaml", [f"data.smoothing_fwhm_mm={value}"])


def test_the_loss_compares_against_the_smoothed_target() -> None:
    mask = np.ones((3, 4, 2), bool)
    smoothing = MaskedGaussianSmoothing(mask, (3.0, 3.0, 3.0), 5.0)
    variances = TargetVariances(fmri=0.5, video=1.0, text=1.0, audio=1.0)
    loss = NormalizedLoss(variances, {"fmri": 1.0}, fmri_smoothing=smoothing)
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 24, generator=g)
    prediction = torch.randn(2, 24, generator=g)
    batch = {"fmri": target, "video": torch.zeros(2, 1, 1, 1, 3), "text": torch.zeros(2, 1, 1),
             "audio_codes": torch.zeros(2, 1, 1, dtype=torch.long)}  # fmt: skip
    none = torch.zeros(0)
    output = GibletOutput(fmri=prediction, video=none, audio=none, text=none, bottleneck=none)
    term = loss(output, batch).terms["fmri"]
    expected = ((prediction - smoothing(target)) ** 2).mean() / 0.5
    torch.testing.assert_close(term, expected)
    assert not torch.allclose(term, ((prediction - target) ** 2).mean() / 0.5)


@pytest.mark.parametrize("target", ["mean", "subjects"])
def test_run_loss_divides_by_the_smoothed_training_variance(tiny_store: Path, target: str) -> None:
    store = open_store(tiny_store)
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        [f"data.store={tiny_store}", "data.smoothing_fwhm_mm=8", f"data.target={target}"],
    )
    loss = run_loss(cfg, store)
    smoothing = loss.fmri_smoothing
    assert isinstance(smoothing, MaskedGaussianSmoothing) and smoothing.fwhm_mm == 8.0
    train = np.asarray(store.splits["train"])
    mask, _ = load_mask(tiny_store)

    def variance(rows: np.ndarray) -> float:  # by hand: scipy's blur inside the mask, numpy's var
        sigma = (
            8.0 / math.sqrt(8 * math.log(2)) / np.array(voxel_sizes_mm(load_mask(tiny_store)[1]))
        )
        weight = gaussian_filter(mask.astype(np.float64), sigma, mode="constant", truncate=3.0)
        out = []
        for row in rows:
            grid = np.zeros(mask.shape)
            grid[mask] = row
            out.append(
                gaussian_filter(grid, sigma, mode="constant", truncate=3.0)[mask] / weight[mask]
            )
        return float(np.var(np.array(out), axis=0).mean())

    with h5py.File(tiny_store, "r") as handle:
        mean_rows = handle[schema.FMRI_MEAN][train.tolist()]
        subject_rows = [handle[schema.FMRI_SUBJECTS][s, train.tolist()] for s in range(2)]
    assert loss.variances.fmri == pytest.approx(variance(mean_rows), rel=1e-4)
    assert loss.variances.fmri < float(np.var(mean_rows, axis=0).mean())  # noise smoothed away
    if target == "subjects":
        assert loss.variances.fmri_subjects == pytest.approx(
            [variance(rows) for rows in subject_rows], rel=1e-4
        )
    else:
        assert loss.variances.fmri_subjects is None
    plain = run_loss(load_config(CONFIGS / "tiny.yaml", [f"data.store={tiny_store}"]), store)
    assert plain.fmri_smoothing is None
    assert plain.variances.fmri == pytest.approx(float(np.var(mean_rows, axis=0).mean()), rel=1e-3)


def test_a_kernel_narrower_than_a_voxel_is_refused() -> None:
    for fwhm in (0.5, 1.2, 2.9):  # 1.2 mm: 3 taps, but a neighbour weighs 3e-8 of the centre
        with pytest.raises(
            ValueError, match=rf"FWHM {fwhm:g} mm is narrower than the finest voxel"
        ):
            MaskedGaussianSmoothing(np.ones((3, 3, 3), bool), (3.0, 3.0, 3.0), fwhm)
    with pytest.raises(ValueError, match=r"use >= 2 mm, or 0 for none"):
        MaskedGaussianSmoothing(np.ones((3, 3, 3), bool), (3.0, 2.0, 3.0), 1.9)
    smoothing = MaskedGaussianSmoothing(np.ones((3, 3, 3), bool), (3.0, 3.0, 3.0), 3.0)
    kernel = smoothing.get_buffer("kernel0")
    assert float(kernel[1] / kernel[0]) > 10  # at one voxel FWHM a neighbour weighs ~6%


def _smoothed_reference(
    tiny_store: Path,
) -> tuple[StoreInfo, NormalizedLoss, dict[str, np.ndarray], ValReference]:
    """The store, the tiny run's loss at FWHM 8 mm, the fMRI training stats, and the validation
    reference measured with that loss's smoothing."""
    store = open_store(tiny_store)
    cfg = load_config(
        CONFIGS / "tiny.yaml", [f"data.store={tiny_store}", "data.smoothing_fwhm_mm=8"]
    )
    loss = run_loss(cfg, store)
    stats = load_target_stats(tiny_store, info=store)["fmri"]
    reference = val_reference(
        store, subject=None, threshold=0.1, train_mean=stats["mean"], train_var=stats["var"],
        smoothing=loss.fmri_smoothing, smoothed_var=loss.variances.fmri,
    )  # fmt: skip
    return store, loss, stats, reference


def test_the_validation_constant_is_measured_as_the_loss_measures(tiny_store: Path) -> None:
    """The health report compares the validation fMRI term with the training-mean constant's:
    with smoothed targets both are smoothed MSEs over the smoothed variance."""
    store, loss, stats, reference = _smoothed_reference(tiny_store)
    val = np.asarray(store.splits["val"])
    with h5py.File(tiny_store, "r") as handle:
        target = handle[schema.FMRI_SUBJECTS][:, val.tolist()].astype(np.float64).mean(0)
    assert loss.fmri_smoothing is not None
    smooth = loss.fmri_smoothing
    with torch.no_grad():
        err = smooth(torch.from_numpy(target).float()) - smooth(
            torch.from_numpy(stats["mean"]).float()
        )
    by_hand = float(err.double().pow(2).mean()) / loss.variances.fmri
    assert reference.constant_term == pytest.approx(by_hand, rel=1e-5)
    plain = val_reference(
        store, subject=None, threshold=0.1, train_mean=stats["mean"], train_var=stats["var"]
    )
    assert plain.constant_term != pytest.approx(reference.constant_term, rel=1e-3)


def test_a_training_run_fits_smoothed_targets_and_validates_on_raw_ones(
    tiny_store: Path, tmp_path: Path
) -> None:
    """One real launch/train.py run (1 rank): the logged validation loss and its constant are the
    smoothed ones, the validation r is against the unsmoothed volumes."""
    run_dir = tmp_path / "run"
    sets = ("train.max_steps=2", "train.val_every_steps=2", "data.smoothing_fwhm_mm=8")
    done = run_training(run_dir, tiny_store, world=1, sets=sets)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = next(r for r in records if r["kind"] == "val")
    store, _, _, smoothed = _smoothed_reference(tiny_store)
    assert val["fmri_constant_term"] == pytest.approx(smoothed.constant_term, rel=1e-5)
    # the checkpoint's validation r, recomputed against the raw subject mean
    model, saved, _ = load_model(run_dir, verify=False)
    assert saved.data.smoothing_fwhm_mm == 8.0
    prediction, target = predict_split(model, saved, store, "val", device=torch.device("cpu"))
    raw = voxel_r(torch.from_numpy(prediction), torch.from_numpy(target)).numpy()
    assert val["fmri_r_mean"] == pytest.approx(float(raw.mean()), abs=1e-5)
