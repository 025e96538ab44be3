"""``make_demo_data``: raw files in the Sherlock formats with a known answer, made on the machine.

Writes into OUT_DIR:
  stimuli_demo.m4v           the movie (real footage + narration), 640 x 360, 25 fps, H.264 + AAC
  annotations.xlsx           the lab's columns, header spaces and a repeated block of rows
  demo_nii/demo_movie_sN.nii.gz   4-D BOLD per subject, 61 x 73 x 61, 3 mm MNI, TR 1.5 s
  ground_truth.npz           planted weights, features, noise-free response, mask
  ground_truth.json          parameters, feature names, oracle correlations
  roi_mask.nii.gz            voxels with planted signal (optional small mask for quick builds)
  demo_build.yaml            the fast demo build settings for tools/build_store.py --config
Re-running with the same parameters finds the files up to date and does nothing.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from giblet_ds.demo_data import brain, movie, sheet, sources
from giblet_ds.demo_data.features import FEATURES, stimulus_features
from giblet_ds.errors import GibletError
from giblet_ds.store.builder.hashing import file_sha256
from giblet_ds.store.builder.splits import make_splits, min_real_gap

__all__ = ["DemoParams", "DemoPaths", "DEMO_BUILD_SETTINGS", "make_demo_data", "oracle_scores"]

DEMO_BUILD_SETTINGS: dict[str, Any] = {
    # Fast on 2 CPU cores: random-weight EnCodec (4 codebooks) and the smallest open_clip text
    # tower (256-d) instead of ViT-H-14; half-size frames. Real builds keep the defaults.
    "tr": 1.5,
    "lag": 3,
    "frame_skip": 4,
    "frame_height": 45,
    "frame_width": 80,
    "encodec_bandwidth": 3.0,
    "clip_model": "ViT-S-32-alt",
    "pretrained": False,
    "annotations_per_tr": 3,
    # 450 s -> 300 TRs: a test split of >= 50 TRs (14 TRs let the oracle's own r range 0.12-0.52)
    "split_fractions": [0.65, 0.15, 0.2],
}


@dataclass(frozen=True)
class DemoParams:
    """What the demo is made from; a change regenerates everything."""

    duration_s: float = 450.0
    tr: float = 1.5
    lag: int = 3
    n_subjects: int = 3
    noise_sd: float = 0.7
    seed: int = 0
    version: int = 2


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo files are."""

    root: Path
    video: Path
    annotations: Path
    fmri: tuple[Path, ...]
    truth_json: Path
    truth_npz: Path
    roi_mask: Path
    settings_yaml: Path

    def build_command(self, out: str | Path) -> list[str]:
        """The tools/build_store.py arguments that build the demo store at ``out``."""
        return [
            "--video", str(self.video), "--annotations", str(self.annotations),
            "--fmri", *map(str, self.fmri), "--config", str(self.settings_yaml), "--out", str(out),
        ]  # fmt: skip


def _paths(root: Path, n_subjects: int) -> DemoPaths:
    return DemoPaths(
        root=root,
        video=root / "stimuli_demo.m4v",
        annotations=root / "annotations.xlsx",
        fmri=tuple(root / "demo_nii" / f"demo_movie_s{k + 1}.nii.gz" for k in range(n_subjects)),
        truth_json=root / "ground_truth.json",
        truth_npz=root / "ground_truth.npz",
        roi_mask=root / "roi_mask.nii.gz",
        settings_yaml=root / "demo_build.yaml",
    )


def _log(message: str) -> None:
    print(f"[make_demo_data] {message}", file=sys.stderr, flush=True)


def _up_to_date(paths: DemoPaths, params: DemoParams) -> bool:
    files = [paths.video, paths.annotations, *paths.fmri, paths.truth_npz, paths.roi_mask]
    if not paths.truth_json.is_file() or not all(p.is_file() for p in files):
        return False
    try:
        recorded = json.loads(paths.truth_json.read_text()).get("params")
    except json.JSONDecodeError:
        return False
    return recorded == asdict(params)


