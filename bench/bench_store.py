#!/usr/bin/env python
"""Store benchmark (not a test): build time per minute of movie, and Dataset random-access speed.

    python bench/bench_store.py DEMO_DIR [--settings demo|default] [--reads 2000] [--workers 2]

DEMO_DIR holds the demo's raw files (made first with tools/make_demo_data.py if missing). The
build runs from scratch into DEMO_DIR/bench_<settings>.h5; `default` is the real build's settings
(ViT-H-14 text tower, 90 x 160 frames, 6 kbps) with random weights, since nothing is downloaded.
Prints a markdown table row set and one JSON line for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from giblet_ds.demo_data import DEMO_BUILD_SETTINGS, DemoParams, make_demo_data
from giblet_ds.store import StoreDataset, open_store
from giblet_ds.store.builder.pipeline import BuildInputs, build_store
from giblet_ds.store.builder.settings import BuildSettings


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def bench_build(demo_dir: Path, which: str) -> dict[str, Any]:
    paths = make_demo_data(demo_dir, DemoParams())
    settings = (
        BuildSettings.from_mapping(DEMO_BUILD_SETTINGS)
        if which == "demo"
        else BuildSettings(pretrained=False)
    )
    out = demo_dir / f"bench_{which}.h5"
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    result = build_store(
        BuildInputs(paths.video, paths.annotations, paths.fmri), out, settings, progress=False
    )
    total = time.perf_counter() - start
    minutes = result.movie_seconds / 60
    return {
        "settings": which,
        "store": str(out),
        "movie_minutes": round(minutes, 3),
        "build_s": round(total, 1),
        "build_s_per_movie_minute": round(total / minutes, 1),
        "stages_s": result.seconds,
        "store_mb": round(out.stat().st_size / 2**20, 1),
    }


def bench_reads(store: Path, reads: int, workers: int) -> dict[str, Any]:
    info = open_store(store)
    datasets = [StoreDataset(store, split, info=info) for split in ("train", "val", "test")]
    rng = np.random.default_rng(0)
    picks = [(int(rng.integers(3)), None) for _ in range(reads)]
    order = [(d, int(rng.integers(len(datasets[d])))) for d, _ in picks]
    for d, i in order[:50]:  # open handles, warm the page cache
        datasets[d][i]
    start = time.perf_counter()
    for d, i in order:
        datasets[d][i]
    single = reads / (time.perf_counter() - start)
    train = datasets[0]
    sampler = torch.utils.data.RandomSampler(train, num_samples=reads, replacement=True)
    loader = DataLoader(train, batch_size=16, sampler=sampler, num_workers=workers)
    start = time.perf_counter()
    n = sum(len(batch["index"]) for batch in loader)
    loader_rate = n / (time.perf_counter() - start)
    sample = train[0]
    sample_bytes = sum(v.numel() * v.element_size() for v in sample.values())
    return {
        "samples_per_s_random_1proc": round(single, 1),
        f"samples_per_s_dataloader_{workers}workers_b16": round(loader_rate, 1),
        "sample_kb_as_tensors": round(sample_bytes / 1024, 1),
        "n_voxels": info.n_voxels,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("demo_dir", type=Path)
    p.add_argument("--settings", choices=("demo", "default"), default="demo")
    p.add_argument("--reads", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    build = bench_build(args.demo_dir, args.settings)
    reads = bench_reads(Path(build["store"]), args.reads, args.workers)
    record = {
        "bench": "store",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        **build,
        **reads,
    }
    print(f"| build ({args.settings} settings) | {build['build_s_per_movie_minute']} s per movie "
          f"minute ({build['build_s']} s for {build['movie_minutes']} min) |")  # fmt: skip
    for key, value in reads.items():
        print(f"| {key} | {value} |")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
