"""The DeepSpeed engine: build the model (under zero.Init for ZeRO-3), initialize, save, load, and
convert a checkpoint for a different world size (DeepSpeed's universal checkpoint)."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.utils.checkpoint
from torch import nn

from giblet_ds.config import OptimConfig, RunConfig
from giblet_ds.config.deepspeed_json import zero_stage
from giblet_ds.errors import CheckpointError
from giblet_ds.model import GibletAutoencoder
from giblet_ds.run.layout import COMPLETE_MARKER, UNIVERSAL_SUFFIX
from giblet_ds.run.resolver import tag_world_size
from giblet_ds.train import distributed as dist
from giblet_ds.train.schedule import make_scheduler

_RANK_IN_NAME = re.compile(r"zero_pp_rank_(\d+)_")

__all__ = [
    "build_engine",
    "checkpoint_world_size",
    "convert_to_universal",
    "set_optimizer_settings",
    "weight_decay_groups",
]


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only (2-D, and the 3-D stacks of per-subject matrices): norms, biases
    (the subject heads' (S + 1, V) biases included) and code embeddings are not shrunk."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        shape = getattr(param, "ds_shape", param.shape)
        matrix = len(shape) >= 2 and "codebook" not in name and not name.endswith("bias")
        (decay if matrix else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def set_optimizer_settings(param_groups: list[dict[str, Any]], optim: OptimConfig) -> None:
    """Set AdamW's settings from ``optim`` on the groups of :func:`weight_decay_groups` (decayed
    first). After a load: DeepSpeed restores the optimizer's groups from the checkpoint, saved
    settings included, so without this a resume's new weight_decay, betas or eps would be ignored."""
    if len(param_groups) != 2:
        raise CheckpointError(
            f"the optimizer has {len(param_groups)} parameter groups, not the 2 of "
            "weight_decay_groups (decayed, not decayed); cannot set optim.* on them"
        )
    for group, weight_decay in zip(param_groups, (optim.weight_decay, 0.0), strict=True):
        group["weight_decay"] = weight_decay
        group["betas"] = tuple(optim.betas)
        group["eps"] = optim.eps


def build_engine(
    cfg: RunConfig,
    ds_config: dict[str, Any],
    total_steps: int,
    output_means: dict[str, torch.Tensor] | None = None,
    mixer_start: torch.Tensor | None = None,
) -> tuple[Any, GibletAutoencoder]:
    """Model -> init_weights (output biases at ``output_means``, the temporal mixer at
    ``mixer_start``) -> deepspeed.initialize with our warmup + cosine schedule."""
    stage = zero_stage(ds_config)
    # Every rank builds the same initial weights (ZeRO-3 additionally takes rank 0's on gather).
    torch.manual_seed(cfg.train.seed)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=stage == 3):
        model = GibletAutoencoder(cfg.model)
    if stage == 3:
        model.init_weights(
            lambda ps: deepspeed.zero.GatheredParameters(ps, modifier_rank=0),
            output_means,
            mixer_start,
        )
    else:
        model.init_weights(output_means=output_means, mixer_start=mixer_start)
    if cfg.model.activation_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (the reentrant variant
        # silently drops the graph when the first block's input does not).
        model.set_activation_checkpointing(
            functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        )
    s = cfg.schedule
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=weight_decay_groups(model, cfg.optim.weight_decay),
        config=ds_config,
        lr_scheduler=lambda optimizer: make_scheduler(
            optimizer,
            peak_lr=cfg.optim.lr,
            warmup_steps=s.warmup_steps,
            warmup_start_lr=s.warmup_start_lr,
            min_lr=s.min_lr,
            total_steps=total_steps,
        ),
    )
    return engine, model


def checkpoint_world_size(tag_dir: Path) -> int:
    """How many data-parallel ranks wrote this tag: from its ``metadata.json``, never by counting
    files (a folder may hold stale files of another save). A tag without metadata (DeepSpeed's
    alone) falls back to the highest rank number in its optimizer file names."""
    saved = tag_world_size(tag_dir)
    if saved is not None:
        return saved
    ranks = [int(m.group(1)) for p in tag_dir.glob("*_optim_states.pt")
             if (m := _RANK_IN_NAME.search(p.name))]  # fmt: skip
    if not ranks:
        raise CheckpointError(f"{tag_dir}: no *_optim_states.pt files; not a DeepSpeed ZeRO tag")
    return max(ranks) + 1


def convert_to_universal(checkpoint_dir: Path, tag: str) -> str:
    """Convert ``tag`` to DeepSpeed's universal format once (rank 0; the others wait) and return
    the universal tag's name. Needed to resume on a different number of ranks."""
    universal = tag + UNIVERSAL_SUFFIX
    target = checkpoint_dir / universal
    if dist.is_rank0() and not (target / COMPLETE_MARKER).is_file():
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(checkpoint_dir / tag),
            "--output_folder",
            str(target),
            "--inject_missing_state",
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise CheckpointError(
                f"converting {checkpoint_dir / tag} to a universal checkpoint failed:\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            )
        (target / COMPLETE_MARKER).write_text(tag + "\n")
    dist.barrier()
    return universal
