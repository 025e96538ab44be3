"""Process group and collectives. With engine.py, the only code that imports deepspeed or
torch.distributed; everything else asks these functions."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist

from giblet_ds.train.launch_env import fill_process_env

__all__ = [
    "all_gather_object",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "broadcast_object",
    "launch_source",
    "init_distributed",
    "is_rank0",
    "local_rank",
    "rank",
    "world_size",
]


def _quiet_deepspeed() -> None:
    """DeepSpeed repeats the same info lines and warnings on every rank; show each warning once."""
    warnings.filterwarnings("once")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


_LAUNCH_SOURCE = "single"


def init_distributed() -> None:
    """Start the process group: NCCL on GPUs, gloo on CPU (DeepSpeed picks by accelerator).

    The ranks find each other through giblet_ds.train.launch_env (deepspeed, torchrun, srun or one
    plain process); raises LaunchError when the launcher's variables describe no single job."""
    global _LAUNCH_SOURCE
    if not dist.is_initialized():
        _LAUNCH_SOURCE = fill_process_env().source
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    _quiet_deepspeed()
    if not torch.cuda.is_available():
        # Every process would JIT-compile a shared-memory op it never uses (~40 s each).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        # A site that binds one GPU per task (--gpus-per-task, --gpu-bind) shows each rank one
        # device: it is device 0 whatever the rank's local index.
        torch.cuda.set_device(local_rank() if torch.cuda.device_count() > 1 else 0)


def launch_source() -> str:
    """Who set this process's rank: ``launcher``, ``slurm`` or ``single`` (see launch_env)."""
    return _LAUNCH_SOURCE


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM over ranks (exact for float64 sums of counts and moments)."""
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when the flag is true on any rank."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(value).item() > 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
