"""Planted fMRI: BOLD that is a known HRF-convolved linear function of the stimulus features.

Grid: the 3 mm MNI space of the Sherlock files (61 x 73 x 61), inside nilearn's bundled MNI152
brain mask resampled to it. Each feature drives Gaussian blobs where a neuroscientist would expect
it (luminance: early visual cortex; motion: MT; loudness: auditory cortex; speech: left temporal
and frontal language areas; people: fusiform). Per subject: baseline intensity, 1 % signal change
per unit, AR(1) noise and slow drift, all different per subject.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from giblet_ds.demo_data.hrf import convolve_causal, glover_hrf

__all__ = ["GRID", "AFFINE", "BLOBS", "mni_mask", "weight_maps", "Subject", "plant_subjects"]

GRID = (61, 73, 61)
# MNI152 3 mm as distributed with FSL (and the Sherlock files): x runs right to left.
AFFINE = np.array(
    [[-3.0, 0.0, 0.0, 90.0], [0.0, 3.0, 0.0, -126.0], [0.0, 0.0, 3.0, -72.0], [0.0, 0.0, 0.0, 1.0]]
)

# feature -> (x, y, z in mm, amplitude, sigma in mm) blobs
BLOBS: dict[str, tuple[tuple[float, float, float, float, float], ...]] = {
    "luminance": ((-10, -94, 2, 1.0, 12), (10, -94, 2, 1.0, 12)),
    "motion": ((-45, -70, 2, 1.0, 10), (45, -70, 2, 1.0, 10)),
    "loudness": ((-52, -22, 8, 1.0, 10), (52, -22, 8, 1.0, 10)),
    "speech": ((-58, -40, 6, 1.0, 10), (-48, 18, 14, 0.7, 10)),
    "people": ((-40, -52, -18, 0.8, 8), (40, -52, -18, 0.8, 8)),
}


def mni_mask() -> np.ndarray:
    """nilearn's bundled MNI152 brain mask, resampled (nearest) to the 3 mm grid."""
    from nilearn.datasets import load_mni152_brain_mask
    from nilearn.image import resample_img

    mask = resample_img(
        load_mni152_brain_mask(resolution=2),
        target_affine=AFFINE,
        target_shape=GRID,
        interpolation="nearest",
        force_resample=True,
        copy_header=True,
    )
    return np.asarray(mask.dataobj) > 0


def weight_maps(mask: np.ndarray, features: tuple[str, ...]) -> np.ndarray:
    """Planted weights (n_features, V) over the voxels of ``mask`` (C order)."""
    ijk = np.argwhere(mask)
    xyz = ijk @ AFFINE[:3, :3].T + AFFINE[:3, 3]
    weights = np.zeros((len(features), len(ijk)))
    for f, name in enumerate(features):
        for x, y, z, amplitude, sigma in BLOBS[name]:
            d2 = ((xyz - np.array([x, y, z])) ** 2).sum(axis=1)
            weights[f] += amplitude * np.exp(-d2 / (2 * sigma**2))
    return weights


@dataclass
class Subject:
    """One planted subject: raw BOLD inside the mask (n_volumes, V) float32."""

    name: str
    bold: np.ndarray


def plant_subjects(
    features: np.ndarray,
    weights: np.ndarray,
    *,
    tr: float,
    n_volumes: tuple[int, ...],
    noise_sd: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[Subject]]:
    """Noise-free response (max volumes, V) and each subject's noisy raw BOLD.

    The stimulus (``features``, one row per movie TR) starts with volume 0; after the movie the
    features are 0 (their mean). response = causal HRF convolution of ``features @ weights``.
    """
    n_max = max(n_volumes)
    x = np.zeros((n_max, features.shape[1]))
    x[: min(n_max, len(features))] = features[:n_max]
    response = convolve_causal(x, glover_hrf(tr)) @ weights  # (n_max, V)
    n_vox = weights.shape[1]
    subjects = []
    for index, n in enumerate(n_volumes):
        baseline = rng.uniform(600.0, 1200.0, size=n_vox) * rng.uniform(0.9, 1.1)
        noise = np.empty((n, n_vox))
        noise[0] = rng.standard_normal(n_vox)
        for t in range(1, n):  # AR(1): scanner noise is temporally correlated
            noise[t] = 0.3 * noise[t - 1] + np.sqrt(1 - 0.09) * rng.standard_normal(n_vox)
        ramp = np.linspace(-1.0, 1.0, n)[:, None]
        wave = np.cos(np.linspace(0.0, np.pi, n))[:, None]
        drift = ramp * rng.normal(0, 0.3, n_vox) + wave * rng.normal(0, 0.3, n_vox)
        signal = response[:n] + noise_sd * noise + drift
        bold = baseline * (1.0 + 0.01 * signal)
        subjects.append(Subject(f"demo_movie_s{index + 1}", bold.astype(np.float32)))
    return response, subjects
