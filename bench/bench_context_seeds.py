#!/usr/bin/env python
"""Settings x seeds on the demo, in one process each: is a difference in test r larger than a reseed?

`make demo` trains once (2 ranks x micro-batch 8, the preset's epochs) and one seed moves the test
r by about 0.01, the size of the differences issue 12 looks for. This script replays that training in-process:
the trainer's model, init (the temporal mixer's HRF start included), loss, AdamW groups, warmup +
cosine schedule, gradient clipping, the sampler's per-epoch order (seed + epoch; the 2 ranks'
shards of one step are the same 16 TRs), validation after each epoch and the trainer's early
stopping (min_delta, patience) choosing the best state on the reliable-voxel r. No DeepSpeed, no
checkpoint files, one dropout stream instead of one per rank: a run takes about 2 minutes here and
matches a 2-rank run up to the dropout masks.
Each best state is scored on the validation and test splits' reliable voxels (training-TR ISC >
0.1, the subject-mean target, as tools/evaluate.py; with subject heads, data.target=subjects, the
average-subject output), on the planted ROI (``--roi``), on the voxels each planted feature drives
most (weight > 0.3), and by how well its per-TR features (``GibletEncoder.per_tr_features``)
linearly decode each planted feature (ridge, training TRs -> test TRs). The seeds of a setting are
also scored as an ensemble (their predictions averaged, as tools/evaluate.py RUN_A RUN_B ...), and
the ridge baseline (fitted on the training targets smoothed as the settings smooth them:
data.smoothing_fwhm_mm) and the planted oracle are printed on the same TRs and voxels. Settings
are to be compared on validation; the test columns are for the record.

    .venv/bin/python bench/bench_context_seeds.py --store demo_out/store.h5 \
        --roi demo_out/raw/roi_mask.nii.gz \
        --setting k12: --setting k1:model.context_trs=1 --seeds 1234 1 2 [--json F]

A setting is NAME:[OVERRIDE,...]: `--set` overrides over launch/configs/small.yaml and make demo's
own (none today); batch and steps come from the resolved config (x 2 ranks). Demo stores
only (the ground truth must lie beside the store). Exit 2 on a bad store, setting or override.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from giblet_ds.config import RunConfig, load_config
from giblet_ds.demo_data.brain import weight_maps
from giblet_ds.demo_data.features import FEATURES
from giblet_ds.errors import GibletError
from giblet_ds.evaluation.evaluate import DEFAULT_RELIABLE_ISC, predict_split, roi_voxels
from giblet_ds.evaluation.ridge import fit_ridge_baseline, read_target
from giblet_ds.evaluation.truth import find_ground_truth, oracle_series
from giblet_ds.metrics import pairwise_isc, voxel_r
from giblet_ds.model import GibletAutoencoder
from giblet_ds.resolve import resolve
from giblet_ds.store import (
    StoreDataset,
    load_mask,
    load_target_stats,
    open_store,
    read_split_subjects,
)
from giblet_ds.store.reader import StoreInfo
from giblet_ds.store.smoothing import target_smoothing
from giblet_ds.train.early_stopping import EarlyStopping
from giblet_ds.train.engine import weight_decay_groups
from giblet_ds.train.hrf_start import mixer_start
from giblet_ds.train.loss_setup import run_loss
from giblet_ds.train.schedule import make_scheduler

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / "launch" / "configs" / "small.yaml"
DEMO_OVERRIDES: list[str] = []  # launch/demo.sh's --set beyond paths: none, the preset as it is
RANKS = 2  # launch/demo.sh: deepspeed --num_gpus 2


def parse_setting(text: str) -> tuple[str, list[str]]:
    """``"k1:model.context_trs=1,optim.lr=2e-3"`` -> ("k1", [...]); ``"k12:"`` -> ("k12", []).
    Commas inside brackets belong to a list value (``model.audio_hidden=[128,64]``)."""
    name, colon, overrides = text.partition(":")
    if not colon or not name:
        raise argparse.ArgumentTypeError(
            f"a setting is NAME:[OVERRIDE,...] (e.g. k12: or k1:model.context_trs=1), got {text!r}"
        )
    return name, [o for o in _top_level_split(overrides) if o]


def _top_level_split(text: str) -> list[str]:
    """Split on the commas outside brackets, so a list value stays whole:
    ``"model.dropout=0.2,model.audio_hidden=[128,64]"`` -> two overrides. Raises
    argparse.ArgumentTypeError on unbalanced brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "[{") - (char in "]}")
        if depth < 0:
            break
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:  # merged or cut overrides would train another setting without a word
        raise argparse.ArgumentTypeError(f"unbalanced brackets in the overrides {text!r}")
    return [*parts, text[start:]]


