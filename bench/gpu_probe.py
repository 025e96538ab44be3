"""The machine-side stages of bench/gpu_check.py, each run in its own process so that the
orchestrator never holds a CUDA context or GPU memory while the training runs measure theirs.

    python bench/gpu_probe.py env OUT.json [--cpu]
    python bench/gpu_probe.py bandwidth OUT.json [--cpu]
    python bench/gpu_probe.py store OUT.json STORE.h5 [--cpu] [--n-trs 300]

Each writes one JSON object to OUT.json; a failure exits non-zero with the reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# The seed's input sizes (REFERENCE.md): 10 x 90 x 160 x 3 video, 8 x 112 codes, 3 x 1,024 text,
# 83,138 voxels. The CPU mode uses write_synthetic_store's tiny defaults (tests/tiny_sizes.py).
FULL_STORE = {
    "n_frames": 10,
    "height": 90,
    "width": 160,
    "n_q": 8,
    "code_frames": 112,
    "text_slots": 3,
    "text_dim": 1024,
    "n_voxels": 83_138,
}
FULL_STORE_TRS = 300
TINY_STORE_TRS = 37  # write_synthetic_store's default: 23/5/5 train/val/test TRs


def _command_output(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment(cpu: bool) -> dict[str, Any]:
    """Versions and the device: GPU name and memory, driver, CUDA, torch, DeepSpeed, NCCL."""
    import torch

    try:
        import deepspeed

        ds_version, ds_path = deepspeed.__version__, str(Path(deepspeed.__file__).parent)
    except ImportError as exc:  # recorded; the training stages will fail and say so too
        ds_version, ds_path = None, f"not importable: {exc}"
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "deepspeed": ds_version,
        "deepspeed_path": ds_path,
        "ds_accelerator": os.environ.get("DS_ACCELERATOR"),
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import psutil

        info["ram_gb"] = psutil.virtual_memory().total / 1e9
    except ImportError:
        info["ram_gb"] = None
    if cpu:
        info["device"] = "cpu"
        return info
    if not torch.cuda.is_available():
        raise RuntimeError(
            "torch sees no CUDA device; run the GPU mode on a GPU machine or pass --cpu"
        )
    props = torch.cuda.get_device_properties(0)
    info.update(
        device=torch.cuda.get_device_name(0),
        device_count=torch.cuda.device_count(),
        gpu_memory_gib=props.total_memory / 2**30,
        multiprocessors=props.multi_processor_count,
        compute_capability=f"{props.major}.{props.minor}",
        nccl=".".join(str(v) for v in torch.cuda.nccl.version()),
        cudnn=torch.backends.cudnn.version(),
        driver=_command_output(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        ),
        nvcc=(_command_output(["nvcc", "--version"]) or "").splitlines()[-1:] or None,
    )
    return info


def _median_seconds(fn: Any, sync: Any, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _copy_seconds(src: Any, sync: Any, warmup: int, repeats: int) -> float:
    """Median seconds of ``dst.copy_(src)``; the copy is checked, then both buffers are freed."""
    import torch

    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), sync, warmup, repeats)
    if not torch.equal(dst, src):
        raise RuntimeError("the copy did not reproduce its source")
    return seconds


def bandwidth(cpu: bool) -> dict[str, Any]:
    """Achievable memory bandwidth (one large copy, bytes read + written over its median time) and
    the matrix-product rate (2 n^3 FLOP over its median time), on random data (zeros run faster).

    GPU: a 4 GiB device-to-device copy and an 8192^3 bf16 product (KINDS.md saw about 4.3 TB/s and
    770-800 TFLOP/s on an H200). CPU: a 64 MiB copy and a 512^3 fp32 product: a sanity check only.
    """
    import torch

    if cpu:
        device, dtype, copy_bytes, n, warmup, repeats = "cpu", torch.float32, 64 * 2**20, 512, 1, 5
        sync = lambda: None  # noqa: E731
    else:
        device, dtype, copy_bytes, n, warmup, repeats = (
            "cuda",
            torch.bfloat16,
            4 * 2**30,
            8192,
            3,
            10,
        )
        sync = torch.cuda.synchronize
    gen = torch.Generator(device=device).manual_seed(0)
    copy_s = _copy_seconds(
        torch.rand(copy_bytes // 4, generator=gen, device=device), sync, warmup, repeats
    )
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    matmul_s = _median_seconds(lambda: torch.matmul(a, b, out=out), sync, warmup, repeats)
    if not torch.isfinite(out).all():
        raise RuntimeError("the matrix product gave non-finite values")
    return {
        "device": device,
        "copy_bytes": copy_bytes,
        "copy_median_s": copy_s,
        "bandwidth_bytes_per_s": 2 * copy_bytes / copy_s,
        "matmul_n": n,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_median_s": matmul_s,
        "matmul_flops_per_s": 2 * n**3 / matmul_s,
        "repeats": repeats,
    }


def store(path: Path, cpu: bool, n_trs: int | None) -> dict[str, Any]:
    """A synthetic store (planted fMRI) at the seed's full input sizes, or the tiny test sizes."""
    from giblet_ds.store import open_store, write_synthetic_store

    sizes: dict[str, Any] = {} if cpu else dict(FULL_STORE)
    trs = n_trs or (TINY_STORE_TRS if cpu else FULL_STORE_TRS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    started = time.perf_counter()
    write_synthetic_store(path, n_trs=trs, **sizes)
    seconds = time.perf_counter() - started
    info = open_store(path)
    return {
        "path": str(path),
        "n_trs": trs,
        "write_s": seconds,
        "bytes": path.stat().st_size,
        "model_input_sizes": dict(info.model_input_sizes()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=("env", "bandwidth", "store"))
    parser.add_argument("out", type=Path, help="JSON file to write")
    parser.add_argument("store_path", nargs="?", type=Path, help="store path (store only)")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--n-trs", type=int, default=None)
    args = parser.parse_args(argv)
    if args.what == "env":
        result = environment(args.cpu)
    elif args.what == "bandwidth":
        result = bandwidth(args.cpu)
    else:
        if args.store_path is None:
            parser.error("store needs STORE_PATH")
        result = store(args.store_path, args.cpu, args.n_trs)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
