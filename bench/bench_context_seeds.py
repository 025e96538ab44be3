#!/usr/bin/env python
"""Settings x seeds on the demo, in one process each: is a difference in test r larger than a reseed?

`make demo` trains once (2 ranks x micro-batch 8, 44 steps) and one seed moves the test r by about
0.01, the size of the differences issue 12 looks for. This script replays that training in-process
(the trainer's model, init, loss, AdamW groups, warmup + cosine schedule, gradient clipping,
validation after each epoch choosing the best state on the reliable-voxel r; no DeepSpeed, no
checkpoint files, so a run takes about 45 s here) for each setting and seed, then scores the best
state on the test split's reliable voxels (training-TR ISC > 0.1, the subject-mean target, as
tools/evaluate.py) and on the voxels each planted feature drives most (weight > 0.3).

    .venv/bin/python bench/bench_context_seeds.py --store demo_out/store.h5 \
        --setting k8: --setting k1:model.context_trs=1 --seeds 1234 1 2 [--steps 44] [--json F]

A setting is NAME:OVERRIDE[,OVERRIDE...] over launch/configs/small.yaml (the demo's preset).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from giblet_ds.config import load_config
from giblet_ds.demo_data.brain import weight_maps
from giblet_ds.demo_data.features import FEATURES
from giblet_ds.evaluation.evaluate import predict_split
from giblet_ds.losses import NormalizedLoss, TargetVariances
from giblet_ds.metrics import pairwise_isc, voxel_r
from giblet_ds.model import GibletAutoencoder
from giblet_ds.store import (
    StoreDataset,
    load_mask,
    load_target_stats,
    open_store,
    read_split_subjects,
)
from giblet_ds.train.engine import weight_decay_groups
from giblet_ds.train.schedule import make_scheduler

REPO = Path(__file__).resolve().parent.parent
BATCH = 16  # make demo: 2 ranks x micro-batch 8


def parse_setting(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition(":")
    return name, [o for o in overrides.split(",") if o]


def voxel_groups(store: Path) -> dict[str, np.ndarray]:
    """Reliable voxels (training-TR ISC > 0.1) and, within them, those each planted feature drives
    most with weight > 0.3 (``weak``: the reliable voxels below that)."""
    info = open_store(store)
    subjects = torch.from_numpy(read_split_subjects(info.path, "train", info=info))
    reliable = (pairwise_isc(subjects) > 0.1).numpy()
    mask, _ = load_mask(info.path)
    weights = weight_maps(mask, FEATURES)
    strong, dominant = weights.max(0) > 0.3, weights.argmax(0)
    groups = {"reliable": reliable}
    groups.update({f: reliable & strong & (dominant == i) for i, f in enumerate(FEATURES)})
    groups["weak"] = reliable & ~strong
    return groups


def train_and_score(
    store: Path, overrides: list[str], seed: int, steps: int, groups: dict[str, np.ndarray]
) -> dict[str, Any]:
    torch.set_num_threads(1)
    cfg = load_config(REPO / "launch" / "configs" / "small.yaml", overrides)
    info = open_store(store)
    stats = load_target_stats(info.path, info=info)
    model_cfg = cfg.model.with_input_sizes(info.model_input_sizes())
    torch.manual_seed(seed)
    model = GibletAutoencoder(model_cfg)
    means = {k: torch.from_numpy(stats[k]["mean"]).float() for k in ("fmri", "video", "text")}
    model.init_weights(output_means=means)
    optimizer = torch.optim.AdamW(
        weight_decay_groups(model, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
    )
    s = cfg.schedule
    scheduler = make_scheduler(optimizer, peak_lr=cfg.optim.lr, warmup_steps=s.warmup_steps,
                               warmup_start_lr=s.warmup_start_lr, min_lr=s.min_lr,
                               total_steps=steps)  # fmt: skip
    train = StoreDataset.for_run(info, "train", cfg)
    loss_fn = NormalizedLoss(TargetVariances.from_stats(stats), cfg.loss.weights())
    device = torch.device("cpu")

    def scores(split: str) -> dict[str, float]:
        model.eval()
        prediction, target = predict_split(model, cfg, info, split, device=device)
        model.train()
        r = voxel_r(torch.from_numpy(prediction), torch.from_numpy(target)).numpy()
        return {name: float(r[voxels].mean()) for name, voxels in groups.items()}

    order_rng = torch.Generator().manual_seed(seed)
    step, best_val, best_step, best_state = 0, -np.inf, 0, None
    clock = time.perf_counter()
    model.train()
    while step < steps:
        order = torch.randperm(len(train), generator=order_rng)
        for first in range(0, len(train) - BATCH + 1, BATCH):  # drop_last, as the trainer
            if step >= steps:
                break
            samples = [train[int(i)] for i in order[first : first + BATCH]]
            batch = {key: torch.stack([x[key] for x in samples]) for key in samples[0]}
            output = model(batch["video"], batch["audio_codes"], batch["text"],
                           batch.get("context_mask"))  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss_fn(output, batch).total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
        val = scores("val")["reliable"]
        if val > best_val:
            best_val, best_step = val, step
            best_state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    assert best_state is not None
    model.load_state_dict(best_state)
    return {"seed": seed, "best_val_r": best_val, "best_step": best_step,
            "test_r": scores("test"), "seconds": time.perf_counter() - clock}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--setting", type=parse_setting, action="append", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    p.add_argument("--steps", type=int, default=44)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    groups = voxel_groups(args.store)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
                               "store": str(args.store), "steps": args.steps, "runs": {}}  # fmt: skip
    print("| setting | test r (reliable) per seed | mean | sd | "
          + " | ".join(groups) + " |")  # fmt: skip
    for name, overrides in args.setting:
        runs = [train_and_score(args.store, overrides, seed, args.steps, groups)
                for seed in args.seeds]  # fmt: skip
        results["runs"][name] = {"overrides": overrides, "seeds": runs}
        test = [run["test_r"]["reliable"] for run in runs]
        sd = statistics.stdev(test) if len(test) > 1 else float("nan")
        per_group = [statistics.mean(run["test_r"][g] for run in runs) for g in groups]
        print(
            f"| {name} | {' / '.join(f'{r:.4f}' for r in test)} | {statistics.mean(test):.4f} "
            f"| {sd:.4f} | " + " | ".join(f"{v:.3f}" for v in per_group) + " |",
            flush=True,
        )
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
