"""Shared helpers for the checkpoint-tool tests: real DeepSpeed ZeRO tags built on CPU.

Not a test module of its own (it holds no tests); run as a script it is one rank of a checkpoint
build: ``python tests/test_tools_common.py OUT --stage 2 --world-size 2 --rank 0 --rdzv FILE``.
Each tag is built once per pytest session (``build_zero_checkpoint`` caches on its arguments).
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TAG = "step-00000004"


def _env(rank: int, world_size: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        PYTHONPATH=str(REPO),
    )
    return env


@functools.cache
def build_zero_checkpoint(base: Path, stage: int, world_size: int, extras: bool = False) -> Path:
    """A checkpoints folder (``latest`` + one tag) written by ``deepspeed.initialize`` on CPU.

    The model has deliberately odd sizes (7, 11, 13 ...) so ZeRO padding is exercised, two param
    groups, BatchNorm buffers (float and int64); ``extras`` adds a frozen layer and tied weights.
    """
    out = base / f"zero{stage}_ws{world_size}{'_extras' if extras else ''}"
    if (out / "latest").is_file():
        return out
    rdzv = base / f"rdzv_{out.name}"
    rdzv.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, str(out), "--stage", str(stage), "--world-size", str(world_size),
           "--rdzv", str(rdzv)] + (["--extras"] if extras else [])  # fmt: skip
    procs = [
        subprocess.Popen(
            cmd + ["--rank", str(r)],
            env=_env(r, world_size),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(world_size)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    if any(p.returncode for p in procs) or not (out / "latest").is_file():
        raise RuntimeError("checkpoint build failed:\n" + "\n----\n".join(x[-3000:] for x in logs))
    return out


def _model(extras: bool):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(7, 11)
            self.norm = nn.BatchNorm1d(11)
            self.dec = nn.Linear(11, 5)
            self.scale = nn.Parameter(torch.ones(13))
            if extras:
                self.frozen = nn.Linear(5, 3)
                self.frozen.requires_grad_(False)
                self.sq = nn.Linear(5, 5)
                self.sq_tied = nn.Linear(5, 5, bias=False)
                self.sq_tied.weight = self.sq.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.dec(torch.relu(self.norm(self.enc(x))))
            if extras:
                h = self.sq_tied(self.sq(h)) + self.frozen(h).sum(-1, keepdim=True)
            return h.sum(-1) + self.scale.sum()

    return Net()


def _build_rank(args: argparse.Namespace) -> None:
    import deepspeed
    import torch

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{args.rdzv}", rank=args.rank, world_size=args.world_size
    )
    torch.manual_seed(0)
    model = _model(args.extras)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if n.endswith("weight")], "weight_decay": 0.01},
        {"params": [p for n, p in trainable if not n.endswith("weight")], "weight_decay": 0.0},
    ]
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": args.stage},
        "steps_per_print": 10_000,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
    gen = torch.Generator().manual_seed(100 + args.rank)
    for _ in range(4):
        x = torch.randn(4, 7, generator=gen)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(
        args.out, tag=TAG, client_state={"step": 4, "rng": torch.get_rng_state()}
    )
    torch.distributed.barrier()


@functools.cache
def build_real_run(base: Path, stage: int = 2) -> Path:
    """A run directory written by the real trainer (tiny preset, 1 rank, ZeRO-2 or 3 fp32 on CPU,
    2 epochs): metrics.jsonl, config.resolved.yaml, checkpoints with latest and best. About 10 s.
    The store is ``base / "real_run_store.h5"``."""
    from giblet_ds.store import write_synthetic_store
    from tests.train_harness import run_training

    run_dir = base / ("real_run" if stage == 2 else f"real_run_zero{stage}")
    if (run_dir / "metrics.jsonl").is_file():
        return run_dir
    store = base / "real_run_store.h5"
    if not store.is_file():
        write_synthetic_store(store)
    proc = run_training(run_dir, store, world=1, ds_config=f"zero{stage}_fp32_cpu.json")
    if proc.returncode:
        raise RuntimeError(f"training failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return run_dir


def load_tool(name: str):  # type: ignore[no-untyped-def]
    """Import ``tools/<name>.py`` (a script, not a package) so tests call its ``main`` in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_weights(folder: Path) -> dict:  # type: ignore[type-arg]
    """Every tensor of a consolidated output folder (.bin or .safetensors, sharded or not)."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".bin":
            out.update(torch.load(path, weights_only=True))
        elif path.suffix == ".safetensors":
            out.update(load_file(path))
    return out


def assert_bitwise_equal(a, b, name: str = "") -> None:  # type: ignore[no-untyped-def]
    """Same dtype, shape and bytes (NaN-safe, -0.0 != 0.0)."""
    import torch

    assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), name


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--rdzv", required=True)
    parser.add_argument("--extras", action="store_true")
    _build_rank(parser.parse_args())
