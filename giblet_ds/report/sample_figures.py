"""Per-sample reconstruction figures (video frame, audio codes, text embeddings, fMRI scatter) and
the per-voxel r histogram. Each function draws one PNG with matplotlib's Agg backend and returns
its path."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "audio_figure",
    "fmri_figure",
    "histogram_figure",
    "text_figure",
    "video_figure",
]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def video_figure(true: np.ndarray, pred: np.ndarray, path: Path, title: str) -> Path:
    plt = _pyplot()
    h, w = true.shape[:2]
    panel_w = 4.0
    fig, axes = plt.subplots(1, 2, figsize=(2 * panel_w, panel_w * h / w + 0.7),
                             constrained_layout=True)  # fmt: skip
    mse = float(np.mean((true - pred) ** 2))
    for ax, img, label in ((axes[0], true, "ground truth"), (axes[1], pred, f"reconstruction (MSE {mse:.4f})")):  # fmt: skip
        ax.imshow(np.clip(img, 0.0, 1.0), aspect="equal", interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def audio_figure(true: np.ndarray, pred: np.ndarray, path: Path, title: str) -> Path:
    plt = _pyplot()
    n_q, frames = true.shape
    fig, axes = plt.subplots(n_q, 1, figsize=(9, 1.1 * n_q + 0.8), sharex=True, squeeze=False,
                             constrained_layout=True)  # fmt: skip
    x = np.arange(frames)
    for q in range(n_q):
        ax = axes[q, 0]
        acc = float(np.mean(true[q] == pred[q]))
        ax.step(x, true[q], where="mid", lw=1.0, label="ground truth")
        ax.step(x, pred[q], where="mid", lw=1.0, alpha=0.8, label="predicted (argmax)")
        ax.set_ylabel(f"cb {q}", fontsize=8)
        ax.set_title(f"codebook {q}: {100 * acc:.0f}% codes exact", fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("code frame")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else math.nan


def text_figure(true: np.ndarray, pred: np.ndarray, mask: np.ndarray, path: Path,
                 title: str) -> Path:  # fmt: skip
    plt = _pyplot()
    slots = true.shape[0]
    fig, axes = plt.subplots(slots, 1, figsize=(9, 1.4 * slots + 0.8), sharex=True, squeeze=False,
                             constrained_layout=True)  # fmt: skip
    for k in range(slots):
        ax = axes[k, 0]
        ax.plot(true[k], lw=0.8, label="ground truth")
        ax.plot(pred[k], lw=0.8, alpha=0.8, label="reconstruction")
        cos = _cosine(true[k], pred[k])
        state = "annotation" if mask[k] else "empty slot (target zeros)"
        ax.set_title(f"slot {k} ({state}): cosine {cos:.3f}", fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("embedding dimension")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def fmri_figure(true: np.ndarray, pred: np.ndarray, path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), constrained_layout=True)
    r = float(np.corrcoef(true, pred)[0, 1]) if true.std() > 0 and pred.std() > 0 else math.nan
    ax.scatter(true, pred, s=4, alpha=0.4, edgecolors="none")
    lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.6, label="y = x")
    ax.set_xlabel("measured (z-scored BOLD)")
    ax.set_ylabel("predicted")
    ax.set_title(f"{title}\nr across {true.size:,} voxels = {r:.3f}", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def histogram_figure(r: np.ndarray, path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    ax.hist(r, bins=min(60, max(10, r.size // 20)), color="C0", alpha=0.8)
    for value, label, color in ((0.0, "0", "black"), (float(r.mean()), "mean", "C3"),
                                (float(np.median(r)), "median", "C2")):  # fmt: skip
        ax.axvline(value, color=color, lw=1, label=f"{label} {value:.3f}")
    ax.set_xlabel("per-voxel r (predicted vs measured over the split's TRs)")
    ax.set_ylabel("voxels")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)
