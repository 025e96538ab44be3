"""Reconstruction plots: run a trained model on a store split and draw what it predicts.

Loads the weights straight from a ZeRO tag (or a consolidated file, shard index or output folder, or
a run directory's best/latest tag) into a model rebuilt from the run config saved beside them
(``run_config.yaml`` in a tag, ``config.resolved.yaml`` in the run directory), streaming one tensor
at a time into the model's own storage. Writes, per sample: the video frame (ground truth vs
reconstruction at the frame's aspect ratio), the audio codes per codebook, the text embeddings
with cosine similarity, and an fMRI scatter with r; for the whole split: the per-voxel r map as
NIfTI in the store's mask space, slice views of it, a histogram, ``metrics.json`` and an
``index.html`` that shows every figure.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from giblet_ds.checkpoint_tools.safe_load import load_torch_file
from giblet_ds.checkpoint_tools.zero_reader import ZeroCheckpoint, is_zero_tag_dir, resolve_tag_dir
from giblet_ds.config import RunConfig, cross_check, load_config
from giblet_ds.errors import CheckpointError
from giblet_ds.metrics import VoxelCorrelation
from giblet_ds.model import GibletAutoencoder
from giblet_ds.store import StoreDataset, load_mask, open_store

__all__ = [
    "ReconstructionResult",
    "find_run_config",
    "iter_checkpoint_tensors",
    "load_model",
    "render_reconstructions",
]

_CONFIG_NAMES = ("run_config.yaml", "config.resolved.yaml")


@dataclass
class ReconstructionResult:
    out_dir: Path
    index_html: Path
    r_map: Path
    figures: list[Path] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# checkpoint and config


def _weights_location(path: Path) -> Path:
    """A run directory stands for its best tag (else latest); other paths are used as given."""
    ckpt = path / "checkpoints"
    if path.is_dir() and ckpt.is_dir():
        if is_zero_tag_dir(ckpt / "best"):
            return ckpt / "best"
        return resolve_tag_dir(ckpt)
    if path.is_dir() and (path / "latest").is_file():
        return resolve_tag_dir(path)
    return path


def find_run_config(checkpoint: Path) -> Path:
    """The run config saved with a checkpoint: in the tag/file's folder or up to 3 folders up."""
    start = checkpoint if checkpoint.is_dir() else checkpoint.parent
    searched = []
    for folder in [start, *list(start.parents)[:3]]:
        for name in _CONFIG_NAMES:
            candidate = folder / name
            searched.append(str(candidate))
            if candidate.is_file():
                return candidate
    raise CheckpointError(
        f"{checkpoint}: no run config found (searched {', '.join(searched)}); pass --config"
    )