def make_demo_data(out_dir: str | Path, params: DemoParams | None = None) -> DemoPaths:
    """Make (or find up to date) the demo's raw files in ``out_dir``; see the module doc."""
    params = params or DemoParams()
    if params.duration_s < 60 or params.n_subjects < 1 or params.noise_sd < 0:
        raise GibletError(
            f"demo needs duration_s >= 60 (splits with gaps), n_subjects >= 1 and noise_sd >= 0; "
            f"got {params.duration_s}, {params.n_subjects}, {params.noise_sd}"
        )
    root = Path(out_dir)
    paths = _paths(root, params.n_subjects)
    if _up_to_date(paths, params):
        _log(f"{root} is up to date; nothing to do")
        return paths
    sources.check_sources()
    root.mkdir(parents=True, exist_ok=True)
    (root / "demo_nii").mkdir(exist_ok=True)
    rng = np.random.default_rng(params.seed)
    clock = time.perf_counter()

    segments = sources.schedule(params.duration_s)
    lines = sources.narration(segments)
    track, spoken = movie.soundtrack(segments, lines, rng)
    movie.render_movie(segments, track, paths.video)
    _log(f"movie: {params.duration_s:.0f} s, {len(segments)} shots, {len(lines)} narrated lines "
         f"({time.perf_counter() - clock:.1f} s)")  # fmt: skip
    sheet.write_xlsx(paths.annotations, sheet.annotation_rows(segments, spoken))

    n_movie_trs = math.floor(params.duration_s / params.tr + 1e-9)
    features = stimulus_features(
        paths.video, track, segments, spoken, tr=params.tr, n_trs=n_movie_trs
    )
    mask = brain.mni_mask()
    weights = brain.weight_maps(mask, FEATURES)
    extras = (4, 6, 9)  # uneven scan lengths: the build crops to the common TRs
    n_volumes = tuple(
        n_movie_trs + max(params.lag + 1, extras[k % 3]) for k in range(params.n_subjects)
    )
    response, subjects = brain.plant_subjects(
        features, weights, tr=params.tr, n_volumes=n_volumes, noise_sd=params.noise_sd, rng=rng
    )
    for subject, path in zip(subjects, paths.fmri, strict=True):
        _save_nifti(path, subject.bold, mask, params.tr)
    _save_nifti(paths.roi_mask, None, np.zeros(mask.shape, bool) | _roi(mask, weights), params.tr)
    _log(f"fMRI: {params.n_subjects} subjects, {int(mask.sum())} voxels, volumes {n_volumes} "
         f"({time.perf_counter() - clock:.1f} s)")  # fmt: skip

    scores = oracle_scores(response, subjects, features, weights, lag=params.lag, n_trs=n_movie_trs)
    np.savez_compressed(
        paths.truth_npz,
        weights=weights.astype(np.float32),
        features=features.astype(np.float32),
        response=response.astype(np.float16),
        mask=mask,
        affine=brain.AFFINE,
        feature_names=np.array(FEATURES),
    )
    truth = {
        "params": asdict(params),
        "features": list(FEATURES),
        "blobs_mm": {k: [list(b) for b in v] for k, v in brain.BLOBS.items()},
        "hrf": "Glover (1999) double gamma on the TR grid, causal, peak 4 TRs (6 s) after onset",
        "model": "bold = baseline * (1 + 1% * (hrf * (features @ weights) + noise_sd * AR(1) "
        "noise + drift)); stimulus TR t starts at volume t",
        "n_volumes": list(n_volumes),
        "n_voxels": int(mask.sum()),
        # what ties this truth to a store: giblet_ds.evaluation.truth compares these with the
        # store's recorded input hashes before it reports an oracle
        "fmri_sha256": {p.name: file_sha256(p) for p in paths.fmri},
        "oracle": scores,
        "movie": {
            "seconds": params.duration_s,
            "shots": [[s.clip.file, s.onset, s.duration] for s in segments],
            "narration": [[line.onset, length, line.text] for line, length in spoken],
        },
    }
    paths.truth_json.write_text(json.dumps(truth, indent=2))
    import yaml

    paths.settings_yaml.write_text(
        "# Fast demo build (see giblet_ds/demo_data/make.py): RANDOM EnCodec and CLIP weights.\n"
        + yaml.safe_dump({**DEMO_BUILD_SETTINGS, "tr": params.tr, "lag": params.lag})
    )
    _log(f"wrote {root} in {time.perf_counter() - clock:.1f} s; oracle r (subject mean, "
         f"responsive voxels) {scores['mean_subjects']['r_mean_responsive']:.3f}")  # fmt: skip
    return paths