def run_config(overrides: list[str], seed: int) -> RunConfig:
    """The small preset with make demo's overrides, the setting's, and the seed."""
    return load_config(PRESET, [*DEMO_OVERRIDES, *overrides, f"train.seed={seed}"])


def voxel_groups(store: Path, roi: Path | None = None) -> dict[str, np.ndarray]:
    """Reliable voxels (training-TR ISC > the evaluation's default threshold, 0.1) and, within
    them, those each planted feature drives most with weight > 0.3 (``weak``: the reliable voxels
    below that); with ``roi`` (the demo's planted ROI NIfTI) also ``roi``, its voxels as
    tools/evaluate.py --roi takes them (not cut to the reliable ones)."""
    info = open_store(store)
    if find_ground_truth(info) is None:
        raise GibletError(
            f"{store}: no ground_truth.json of this store beside it; this benchmark scores the "
            "planted features of a demo store (tools/make_demo_data.py, then tools/build_store.py)"
        )
    subjects = torch.from_numpy(read_split_subjects(info.path, "train", info=info))
    reliable = (pairwise_isc(subjects) > DEFAULT_RELIABLE_ISC).numpy()
    mask, _ = load_mask(info.path)
    weights = weight_maps(mask, FEATURES)
    strong, dominant = weights.max(0) > 0.3, weights.argmax(0)
    groups = {"reliable": reliable}
    groups.update({f: reliable & strong & (dominant == i) for i, f in enumerate(FEATURES)})
    groups["weak"] = reliable & ~strong
    if roi is not None:
        groups["roi"] = roi_voxels(roi, info)
    return groups


def references(
    info: StoreInfo, groups: dict[str, np.ndarray], cfg: RunConfig
) -> dict[str, dict[str, float]]:
    """The ridge baseline (tools/evaluate.py's, fitted on the training TRs with the setting's
    target smoothing, cached beside the store) and the planted oracle, per split and voxel group,
    on the subject-mean target at the split's TRs: the references every setting is divided by."""
    ridge = fit_ridge_baseline(info, smoothing=target_smoothing(cfg, info))
    truth = find_ground_truth(info)
    assert truth is not None
    out = {}
    for split in ("val", "test"):
        rows = np.asarray(info.splits[split])
        target = torch.from_numpy(read_target(info, rows, None))
        for name, series in (("ridge", ridge.predictions[split]),
                             ("oracle", oracle_series(truth, info, rows))):  # fmt: skip
            r = voxel_r(torch.from_numpy(np.asarray(series, np.float32)), target).numpy()
            out[f"{name}_{split}"] = {g: float(r[v].mean()) for g, v in groups.items()}
    return out