def iter_checkpoint_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a ZeRO tag or consolidated weights, one tensor in memory at a time."""
    if path.is_dir() and is_zero_tag_dir(path):
        with ZeroCheckpoint(path) as ckpt:
            seen: set[int] = set()
            for name, entry in ckpt.state_dict_entries().items():
                if id(entry) not in seen:
                    seen.add(id(entry))
                    yield name, ckpt.read(entry)
        return
    if path.is_dir():
        for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json",
                     "model.safetensors", "pytorch_model.bin"):  # fmt: skip
            if (path / name).is_file():
                yield from iter_checkpoint_tensors(path / name)
                return
        raise CheckpointError(f"{path}: no ZeRO tag files and no consolidated weights here")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.name.endswith(".index.json"):
        try:
            files = dict.fromkeys(json.loads(path.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: not a shard index JSON ({exc})") from exc
        for f in files:
            yield from iter_checkpoint_tensors(path.parent / f)
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, fh.get_tensor(name)
        except (OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
    else:
        state = load_torch_file(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: holds {type(state).__name__}, not a state dict")
        for name, tensor in state.items():
            if isinstance(tensor, torch.Tensor):
                yield name, tensor


def load_model(
    checkpoint: str | Path, *, config: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[GibletAutoencoder, RunConfig, Path]:
    """The model of a checkpoint, weights loaded, in eval mode; with its config and weights path."""
    if not Path(checkpoint).exists():
        raise CheckpointError(f"{checkpoint}: no such file or folder")
    location = _weights_location(Path(checkpoint))
    config_path = Path(config) if config is not None else find_run_config(location)
    cfg = load_config(config_path)
    with torch.device("meta"):
        model = GibletAutoencoder(cfg.model)
    model = model.to_empty(device=device)
    target = model.state_dict()
    # to_empty leaves memory uninitialized; only what the state dict holds gets overwritten below
    transient = [n for n, _ in model.named_buffers() if n not in target]
    if transient:
        raise CheckpointError(
            f"model has non-persistent buffers {transient} a checkpoint cannot fill"
        )
    filled, unexpected = set(), []
    for name, tensor in iter_checkpoint_tensors(location):
        if name not in target:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(target[name].shape):
            raise CheckpointError(
                f"{location}: {name} has shape {tuple(tensor.shape)} but the model from "
                f"{config_path} expects {tuple(target[name].shape)}"
            )
        target[name].copy_(tensor)
        filled.add(name)
    # tied parameters appear under every name in state_dict(); one filled name covers them all
    by_ptr = {t.data_ptr() for n, t in target.items() if n in filled}
    missing = [n for n, t in target.items() if n not in filled and t.data_ptr() not in by_ptr]
    if missing or unexpected:
        raise CheckpointError(
            f"{location} does not match the model built from {config_path}: missing "
            f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected "
            f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    model.eval()
    return model, cfg, location


# ---------------------------------------------------------------------------------------------
# figures


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def _video_figure(true: np.ndarray, pred: np.ndarray, path: Path, title: str) -> Path:
    plt = _plt()
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


def _audio_figure(true: np.ndarray, pred: np.ndarray, path: Path, title: str) -> Path:
    plt = _plt()
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


def _text_figure(true: np.ndarray, pred: np.ndarray, mask: np.ndarray, path: Path,
                 title: str) -> Path:  # fmt: skip
    plt = _plt()
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


def _fmri_figure(true: np.ndarray, pred: np.ndarray, path: Path, title: str) -> Path:
    plt = _plt()
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


def _slices_figure(vol: np.ndarray, mask: np.ndarray, path: Path, title: str) -> Path:
    """Three orthogonal slices through the best voxel, then an axial montage (outside the mask
    left blank)."""
    plt = _plt()
    vol = np.where(mask, vol, np.nan)
    vmax = float(np.nanmax(np.abs(vol))) or 1.0
    best = np.unravel_index(int(np.nanargmax(vol)), vol.shape)
    z_slices = np.linspace(0, vol.shape[2] - 1, min(vol.shape[2], 8)).round().astype(int)
    fig, axes = plt.subplots(2, max(3, len(z_slices)), figsize=(2.2 * max(3, len(z_slices)), 5),
                             squeeze=False, constrained_layout=True)  # fmt: skip
    views = [(f"sagittal x={best[0]}", vol[best[0], :, :]),
             (f"coronal y={best[1]}", vol[:, best[1], :]),
             (f"axial z={best[2]}", vol[:, :, best[2]])]  # fmt: skip
    im = None
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (label, img) in zip(axes[0], views, strict=False):
        im = ax.imshow(img.T, origin="lower", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(label, fontsize=8)
    for ax, z in zip(axes[1], z_slices, strict=False):
        im = ax.imshow(vol[:, :, z].T, origin="lower", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(f"z={z}", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="per-voxel r")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _histogram_figure(r: np.ndarray, path: Path, title: str) -> Path:
    plt = _plt()
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


# ---------------------------------------------------------------------------------------------
# main entry


def _batch(ds: StoreDataset, items: list[int]) -> dict[str, torch.Tensor]:
    samples = [ds[i] for i in items]
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def _codes(audio: torch.Tensor, n_q: int, frames: int) -> np.ndarray:
    if audio.dim() == 3:  # (n_q, C, codebook) logits
        return audio.argmax(-1).cpu().numpy()
    return audio.reshape(n_q, frames).round().clamp(0, 1023).long().cpu().numpy()  # seed_compat


def render_reconstructions(
    checkpoint: str | Path,
    store: str | Path,
    out_dir: str | Path,
    *,
    split: str = "val",
    num_samples: int = 5,
    config: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 8,
) -> ReconstructionResult:
    """Everything in the module docstring; returns where it went."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, location = load_model(checkpoint, config=config, device=dev)
    info = open_store(store)
    cross_check(cfg, store_sizes=info.model_input_sizes())
    ds = StoreDataset(info.path, split, info=info, subject=cfg.data.subject)
    if len(ds) < 2:
        raise CheckpointError(f"{store}: split {split!r} has {len(ds)} TR(s); need at least 2")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(ds)
    picks = sorted({int(i) for i in np.linspace(0, n - 1, max(1, min(num_samples, n))).round()})
    scores = VoxelCorrelation(info.n_voxels)
    kept: dict[int, tuple[dict[str, torch.Tensor], Any]] = {}
    with torch.no_grad():
        for start in range(0, n, batch_size):
            items = list(range(start, min(n, start + batch_size)))
            batch = _batch(ds, items)
            pred = model(
                batch["video"].to(dev), batch["audio_codes"].to(dev), batch["text"].to(dev)
            )
            scores.update(pred.fmri.float().cpu(), batch["fmri"])
            for j, i in enumerate(items):
                if i in picks:
                    kept[i] = ({k: v[j] for k, v in batch.items()},
                               {k: getattr(pred, k)[j].float().cpu() for k in ("fmri", "video", "audio", "text")})  # fmt: skip
    ds.close()

    figures: list[tuple[str, Path]] = []
    h, w = info.height, info.width
    for i in picks:
        sample, pred = kept[i]
        tr = int(sample["index"])
        tag = f"sample_{i:03d}_tr{tr:05d}"
        label = f"{split} TR {tr} (item {i})"
        true_frame = sample["video"][-1].numpy()
        figures.append((f"{label}: video, last frame of the TR window",
                        _video_figure(true_frame, pred["video"].reshape(h, w, 3).numpy(),
                                      out / f"{tag}_video.png", label)))  # fmt: skip
        figures.append((f"{label}: audio codes",
                        _audio_figure(sample["audio_codes"].numpy(),
                                      _codes(pred["audio"], info.n_q, info.code_frames),
                                      out / f"{tag}_audio.png", label)))  # fmt: skip
        figures.append((f"{label}: text embeddings",
                        _text_figure(sample["text"].numpy(),
                                     pred["text"].reshape(info.text_slots, info.text_dim).numpy(),
                                     sample["text_mask"].numpy(), out / f"{tag}_text.png", label)))  # fmt: skip
        figures.append((f"{label}: fMRI",
                        _fmri_figure(sample["fmri"].numpy(), pred["fmri"].numpy(),
                                     out / f"{tag}_fmri.png", label)))  # fmt: skip

    r = scores.per_voxel_r().numpy()
    summary = scores.compute()
    mask, affine = load_mask(info.path)
    vol = np.zeros(mask.shape, dtype=np.float32)
    vol[mask] = r  # the store's voxel order is the mask's C order
    import nibabel as nib

    r_map = out / "voxel_r.nii.gz"
    nib.save(nib.Nifti1Image(vol, affine), str(r_map))
    whole = f"{split} split, {n} TRs: mean r {summary.r_mean:.4f}"
    figures.append(("per-voxel r on brain slices (NIfTI: voxel_r.nii.gz)",
                    _slices_figure(vol, mask, out / "voxel_r_slices.png", whole)))  # fmt: skip
    figures.append(
        ("histogram of per-voxel r", _histogram_figure(r, out / "voxel_r_hist.png", whole))
    )

    metrics = {
        "checkpoint": str(location),
        "store": str(info.path),
        "split": split,
        "n_trs": n,
        "n_voxels": info.n_voxels,
        **summary.as_dict(),
        "samples": [int(kept[i][0]["index"]) for i in picks],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    index = _write_index(out, figures, metrics)
    return ReconstructionResult(out, index, r_map, [p for _, p in figures], metrics)


def _write_index(out: Path, figures: list[tuple[str, Path]], metrics: dict[str, Any]) -> Path:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in metrics.items()
    )
    figs = "".join(
        f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, p in figures
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>giblet-ds reconstructions</title>"
        "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:1em;"
        "vertical-align:top}img{max-width:900px;border:1px solid #ccc}th{text-align:left;"
        "padding-right:1em}</style></head><body><h1>Reconstructions</h1>"
        f"<table>{rows}</table><p><a href='voxel_r.nii.gz'>voxel_r.nii.gz</a> (per-voxel r in "
        f"the store's mask space)</p>{figs}</body></html>\n"
    )
    path = out / "index.html"
    path.write_text(page)
    return path