def _roi(mask: np.ndarray, weights: np.ndarray) -> np.ndarray:
    roi = np.zeros(mask.shape, dtype=bool)
    roi[mask] = np.abs(weights).max(axis=0) > 0.05
    return roi


def _save_nifti(path: Path, bold: np.ndarray | None, mask: np.ndarray, tr: float) -> None:
    import nibabel as nib

    if bold is None:
        data = mask.astype(np.uint8)
    else:
        data = np.zeros((*mask.shape, bold.shape[0]), dtype=np.float32)
        data[mask] = bold.T
    img = nib.Nifti1Image(data, brain.AFFINE)
    img.header.set_xyzt_units("mm", "sec")
    if bold is not None:
        img.header.set_zooms((3.0, 3.0, 3.0, tr))
    nib.save(img, str(path))


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    denom = np.sqrt((a**2).sum(0) * (b**2).sum(0))
    return np.where(denom > 0, (a * b).sum(0) / np.where(denom > 0, denom, 1.0), 0.0)


def oracle_scores(
    response: np.ndarray,
    subjects: list[brain.Subject],
    features: np.ndarray,
    weights: np.ndarray,
    *,
    lag: int,
    n_trs: int,
) -> dict[str, Any]:
    """Per-voxel Pearson r over the paired TRs (stimulus t <-> volume t + lag), summarized.

    ``oracle``: the noise-free planted response against the data (the best any model can do);
    ``window_linear``: a ridge model from the true features of window t alone, fit on the default
    train split and scored on the test split (what a perfect feature extractor that sees only the
    store's window could reach). Responsive voxels: planted weight > 0.1 for some feature.
    """
    rows = np.arange(n_trs) + lag
    rows = rows[rows < min(len(s.bold) for s in subjects)]
    truth = response[rows]
    zscored = []
    for s in subjects:
        data = s.bold[rows].astype(np.float64)
        sd = data.std(0)
        zscored.append((data - data.mean(0)) / np.where(sd > 0, sd, 1.0))
    mean = np.mean(zscored, axis=0)
    responsive = np.abs(weights).max(axis=0) > 0.1

    def summary(r: np.ndarray) -> dict[str, float]:
        return {
            "r_mean_all": float(r.mean()),
            "r_mean_responsive": float(r[responsive].mean()),
            "frac_r_gt_0p1": float((r > 0.1).mean()),
        }

    out: dict[str, Any] = {
        "definition": "per-voxel Pearson r over paired TRs (stimulus t, volume t + lag)",
        "n_paired_trs": len(rows),
        "n_responsive_voxels": int(responsive.sum()),
        "mean_subjects": summary(_pearson(truth, mean)),
        "per_subject": {
            s.name: summary(_pearson(truth, z)) for s, z in zip(subjects, zscored, strict=True)
        },
    }
    fractions = tuple(DEMO_BUILD_SETTINGS["split_fractions"])
    splits = make_splits(len(rows), fractions, min_real_gap(lag))
    x = features[: len(rows)]
    tr_, te = splits["train"], splits["test"]
    xt = np.c_[x[tr_], np.ones(len(tr_))]
    beta = np.linalg.solve(xt.T @ xt + 1e-3 * np.eye(xt.shape[1]), xt.T @ mean[tr_])
    prediction = np.c_[x[te], np.ones(len(te))] @ beta
    out["window_linear_test"] = summary(_pearson(prediction, mean[te]))
    return out
