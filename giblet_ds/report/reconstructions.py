"""Reconstruction plots: run a trained model on a store split and draw what it predicts.

The model comes from :func:`giblet_ds.checkpoint.loading.load_model` (a ZeRO tag, consolidated
weights, or a run directory's best/newest tag). Writes, per sample: the video frame (ground truth vs
reconstruction at the frame's aspect ratio), the audio codes per codebook, the text embeddings with
cosine similarity, and an fMRI scatter with r; for the whole split: the per-voxel r map as NIfTI in
the store's mask space, drawn with nilearn (stat map over MNI152 and glass brain), a histogram,
``metrics.json`` and an ``index.html`` that shows every figure.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from giblet_ds.checkpoint.loading import load_model
from giblet_ds.config import cross_check
from giblet_ds.errors import CheckpointError
from giblet_ds.metrics import VoxelCorrelation
from giblet_ds.model.context import current_tr
from giblet_ds.report import sample_figures as figs
from giblet_ds.report.brain_maps import plot_brain_map, save_voxel_map
from giblet_ds.report.store_match import check_store_match
from giblet_ds.store import StoreDataset, load_mask, open_store
from giblet_ds.store.run_splits import with_split_runs

__all__ = ["ReconstructionResult", "render_reconstructions"]


@dataclass
class ReconstructionResult:
    out_dir: Path
    index_html: Path
    r_map: Path
    figures: list[Path] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


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
    verify: bool = True,
) -> ReconstructionResult:
    """Everything in the module docstring; returns where it went."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, location = load_model(checkpoint, config=config, device=dev, verify=verify)
    # a leave-one-run-out fold (data.split_runs) plots its own validation and test runs
    info = with_split_runs(open_store(store), cfg.data.split_runs)
    cross_check(cfg, store_sizes=info.model_input_sizes())
    match = check_store_match(location, cfg, info)  # another mask: refused here
    ds = StoreDataset.for_run(info, split, cfg)
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
            window_mask = batch.get("context_mask")  # the window's padding mask, when k > 1
            pred = model(
                batch["video"].to(dev),
                batch["audio_codes"].to(dev),
                batch["text"].to(dev),
                None if window_mask is None else window_mask.to(dev),
            )
            scores.update(pred.fmri.float().cpu(), batch["fmri"])
            for j, i in enumerate(items):
                if i in picks:
                    # the figures show TR t, the window's last TR (what the decoder rebuilds)
                    kept[i] = (current_tr({k: v[j] for k, v in batch.items()}, batched=False),
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
                        figs.video_figure(true_frame, pred["video"].reshape(h, w, 3).numpy(),
                                      out / f"{tag}_video.png", label)))  # fmt: skip
        figures.append((f"{label}: audio codes",
                        figs.audio_figure(sample["audio_codes"].numpy(),
                                      _codes(pred["audio"], info.n_q, info.code_frames),
                                      out / f"{tag}_audio.png", label)))  # fmt: skip
        figures.append((f"{label}: text embeddings",
                        figs.text_figure(sample["text"].numpy(),
                                     pred["text"].reshape(info.text_slots, info.text_dim).numpy(),
                                     sample["text_mask"].numpy(), out / f"{tag}_text.png", label)))  # fmt: skip
        figures.append((f"{label}: fMRI",
                        figs.fmri_figure(sample["fmri"].numpy(), pred["fmri"].numpy(),
                                     out / f"{tag}_fmri.png", label)))  # fmt: skip

    r = scores.per_voxel_r().numpy()
    summary = scores.compute()
    mask, affine = load_mask(info.path)
    r_map = save_voxel_map(r, mask, affine, out / "voxel_r.nii.gz")
    whole = f"{split} split, {n} TRs: mean r {summary.r_mean:.4f}"
    figures.append(("per-voxel r over the MNI152 template and as a glass brain (NIfTI: voxel_r.nii.gz)",
                    plot_brain_map(r_map, out / "voxel_r_brain.png", whole)))  # fmt: skip
    figures.append(
        ("histogram of per-voxel r", figs.histogram_figure(r, out / "voxel_r_hist.png", whole))
    )

    metrics = {
        "checkpoint": str(location.path),
        "store": str(info.path),
        "split": split,
        "n_trs": n,
        "n_voxels": info.n_voxels,
        **summary.as_dict(),
        "samples": [int(kept[i][0]["index"]) for i in picks],
        "store_match": match.as_dict(),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    index = _write_index(out, figures, metrics)
    return ReconstructionResult(out, index, r_map, [p for _, p in figures], metrics)


def _write_index(out: Path, figures: list[tuple[str, Path]], metrics: dict[str, Any]) -> Path:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in metrics.items()
    )
    note = (metrics.get("store_match") or {}).get("note")
    warning = f"<p style='color:#b00'><b>WARNING</b>: {html.escape(note)}</p>" if note else ""
    figures_html = "".join(
        f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, p in figures
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>giblet-ds reconstructions</title>"
        "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:1em;"
        "vertical-align:top}img{max-width:900px;border:1px solid #ccc}th{text-align:left;"
        "padding-right:1em}</style></head><body><h1>Reconstructions</h1>"
        f"{warning}<table>{rows}</table><p><a href='voxel_r.nii.gz'>voxel_r.nii.gz</a> (per-voxel r in "
        f"the store's mask space)</p>{figures_html}</body></html>\n"
    )
    path = out / "index.html"
    path.write_text(page)
    return path