def feature_decoding(model: GibletAutoencoder, info: StoreInfo) -> dict[str, float]:
    """r of each planted feature against its linear decoding from the model's per-TR features
    (sklearn RidgeCV on standardized features, fit on the training TRs, scored on the test TRs)."""
    from sklearn.linear_model import RidgeCV

    truth = find_ground_truth(info)
    assert truth is not None
    with np.load(truth.npz_path) as saved:
        planted = np.asarray(saved["features"], np.float64)  # (stimulus TRs, 5)
    rows = {split: np.asarray(info.splits[split]) for split in ("train", "test")}
    per_tr = {}
    model.eval()
    with torch.no_grad():
        for split in rows:
            data = StoreDataset(info.path, split, info=info)  # one TR per sample
            samples = [data[i] for i in range(len(data))]  # each TR read once
            batch = {k: torch.stack([x[k] for x in samples]) for k in ("video", "audio_codes",
                     "text")}  # fmt: skip
            per_tr[split] = model.encoder.per_tr_features(
                batch["video"], batch["audio_codes"], batch["text"]
            ).numpy()
    model.train()
    mean, std = per_tr["train"].mean(0), per_tr["train"].std(0) + 1e-6
    x = {split: (per_tr[split] - mean) / std for split in rows}
    out = {}
    for index, name in enumerate(FEATURES):
        ridge = RidgeCV(alphas=np.logspace(-2, 5, 15)).fit(
            x["train"], planted[rows["train"], index]
        )
        out[name] = float(np.corrcoef(ridge.predict(x["test"]), planted[rows["test"], index])[0, 1])
    return out


