"""Tiny schema-valid stores written directly, without raw media: fixtures for fast tests.

The fMRI is planted as a known linear function of the same latent that generates the stimulus
features, plus noise, so a model trained on the store can learn it and a test can see r > 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from giblet_ds.errors import ConfigError
from giblet_ds.store import schema
from giblet_ds.store.builder.hashing import build_sha256, settings_sha256
from giblet_ds.store.builder.normalize import zscore_train
from giblet_ds.store.builder.splits import make_splits
from giblet_ds.store.builder.writer import StoreWriter
from giblet_ds.store.layout import StoreLayout
from giblet_ds.store.reader import open_store

__all__ = ["write_synthetic_store", "synthetic_mask_shape"]

_LATENT = 4


def synthetic_mask_shape(n_voxels: int) -> tuple[int, int, int]:
    """Smallest (a, a+1, a+2) box that holds ``n_voxels`` (unequal axes catch swapped ones)."""
    a = 1
    while a * (a + 1) * (a + 2) < n_voxels:
        a += 1
    return (a, a + 1, a + 2)


def write_synthetic_store(
    path: str | Path,
    *,
    n_trs: int = 37,
    n_voxels: int = 23,
    n_frames: int = 2,
    height: int = 6,
    width: int = 10,
    n_q: int = 2,
    code_frames: int = 5,
    text_slots: int = 2,
    text_dim: int = 7,
    n_subjects: int = 2,
    lag: int = 3,
    split_gap: int = 2,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    tr: float = 1.5,
    noise: float = 0.3,
    seed: int = 0,
) -> Path:
    """Write a complete store at ``path`` with a planted stimulus -> fMRI relation; return the path.

    A latent z_t (4 smooth random series) drives the frames, text embeddings, audio codes and the
    fMRI (``z_t @ W`` plus per-subject noise, gain and offset, then z-scored on train TRs as a real
    build does). The default 37 TRs with ``split_gap=2`` give 23/5/5 train/val/test TRs. ``lag`` is
    recorded only: the fMRI is already paired with its stimulus TR, as in a real store.
    """
    if min(n_trs, n_voxels, n_frames, height, width, n_q, code_frames, text_slots, text_dim) < 1:
        raise ConfigError("write_synthetic_store sizes must all be >= 1")
    if n_subjects < 1:
        raise ConfigError(f"n_subjects must be >= 1, got {n_subjects}")
    settings = {
        "kind": "synthetic",
        "n_trs": n_trs,
        "n_voxels": n_voxels,
        "n_frames": n_frames,
        "height": height,
        "width": width,
        "n_q": n_q,
        "code_frames": code_frames,
        "text_slots": text_slots,
        "text_dim": text_dim,
        "n_subjects": n_subjects,
        "lag": lag,
        "split_gap": split_gap,
        "split_fractions": list(split_fractions),
        "tr": tr,
        "noise": noise,
        "seed": seed,
    }
    rng = np.random.default_rng(seed)
    splits = make_splits(n_trs, split_fractions, split_gap)

    # Smooth latent: an AR(1) walk, standardized, so neighbouring TRs resemble each other.
    latent = np.zeros((n_trs, _LATENT))
    for t in range(n_trs):
        prev = latent[t - 1] if t else np.zeros(_LATENT)
        latent[t] = 0.6 * prev + rng.standard_normal(_LATENT)
    latent = (latent - latent.mean(0)) / latent.std(0)

    pixels = rng.standard_normal((_LATENT, height * width * 3)) / np.sqrt(_LATENT)
    frame_noise = rng.standard_normal((n_trs, n_frames, height * width * 3)) * 0.2
    video = 128 + 50 * (latent @ pixels)[:, None, :] + 50 * frame_noise
    video = np.clip(np.rint(video), 0, 255).astype(np.uint8)
    video = video.reshape(n_trs, n_frames, height, width, 3)

    text_mask = np.ones((n_trs, text_slots), dtype=bool)
    text_mask[:, 1:] = rng.random((n_trs, text_slots - 1)) < 0.5
    text_weights = rng.standard_normal((text_slots, _LATENT, text_dim)) / np.sqrt(_LATENT)
    text = np.einsum("tl,kld->tkd", latent, text_weights)
    text += 0.1 * rng.standard_normal(text.shape)
    text = np.where(text_mask[..., None], text, 0.0).astype(np.float32)

    code_weights = rng.standard_normal((n_q, _LATENT))
    level = (np.tanh(latent @ code_weights.T) + 1) / 2 * (schema.N_CODES - 1)  # (T, n_q)
    offsets = rng.integers(0, schema.N_CODES, size=(n_q, code_frames))
    codes = (np.rint(level)[..., None].astype(np.int64) + offsets) % schema.N_CODES

    voxel_weights = rng.standard_normal((_LATENT, n_voxels))
    signal = latent @ voxel_weights
    mask_shape = synthetic_mask_shape(n_voxels)
    mask = np.zeros(int(np.prod(mask_shape)), dtype=bool)
    mask[rng.permutation(mask.size)[:n_voxels]] = True
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-90.0, -126.0, -72.0]

    subjects = tuple(f"sub-{i + 1:02d}" for i in range(n_subjects))
    layout = StoreLayout(
        n_trs=n_trs,
        n_frames=n_frames,
        height=height,
        width=width,
        n_q=n_q,
        code_frames=code_frames,
        text_slots=text_slots,
        text_dim=text_dim,
        subjects=subjects,
        n_voxels=n_voxels,
        mask_shape=mask_shape,
    )
    settings_hash = settings_sha256(settings)
    with StoreWriter(
        path, layout, mask=mask.reshape(mask_shape), affine=affine, splits=splits
    ) as writer:
        writer.write_video(0, video)
        writer.write_audio_codes(codes)
        writer.write_text(text, text_mask)
        for index in range(n_subjects):
            gain = rng.uniform(50, 150, size=n_voxels)
            offset = rng.uniform(500, 1500, size=n_voxels)
            raw = offset + gain * (signal + noise * rng.standard_normal(signal.shape))
            zscored, mean, std = zscore_train(raw, splits["train"])
            writer.write_subject(index, zscored, mean, std)
        return writer.finish(
            {
                "tr": float(tr),
                "fps": n_frames / tr,
                "frame_skip": 1,
                "lag": int(lag),
                "split_gap": int(split_gap),
                "split_fractions": list(split_fractions),
                "encodec_model": "synthetic",
                "encodec_bandwidth": 0.0,
                "encodec_pretrained": False,
                "clip_model": "synthetic",
                "clip_pretrained": False,
                "synthetic": True,
                "input_hashes": {},
                "settings": settings,
                "settings_hash": settings_hash,
                "build_hash": build_sha256(settings_hash, {}, schema.SCHEMA_VERSION),
            },
            validate=open_store,  # as the real builder: a store the reader refuses is never published
        )
