#!/usr/bin/env python
"""Time and peak RSS of tools/zero_to_fp32.py against DeepSpeed's zero_to_fp32 on the same tag.

Builds a real ZeRO checkpoint of a ~300M-parameter model with a 1-process CPU DeepSpeed engine (one
AdamW step so the moments exist), then converts it with each tool in a fresh process and reports
wall time of the conversion and the process's peak RSS (ru_maxrss, which counts the touched pages
of memory-mapped files too). Needs about 8 GB of RAM and 12 GB of disk under --work.

    python bench/bench_zero_to_fp32.py --work /tmp/bench_z2f --stage 2 --stage 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BUILD = r"""
import os, sys, torch, deepspeed
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
stage, out, layers, width = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)],
                            torch.nn.LayerNorm(width))
cfg = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9,
       "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
       "zero_optimization": {"stage": stage}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
loss = engine(torch.randn(1, width)).square().mean()
engine.backward(loss)
engine.step()
engine.save_checkpoint(out, tag="step-00000001")
print(sum(p.numel() for p in model.parameters()))
"""

CONVERT = r"""
import resource, sys, time, json
which, ckpt, out = sys.argv[1], sys.argv[2], sys.argv[3]
extra = sys.argv[4:]
import torch
if which == "deepspeed":
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_state_dict as convert
else:
    from giblet_ds.checkpoint import convert_zero_checkpoint as convert
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
kwargs = {"max_shard_size": extra[0]} if extra else {}
convert(ckpt, out, **kwargs)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "peak_rss_mb": peak / 1024, "rss_after_import_mb": base / 1024}))
"""


def _env() -> dict[str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2")
    )
    env.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    return env


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (about 12 GB)")
    ap.add_argument("--stage", type=int, action="append", choices=[1, 2, 3])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=5000, help="12 x 5000^2 = 300M parameters")
    ap.add_argument("--shard", default=None, help="also pass --max_shard_size, e.g. 500MB")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = ap.parse_args()
    stages = args.stage or [2, 3]
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for stage in stages:
        ckpt = args.work / f"zero{stage}"
        if not (ckpt / "latest").is_file():
            shutil.rmtree(ckpt, ignore_errors=True)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", BUILD, str(stage), str(ckpt),
                                   str(args.layers), str(args.width)],
                                  env=_env(), capture_output=True, text=True)  # fmt: skip
            if proc.returncode:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
            print(f"built ZeRO-{stage} tag in {time.perf_counter() - t0:.0f} s "
                  f"({_dir_bytes(ckpt) / 1e9:.2f} GB on disk)", flush=True)  # fmt: skip
        for which in ("deepspeed", "giblet"):
            out = args.work / f"out_{which}_{stage}"
            shutil.rmtree(out, ignore_errors=True)
            for f in ckpt.rglob("*.pt"):  # same warm page cache for both tools
                with open(f, "rb") as fh:
                    while fh.read(1 << 26):
                        pass
            cmd = [sys.executable, "-c", CONVERT, which, str(ckpt), str(out)]
            proc = subprocess.run(cmd + ([args.shard] if args.shard else []), env=_env(),
                                  capture_output=True, text=True)  # fmt: skip
            if proc.returncode:
                print(proc.stderr[-4000:], file=sys.stderr)
                return 1
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update(tool=which, stage=stage, output_gb=_dir_bytes(out) / 1e9)
            results.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
    print(f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print("| stage | tool | seconds | peak RSS (MB) | RSS after imports (MB) | output (GB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['stage']} | {r['tool']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
              f"{r['rss_after_import_mb']:.0f} | {r['output_gb']:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
