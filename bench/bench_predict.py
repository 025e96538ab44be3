#!/usr/bin/env python
"""Prediction benchmark (not a test): seconds of prediction per minute of movie on CPU, the share
spent computing features, and peak memory, with the demo's feature settings and the `small` model.

    python bench/bench_predict.py OUT_DIR [--train-seconds 60] [--movie-seconds 120]

Makes a short demo (tools/make_demo_data.py's material) as the training movie, builds its store
with the demo's settings (random-weight EnCodec at 3 kbps, ViT-S-32-alt, 45 x 80 frames, TR 1.5 s),
saves an untrained `small` model (12-TR window; trained weights cost the same) with its config,
exports it (tools/export_model.py's library call), then runs tools/predict.py in a fresh process
on a second, longer demo movie with its annotations and reads the times and peak memory it
records. Prints one JSON line for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent


def _model_run(store: Path, run: Path) -> Path:
    """An untrained `small` model (sizes from ``store``) as consolidated weights + run config."""
    from safetensors.torch import save_file

    from giblet_ds.config import load_config
    from giblet_ds.config.loading import config_to_dict
    from giblet_ds.model import GibletAutoencoder
    from giblet_ds.resolve import resolve

    cfg = load_config(REPO / "launch" / "configs" / "small.yaml", [f"data.store={store}"])
    cfg = resolve(cfg).cfg
    torch.manual_seed(0)
    model = GibletAutoencoder(cfg.model)
    model.init_weights()
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    weights = run / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return weights


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--train-seconds", type=float, default=60.0)
    p.add_argument("--movie-seconds", type=float, default=120.0)
    args = p.parse_args()
    from giblet_ds.demo_data import DEMO_BUILD_SETTINGS, DemoParams, make_demo_data
    from giblet_ds.pretrained import export_model
    from giblet_ds.store.builder.pipeline import BuildInputs, build_store
    from giblet_ds.store.builder.settings import BuildSettings

    out: Path = args.out
    train = make_demo_data(out / "train_raw", DemoParams(duration_s=args.train_seconds))
    new = make_demo_data(out / "new_raw", DemoParams(duration_s=args.movie_seconds, seed=1))
    store = out / "store.h5"
    build_store(
        BuildInputs(video=train.video, annotations=train.annotations, fmri=train.fmri),
        store, BuildSettings.from_mapping(DEMO_BUILD_SETTINGS), progress=False,
    )  # fmt: skip
    weights = _model_run(store, out / "run")
    model_dir = out / "model"
    if not model_dir.exists():
        export_model(weights, model_dir, store=store, training_video=train.video)
    pred = out / "pred.nii.gz"
    cmd = [sys.executable, str(REPO / "tools" / "predict.py"), str(model_dir),
           "--video", str(new.video), "--annotations", str(new.annotations), "--out", str(pred),
           "--codes", str(out / "codes.npy")]  # fmt: skip
    clock = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    wall = time.perf_counter() - clock
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return 1
    record = json.loads((out / "pred.json").read_text())
    minutes = record["n_trs"] * record["tr_s"] / 60
    seconds = record["seconds"]
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    row = {
        "bench": "predict",
        "movie_minutes": round(minutes, 3),
        "n_trs": record["n_trs"],
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "wall_s": round(wall, 2),
        "wall_s_per_movie_minute": round(wall / minutes, 2),
        "features_s": seconds["features"],
        "model_s": seconds["model"],
        "features_share_of_wall": round(seconds["features"] / wall, 3),
        "stage_s": {k: seconds[k] for k in ("video", "audio_decode", "audio", "text")},
        "peak_rss_mb": round(child_peak, 1),
        "model": "small preset, untrained, context_trs 12",
        "features": "demo settings (random-weight EnCodec 3 kbps, ViT-S-32-alt, 45 x 80)",
        "build_settings": DEMO_BUILD_SETTINGS,
    }
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
