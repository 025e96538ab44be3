"""CPU step time of the giblet-ds Trainer against a bare DeepSpeed loop and a plain PyTorch loop.

Same model (the `small` preset widths), same synthetic store, same micro batch, same AdamW param
groups (no decay on norms, biases, embeddings), one process, fp32, ZeRO-2 for both DeepSpeed
variants. The trainer's time includes its per-step logging (metrics.jsonl, device readings). The three loops are timed side by side in one run, interleaved
round by round so that machine noise hits all of them alike; report ratios, not absolute numbers.

    .venv/bin/python bench/bench_trainer.py [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from giblet_ds.config import load_config
from giblet_ds.config.deepspeed_json import build_ds_config, load_ds_json
from giblet_ds.losses import NormalizedLoss, TargetVariances
from giblet_ds.model import GibletAutoencoder
from giblet_ds.store import StoreDataset, load_target_stats, open_store, write_synthetic_store
from giblet_ds.train import distributed as dist
from giblet_ds.train.engine import weight_decay_groups
from giblet_ds.train.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
STORE_SHAPE = dict(
    n_trs=160,
    n_voxels=5000,
    n_frames=4,
    height=36,
    width=64,
    n_q=8,
    code_frames=112,
    text_slots=3,
    text_dim=64,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    store = write_synthetic_store(tmp / "store.h5", **STORE_SHAPE)
    cfg = load_config(
        REPO / "launch/configs/small.yaml",
        [
            f"data.store={store}",
            f"checkpoint.run_dir={tmp / 'run'}",
            "logging.wandb_mode=disabled",
            "logging.progress_bar=false",
            "model.dropout=0.0",
        ],
    )
    ds_json = load_ds_json(REPO / "ds_configs/zero2_fp32_cpu.json")
    dist.init_distributed()
    trainer = Trainer(cfg, ds_json)
    data = StoreDataset(store, "train")
    batches = [
        torch.utils.data.default_collate(
            [data[i] for i in range(j, j + cfg.optim.micro_batch_size)]
        )
        for j in range(0, 8 * cfg.optim.micro_batch_size, cfg.optim.micro_batch_size)
    ]
    info = open_store(store)
    model_cfg = cfg.model.with_input_sizes(info.model_input_sizes())
    loss_fn = NormalizedLoss(
        TargetVariances.from_stats(load_target_stats(store)), cfg.loss.weights()
    )

    plain = GibletAutoencoder(model_cfg)
    plain.init_weights()
    plain_opt = torch.optim.AdamW(
        weight_decay_groups(plain, cfg.optim.weight_decay), lr=cfg.optim.lr
    )

    def plain_step(batch: dict[str, torch.Tensor]) -> None:
        out = plain(batch["video"], batch["audio_codes"], batch["text"])
        loss = loss_fn(out, batch).total
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.optim.grad_clip)
        plain_opt.step()

    import deepspeed

    bare_model = GibletAutoencoder(model_cfg)
    bare_model.init_weights()
    bare, _, _, _ = deepspeed.initialize(
        model=bare_model,
        model_parameters=weight_decay_groups(bare_model, cfg.optim.weight_decay),
        config=build_ds_config(cfg, ds_json, world_size=1),
    )

    def bare_step(batch: dict[str, torch.Tensor]) -> None:
        out = bare(batch["video"], batch["audio_codes"], batch["text"])
        bare.backward(loss_fn(out, batch).total)
        bare.step()

    def trainer_step(batch: dict[str, torch.Tensor]) -> None:
        trainer.step += 1
        started = time.perf_counter()
        result = trainer.train_step([batch])
        trainer._after_step(result, time.perf_counter() - started)  # logging included

    loops: dict[str, Callable[[dict[str, torch.Tensor]], None]] = {
        "plain_pytorch": plain_step,
        "bare_deepspeed": bare_step,
        "giblet_trainer": trainer_step,
    }
    times: dict[str, list[float]] = {name: [] for name in loops}
    for step in loops.values():  # warm-up
        for batch in batches[:2]:
            step(batch)
    for _ in range(args.rounds):
        for name, step in loops.items():
            started = time.perf_counter()
            for i in range(args.steps):
                step(batches[i % len(batches)])
            times[name].append((time.perf_counter() - started) / args.steps)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["plain_pytorch"]
    params = sum(p.numel() for p in plain.parameters())
    print(
        json.dumps(
            {
                "params": params,
                "micro_batch": cfg.optim.micro_batch_size,
                "store_shape": STORE_SHAPE,
                "median_step_s": medians,
                "ratio_to_plain": {name: m / base for name, m in medians.items()},
            },
            indent=2,
        )
    )
    trainer.close()


if __name__ == "__main__":
    main()