def train_and_score(
    info: StoreInfo, cfg: RunConfig, groups: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Train as make demo does for ``cfg`` (its ``train.seed``), keep the best validation state,
    score it on the test split."""
    torch.set_num_threads(1)
    stats = load_target_stats(info.path, info=info)
    # the trainer's resolution: input sizes and, with data.target=subjects, n_subjects
    cfg = resolve(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, store=str(info.path)))
    ).cfg
    model_cfg = cfg.model
    torch.manual_seed(cfg.train.seed)
    model = GibletAutoencoder(model_cfg)
    means = {k: torch.from_numpy(stats[k]["mean"]).float() for k in ("fmri", "video", "text")}
    model.init_weights(output_means=means, mixer_start=mixer_start(model_cfg, info.lag, info.tr))
    optimizer = torch.optim.AdamW(
        weight_decay_groups(model, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
    )
    train = StoreDataset.for_run(info, "train", cfg)
    batch_size = cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps * RANKS
    steps_per_epoch = len(train) // batch_size
    steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    s = cfg.schedule
    scheduler = make_scheduler(optimizer, peak_lr=cfg.optim.lr, warmup_steps=s.warmup_steps,
                               warmup_start_lr=s.warmup_start_lr, min_lr=s.min_lr,
                               total_steps=steps)  # fmt: skip
    loss_fn = run_loss(cfg, info)
    es = cfg.train.early_stopping
    stopping = EarlyStopping(es.mode, es.patience, es.min_delta)
    device = torch.device("cpu")

    def predict(split: str) -> tuple[np.ndarray, np.ndarray]:
        model.eval()
        prediction, target = predict_split(model, cfg, info, split, device=device)
        model.train()
        return prediction, target

    def scores(split: str) -> dict[str, float]:
        return group_means(*predict(split), groups)

    step, epoch, best_state = 0, 0, None
    clock = time.perf_counter()
    model.train()
    while step < steps:
        # the sampler's order (ResumableDistributedSampler: seed + epoch); rank r of 2 takes
        # order[r::2], so step j's two micro-batches together are order[16 j : 16 (j + 1)]
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(
            cfg.train.seed + epoch))  # fmt: skip
        for first in range(0, steps_per_epoch * batch_size, batch_size):
            if step >= steps:
                break
            samples = [train[int(i)] for i in order[first : first + batch_size]]
            batch = {key: torch.stack([x[key] for x in samples]) for key in samples[0]}
            output = model(batch["video"], batch["audio_codes"], batch["text"],
                           batch.get("context_mask"))  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss_fn(output, batch).total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
        epoch += 1
        if stopping.update(scores("val")["reliable"], step):
            best_state = {n: t.detach().clone() for n, t in model.state_dict().items()}
        if stopping.patience and stopping.bad_validations >= stopping.patience:
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    predictions = {split: predict(split) for split in ("val", "test")}
    return {"seed": cfg.train.seed, "best_val_r": stopping.best, "best_step": stopping.best_step,
            "val_r": group_means(*predictions["val"], groups),
            "test_r": group_means(*predictions["test"], groups),
            "decoding_r": feature_decoding(model, info),
            "seconds": time.perf_counter() - clock,
            "predictions": {split: p for split, (p, _) in predictions.items()},
            "targets": {split: t for split, (_, t) in predictions.items()}}  # fmt: skip


def group_means(
    prediction: np.ndarray, target: np.ndarray, groups: dict[str, np.ndarray]
) -> dict[str, float]:
    """Mean per-voxel r of ``prediction`` against ``target`` (T, V) over each voxel group."""
    r = voxel_r(torch.from_numpy(prediction), torch.from_numpy(target)).numpy()
    return {name: float(r[voxels].mean()) for name, voxels in groups.items()}


def ensemble_scores(runs: list[dict[str, Any]], groups: dict[str, np.ndarray]) -> dict[str, Any]:
    """The seeds' average prediction (tools/evaluate.py RUN_A RUN_B ...'s ensemble), scored per
    split and group on the same TRs and voxels as each member."""
    return {
        f"{split}_r": group_means(
            np.mean([run["predictions"][split] for run in runs], axis=0),
            runs[0]["targets"][split],
            groups,
        )
        for split in ("val", "test")
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--setting", type=parse_setting, action="append", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    p.add_argument("--roi", type=Path, help="the demo's planted ROI (RAW/roi_mask.nii.gz)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    try:  # every store and config problem before the first minute of training
        info = open_store(args.store)
        groups = voxel_groups(args.store, args.roi)
        configs = {name: [run_config(overrides, seed) for seed in args.seeds]
                   for name, overrides in args.setting}  # fmt: skip
        first = next(iter(configs.values()))[0]
        fwhms = {cfgs[0].data.smoothing_fwhm_mm for cfgs in configs.values()}
        if len(fwhms) > 1:  # one ridge reference per invocation: it fits the smoothed targets
            raise GibletError(
                f"settings with different data.smoothing_fwhm_mm {sorted(fwhms)}: run them apart"
            )
        refs = references(info, groups, first)
    except GibletError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
                               "store": str(args.store), "references": refs, "runs": {}}  # fmt: skip
    shown = [g for g in ("reliable", "roi") if g in groups]
    for name in ("ridge", "oracle"):
        print(f"{name}: " + ", ".join(f"{split} {g} {refs[f'{name}_{split}'][g]:.4f}"
                                      for split in ("val", "test") for g in shown))  # fmt: skip
    print("| setting | val r (reliable) per seed | val mean " + " ".join(shown)
          + " | test r (reliable) per seed | test mean " + " ".join(shown)
          + " | ensemble val " + " ".join(shown) + " | ensemble test " + " ".join(shown)
          + " | groups (test mean) " + " / ".join(groups)
          + " | decoding r: " + " / ".join(FEATURES) + " |")  # fmt: skip
    for name, overrides in args.setting:
        runs = [train_and_score(info, cfg, groups) for cfg in configs[name]]
        ensemble = ensemble_scores(runs, groups)

        def mean(split: str, group: str, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.mean(run[f"{split}_r"][group] for run in runs)

        results["runs"][name] = {
            "overrides": overrides,
            "seeds": [
                {k: v for k, v in run.items() if k not in ("predictions", "targets")}
                for run in runs
            ],  # fmt: skip
            "ensemble": ensemble,
        }
        decoding = [statistics.mean(run["decoding_r"][f] for run in runs) for f in FEATURES]
        print(
            f"| {name} | "
            + " / ".join(f"{run['val_r']['reliable']:.4f}" for run in runs)
            + " | " + " ".join(f"{mean('val', g):.4f}" for g in shown)
            + " | " + " / ".join(f"{run['test_r']['reliable']:.4f}" for run in runs)
            + " | " + " ".join(f"{mean('test', g):.4f}" for g in shown)
            + " | " + " ".join(f"{ensemble['val_r'][g]:.4f}" for g in shown)
            + " | " + " ".join(f"{ensemble['test_r'][g]:.4f}" for g in shown)
            + " | " + " / ".join(f"{mean('test', g):.3f}" for g in groups)
            + " | " + " / ".join(f"{v:.2f}" for v in decoding) + " |",
            flush=True,
        )  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
