"""Modality-normalized losses: 1.0 for the training mean and the uniform guess; known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from giblet_ds.losses import NormalizedLoss, TargetVariances, reconstruction_targets
from giblet_ds.model import GibletOutput

ALL_ON = {"fmri": 1.0, "video": 1.0, "audio": 1.0, "text": 1.0}


def training_set(n: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    """A small training split with uneven sizes and per-element scales and offsets."""
    rng = np.random.default_rng(seed)
    return {
        # (N, V): voxels with different scales, so the mean over per-element variance matters
        "fmri": (rng.normal(size=(n, 23)) * np.linspace(0.5, 3.0, 23) + 2.0).astype(np.float32),
        # (N, F, H, W, 3) in [0, 1]
        "video": rng.random((n, 2, 6, 10, 3)).astype(np.float32),
        # (N, K, D)
        "text": (rng.normal(size=(n, 2, 7)) * 0.2).astype(np.float32),
        # (N, n_q, C) codes
        "audio_codes": rng.integers(0, 1024, size=(n, 2, 5)).astype(np.int64),
    }


def store_stats(data: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """What the store's /stats holds: per-element mean and (population) variance of each target,
    and a code histogram per codebook."""
    batch = {k: torch.from_numpy(v) for k, v in data.items()}
    targets = {k: v.numpy().astype(np.float64) for k, v in reconstruction_targets(batch).items()}
    stats: dict[str, dict[str, np.ndarray]] = {
        name: {
            "mean": targets[name].mean(0).astype(np.float32),
            "var": targets[name].var(0).astype(np.float32),
        }
        for name in ("fmri", "video", "text")
    }
    codes = data["audio_codes"]
    counts = np.stack([np.bincount(codes[:, q].ravel(), minlength=1024) for q in range(2)])
    stats["audio"] = {"counts": counts.astype(np.int64)}
    return stats


def output(**tensors: torch.Tensor) -> GibletOutput:
    batch = next(iter(tensors.values())).shape[0]
    tensors.setdefault("bottleneck", torch.zeros(batch, 1))
    return GibletOutput(**tensors)


# ----------------------------------------------------------------------- normalization = 1.0


def test_predicting_the_training_mean_reads_one_per_term() -> None:
    data = training_set()
    stats = store_stats(data)
    variances = TargetVariances.from_stats(stats)
    n = data["fmri"].shape[0]
    mean = {k: torch.from_numpy(stats[k]["mean"]).expand(n, -1) for k in ("fmri", "video", "text")}
    out = output(
        fmri=mean["fmri"],
        video=mean["video"],
        text=mean["text"],
        audio=torch.zeros(n, 2, 5, 1024),
    )
    loss = NormalizedLoss(variances, ALL_ON)
    result = loss(out, {k: torch.from_numpy(v) for k, v in data.items()})
    assert set(result.terms) == {"fmri", "video", "audio", "text"}
    for name in ("fmri", "video", "text"):
        assert result.terms[name].item() == pytest.approx(1.0, abs=1e-6), name
    assert result.total.item() == pytest.approx(4.0, abs=1e-5)


def test_normalizer_is_the_mean_of_per_element_variance() -> None:
    data = training_set()
    variances = TargetVariances.from_stats(store_stats(data))
    fmri = data["fmri"].astype(np.float64)
    assert variances.fmri == pytest.approx(float(np.mean(fmri.var(0))), rel=1e-6)
    # Not the variance of all elements pooled (that would include the spread of the means).
    assert variances.fmri != pytest.approx(float(fmri.var()), rel=1e-2)
    last_frame = data["video"][:, -1].reshape(len(fmri), -1).astype(np.float64)
    assert variances.video == pytest.approx(float(np.mean(last_frame.var(0))), rel=1e-6)


def audio_only(audio: torch.Tensor, codes: torch.Tensor) -> tuple[GibletOutput, dict]:
    """An output and batch where only audio matters (other terms get weight 0)."""
    b = codes.shape[0]
    unused = torch.full((b, 1), float("nan"))
    batch = {
        "fmri": torch.zeros(b, 1),
        "video": torch.zeros(b, 1, 1, 1, 3),
        "audio_codes": codes,
        "text": torch.zeros(b, 1, 1),
    }
    return output(fmri=unused, video=unused, audio=audio, text=unused), batch


def test_uniform_audio_logits_read_exactly_one() -> None:
    codes = torch.from_numpy(training_set()["audio_codes"])
    loss = NormalizedLoss(TargetVariances(1.0, 1.0, 1.0, 1.0), {"audio": 1.0})
    result = loss(*audio_only(torch.zeros(*codes.shape, 1024), codes))
    assert set(result.terms) == {"audio"}
    assert result.terms["audio"].item() == pytest.approx(1.0, abs=1e-6)
    # Any constant logits are uniform too; a confident right answer reads near 0.
    assert loss(*audio_only(torch.full((*codes.shape, 1024), 3.5), codes)).terms[
        "audio"
    ].item() == pytest.approx(1.0, abs=1e-6)
    sure = torch.nn.functional.one_hot(codes, 1024).float() * 50.0
    assert loss(*audio_only(sure, codes)).terms["audio"].item() < 1e-6


# ------------------------------------------------------------------------- a worked example


def known_batch(**replace: torch.Tensor) -> tuple[GibletOutput, dict[str, torch.Tensor]]:
    """Two samples: 2 voxels; a 2-frame window of 1 x 1 pixels (target: the last frame's RGB);
    one codebook of 4 values with one code frame; one text slot of width 2."""
    video = torch.zeros(2, 2, 1, 1, 3)
    video[:, 0] = 9.0  # the first frame is not a target: it must not enter the loss
    video[0, 1, 0, 0] = torch.tensor([1.0, 1.0, 0.0])
    video[1, 1, 0, 0] = torch.tensor([0.0, 0.0, 2.0])
    batch = {
        "fmri": torch.tensor([[0.0, 2.0], [3.0, 6.0]]),
        "video": video,
        "audio_codes": torch.tensor([[[2]], [[0]]]),
        "text": torch.tensor([[[1.0, 3.0]], [[1.0, 1.0]]]),
    }
    logits = torch.zeros(2, 1, 1, 4)
    logits[1, 0, 0, 0] = math.log(4.0)  # softmax (4/7, 1/7, 1/7, 1/7); the code is 0
    predictions = {
        "fmri": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "video": torch.zeros(2, 3),
        "audio": logits,
        "text": torch.ones(2, 2),
    }
    return output(**{**predictions, **replace}), batch


def test_a_hand_computed_loss() -> None:
    out, batch = known_batch()
    variances = TargetVariances(fmri=0.5, video=2.0, text=4.0, audio=1.0)
    weights = {"fmri": 1.0, "video": 2.0, "audio": 0.5, "text": 1.0}
    result = NormalizedLoss(variances, weights, codebook_size=4)(out, batch)
    # fMRI: squared errors 1, 0, 0, 4 -> MSE 1.25, / 0.5 = 2.5
    assert result.terms["fmri"].item() == pytest.approx(2.5, abs=1e-7)
    # video: last frames (1, 1, 0), (0, 0, 2) vs 0 -> squared errors sum 6 over 6 -> 1.0, / 2 = 0.5
    assert result.terms["video"].item() == pytest.approx(0.5, abs=1e-7)
    # text: squared errors 0, 4, 0, 0 -> 1.0, / 4 = 0.25
    assert result.terms["text"].item() == pytest.approx(0.25, abs=1e-7)
    # audio: sample 0 uniform -> ln 4; sample 1 p(0) = 4/7 -> ln(7/4); mean ln(7)/2, / ln 4
    audio = math.log(7.0) / (2.0 * math.log(4.0))
    assert result.terms["audio"].item() == pytest.approx(audio, abs=1e-7)
    total = 1.0 * 2.5 + 2.0 * 0.5 + 0.5 * audio + 1.0 * 0.25
    assert result.total.item() == pytest.approx(total, abs=1e-6)


def test_a_weight_of_zero_drops_the_term() -> None:
    # A dropped term must not even be read: its prediction is NaN.
    out, batch = known_batch(video=torch.full((2, 3), float("nan")))
    variances = TargetVariances(fmri=0.5, video=2.0, text=4.0, audio=1.0)
    weights = {"fmri": 1.0, "video": 0.0, "audio": 0.0, "text": 1.0}
    result = NormalizedLoss(variances, weights, codebook_size=4)(out, batch)
    assert set(result.terms) == {"fmri", "text"}
    assert result.total.item() == pytest.approx(2.5 + 0.25, abs=1e-6)
    # A term left out of the weights counts as 0 too.
    result = NormalizedLoss(variances, {"text": 1.0}, codebook_size=4)(out, batch)
    assert set(result.terms) == {"text"}
    assert result.total.item() == pytest.approx(0.25, abs=1e-7)


def test_unknown_weight_names_the_valid_terms() -> None:
    with pytest.raises(ValueError) as info:
        NormalizedLoss(TargetVariances(1.0, 1.0, 1.0, 1.0), {"fmri": 1.0, "audoi": 1.0})
    assert str(info.value) == (
        "unknown loss terms ['audoi']; valid: ('fmri', 'video', 'audio', 'text')"
    )


def test_loss_is_differentiable_and_bf16_predictions_are_scored_in_float32() -> None:
    fmri = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16, requires_grad=True)
    out, batch = known_batch(fmri=fmri)
    variances = TargetVariances(fmri=0.5, video=2.0, text=4.0, audio=1.0)
    result = NormalizedLoss(variances, {"fmri": 1.0}, codebook_size=4)(out, batch)
    assert result.total.dtype == torch.float32
    result.total.backward()
    assert fmri.grad is not None and fmri.grad.dtype == torch.bfloat16
    # d/dpred of mean((pred - y)^2) / 0.5 = 2 (pred - y) / 4 / 0.5
    expected = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    assert torch.equal(fmri.grad.float(), expected)


# --------------------------------------------------------------------------- seed_compat audio


def test_seed_compat_audio_is_mse_over_the_code_variance() -> None:
    # Codes 0 and 3 equally often: mean 1.5, variance 2.25 (per codebook, then averaged).
    counts = np.array([[5, 0, 0, 5], [5, 0, 0, 5]])
    stats = {
        "fmri": {"var": np.ones(3)},
        "video": {"var": np.ones(3)},
        "text": {"var": np.ones(3)},
        "audio": {"counts": counts},
    }
    variances = TargetVariances.from_stats(stats)
    assert variances.audio == pytest.approx(2.25, abs=1e-12)
    codes = torch.tensor([[[0], [3]], [[3], [0]]])  # (B=2, n_q=2, C=1)
    loss = NormalizedLoss(variances, {"audio": 1.0}, codebook_size=4)
    result = loss(*audio_only(torch.full((2, 2), 1.5), codes))
    assert result.terms["audio"].item() == pytest.approx(1.0, abs=1e-7)


# ----------------------------------------------------------------------- degenerate statistics


@pytest.mark.parametrize("name", ["fmri", "video", "text"])
def test_from_stats_rejects_a_zero_variance_naming_the_modality(name: str) -> None:
    stats = store_stats(training_set())
    stats[name]["var"] = np.zeros_like(stats[name]["var"])
    with pytest.raises(ValueError) as info:
        TargetVariances.from_stats(stats)
    assert str(info.value) == (
        f"training variance of {name} is 0.0; the store's /stats/{name} is degenerate "
        f"(constant target?): rebuild the store"
    )


def test_from_stats_rejects_nan_and_a_constant_code() -> None:
    stats = store_stats(training_set())
    stats["text"]["var"] = np.full_like(stats["text"]["var"], np.nan)
    with pytest.raises(ValueError, match="training variance of text is nan"):
        TargetVariances.from_stats(stats)
    stats = store_stats(training_set())
    stats["audio"]["counts"] = np.zeros((2, 1024), dtype=np.int64)
    stats["audio"]["counts"][:, 17] = 40  # every code is 17
    with pytest.raises(ValueError, match="training variance of audio is 0.0"):
        TargetVariances.from_stats(stats)
