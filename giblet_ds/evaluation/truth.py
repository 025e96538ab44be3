"""The planted ground truth of a store's raw data, when it came with one (the demo).

``tools/make_demo_data.py`` writes ``ground_truth.json`` (with the SHA-256 of every NIfTI it made)
and ``ground_truth.npz`` (the noise-free planted response per volume over its own mask). A truth
is used for a store only when those hashes equal the store's recorded input hashes
(``input_hashes`` attribute): the oracle is then the true response at the volumes the store paired
with each TR (volume = t + the first paired volume), in the store's mask voxels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from giblet_ds.errors import GibletError
from giblet_ds.store import StoreInfo, load_mask

__all__ = ["GroundTruth", "find_ground_truth", "oracle_series"]


@dataclass
class GroundTruth:
    json_path: Path
    npz_path: Path


def _store_fmri_hashes(info: StoreInfo) -> set[str]:
    hashes = info.attrs.get("input_hashes") or {}
    return {v["sha256"] for k, v in hashes.items() if k.startswith("fmri:") and "sha256" in v}


def _matches(json_path: Path, info: StoreInfo) -> bool:
    try:
        recorded = json.loads(json_path.read_text()).get("fmri_sha256") or {}
    except (OSError, json.JSONDecodeError):
        return False
    store = _store_fmri_hashes(info)
    return bool(store) and set(recorded.values()) == store


def find_ground_truth(info: StoreInfo, explicit: str | Path | None = None) -> GroundTruth | None:
    """The truth of this store's raw data: ``explicit`` (a ground_truth.json; an error when it
    does not belong to the store), else one found beside the store or one folder below it."""
    if explicit is not None:
        path = Path(explicit)
        path = path / "ground_truth.json" if path.is_dir() else path.with_suffix(".json")
        if not path.is_file() or not path.with_suffix(".npz").is_file():
            raise GibletError(f"--truth {explicit}: no ground_truth.json with its .npz there")
        if not _matches(path, info):
            raise GibletError(
                f"--truth {path}: its NIfTI hashes (fmri_sha256) are not the store's input "
                f"hashes; {info.path} was built from other fMRI files"
            )
        return GroundTruth(path, path.with_suffix(".npz"))
    folder = info.path.parent
    for path in sorted([folder / "ground_truth.json", *folder.glob("*/ground_truth.json")]):
        if path.is_file() and path.with_suffix(".npz").is_file() and _matches(path, info):
            return GroundTruth(path, path.with_suffix(".npz"))
    return None


def oracle_series(truth: GroundTruth, info: StoreInfo, rows: np.ndarray) -> np.ndarray:
    """The planted noise-free response (len(rows), V) at the store's TRs ``rows`` and mask voxels
    (0 at store voxels outside the truth's mask)."""
    first = int((info.attrs.get("fmri_volumes") or [info.lag])[0])
    with np.load(truth.npz_path) as saved:
        response = np.asarray(saved["response"], np.float32)
        truth_mask = np.asarray(saved["mask"], bool)
    store_mask, _ = load_mask(info.path)
    if truth_mask.shape != store_mask.shape:
        raise GibletError(
            f"{truth.npz_path}: mask shape {truth_mask.shape} is not the store's {store_mask.shape}"
        )
    volumes = np.asarray(rows) + first
    if volumes.max() >= len(response):
        raise GibletError(
            f"{truth.npz_path}: holds {len(response)} volumes, need {volumes.max() + 1}"
        )
    # truth voxel number of every grid point, then read it at the store's mask voxels
    lookup = np.full(truth_mask.shape, -1, np.int64)
    lookup[truth_mask] = np.arange(int(truth_mask.sum()))
    where = lookup[store_mask]
    out = np.zeros((len(volumes), len(where)), np.float32)
    inside = where >= 0
    out[:, inside] = response[volumes][:, where[inside]]
    return out
