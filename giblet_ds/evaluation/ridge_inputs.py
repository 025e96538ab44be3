"""The ridge baseline's inputs: the store's own stimulus features, per TR, with FIR delays.

Three bands, each from what the model also sees (never from anything planted):
- video: the TR's frames averaged and area-pooled to 9 x 16 RGB (432), and the mean absolute
  frame-to-frame change pooled to 9 x 16 grey (144: where things move);
- audio: per codebook, the histogram of the TR's EnCodec codes (n_q x 1024, fractions);
- text: the mean of the TR's annotation embeddings (D), 0 where none.
Each feature is z-scored on the training TRs and each band scaled by 1 / sqrt(its width), so every
band carries the same total variance whatever its size. FIR delays: store row t holds the fMRI
volume t + lag; the volume responds to the stimulus 0..8 TRs before it (0-12 s at TR 1.5 s, the
span of the hemodynamic response), i.e. to feature rows t + lag - d for each delay d.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from giblet_ds.store import StoreInfo
from giblet_ds.store import schema as store_schema
from giblet_ds.store.reader import open_read_only

__all__ = ["RIDGE_FEATURE_VERSION", "band_features", "delayed", "ridge_design"]

RIDGE_FEATURE_VERSION = 1
"""Part of the cache key: bump when the features change."""
POOLED = (9, 16)
DELAYS_S = 12.0
_BLOCK = 64


def _video_features(frames: np.ndarray) -> np.ndarray:
    """(B, F, H, W, 3) uint8 -> (B, 432 + 144) float32."""
    x = torch.from_numpy(frames).float().div_(255.0)  # (B, F, H, W, 3)
    b, f = x.shape[:2]
    pooled = torch.nn.functional.adaptive_avg_pool2d(x.mean(1).permute(0, 3, 1, 2), POOLED).reshape(
        b, -1
    )
    grey = x.mean(-1)  # (B, F, H, W)
    change = (grey[:, 1:] - grey[:, :-1]).abs().mean(1) if f > 1 else torch.zeros_like(grey[:, 0])
    motion = torch.nn.functional.adaptive_avg_pool2d(change[:, None], POOLED).reshape(b, -1)
    return torch.cat([pooled, motion], 1).numpy()


def _audio_features(codes: np.ndarray, codebook_size: int = 1024) -> np.ndarray:
    """(B, n_q, C) codes -> (B, n_q * codebook_size) fraction of the TR's frames per code."""
    b, n_q, c = codes.shape
    out = np.zeros((b, n_q, codebook_size), np.float32)
    rows = np.repeat(np.arange(b), n_q * c)
    books = np.tile(np.repeat(np.arange(n_q), c), b)
    np.add.at(out, (rows, books, codes.reshape(-1).astype(np.int64)), 1.0 / c)
    return out.reshape(b, -1)


def _text_features(text: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(B, K, D), (B, K) -> (B, D) mean of the real annotation rows."""
    weights = mask.astype(np.float32)
    count = np.maximum(weights.sum(1, keepdims=True), 1.0)
    return (text * weights[..., None]).sum(1) / count


def band_features(info: StoreInfo) -> dict[str, np.ndarray]:
    """Every store TR's features per band, float32 (T, width), before standardization."""
    parts: dict[str, list[np.ndarray]] = {"video": [], "audio": [], "text": []}
    with open_read_only(info.path) as handle:
        for first in range(0, info.n_trs, _BLOCK):
            rows = slice(first, min(info.n_trs, first + _BLOCK))
            parts["video"].append(_video_features(handle[store_schema.VIDEO][rows]))
            parts["audio"].append(_audio_features(handle[store_schema.AUDIO_CODES][rows]))
            parts["text"].append(
                _text_features(
                    handle[store_schema.TEXT][rows], handle[store_schema.TEXT_MASK][rows]
                )
            )
    return {name: np.concatenate(blocks) for name, blocks in parts.items()}


def delays_for(tr: float) -> list[int]:
    """Delays in TRs, 0 .. ceil(12 s / TR)."""
    return list(range(int(np.ceil(DELAYS_S / tr - 1e-9)) + 1))


def delayed(features: np.ndarray, shifts: list[int]) -> np.ndarray:
    """(T, F) -> (T, len(shifts) * F): block j holds features[t - shifts[j]] (0 outside [0, T))."""
    n = len(features)
    out = np.zeros((n, len(shifts) * features.shape[1]), features.dtype)
    width = features.shape[1]
    for j, s in enumerate(shifts):
        block = out[:, j * width : (j + 1) * width]
        if s >= 0:
            block[s:] = features[: n - s] if s < n else 0
        else:
            block[: n + s] = features[-s:]
    return out


def ridge_design(info: StoreInfo) -> tuple[np.ndarray, dict[str, object]]:
    """The delayed, standardized design matrix over every store TR (T, n_features) float32, and
    a description of it (bands, widths, delays) that also keys the cache."""
    bands = band_features(info)
    train = np.asarray(info.splits["train"])
    scaled = []
    for values in bands.values():
        mean = values[train].mean(0)
        sd = values[train].std(0)
        z = (values - mean) / np.where(sd > 0, sd, 1.0)
        z[:, sd == 0] = 0.0  # constant on training TRs: carries nothing the fit could use
        scaled.append(z / np.sqrt(values.shape[1]))
    x = np.concatenate(scaled, 1).astype(np.float32)
    delays = delays_for(info.tr)
    # feature row r = t + lag - d  <=>  shift of the feature series by (d - lag); within each run
    # only (/runs): a delay never reaches into the neighbouring scan, whose rows are adjacent
    shifts = [d - info.lag for d in delays]
    runs = info.runs
    design = np.concatenate(
        [delayed(x[int(a) : int(b)], shifts) for a, b in zip(runs.first, runs.stop, strict=True)]
    )
    description: dict[str, object] = {
        "version": RIDGE_FEATURE_VERSION,
        "bands": {name: int(v.shape[1]) for name, v in bands.items()},
        "delays_trs": delays,
        "lag": info.lag,
    }
    if len(runs) > 1:  # one-run stores keep their cache key
        description["runs"] = runs.n_trs.tolist()
    if info.split_override is not None:  # a fold's training runs: its own fit and cache
        description["split_runs"] = info.split_override
    return design, description


def description_hash(description: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]
