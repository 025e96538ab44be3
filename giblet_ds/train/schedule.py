"""Learning rate per optimizer step: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math

import torch

__all__ = ["lr_at", "make_scheduler"]


def lr_at(
    step: int,
    *,
    peak_lr: float,
    warmup_steps: int,
    warmup_start_lr: float,
    min_lr: float,
    total_steps: int,
) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Warmup: ``warmup_start_lr + (peak_lr - warmup_start_lr) * step / warmup_steps`` for step <
    warmup_steps. Then ``min_lr + (peak_lr - min_lr) * (1 + cos(pi * p)) / 2`` with p = (step -
    warmup_steps) / (total_steps - warmup_steps), clamped to [0, 1].
    """
    if step < warmup_steps:
        return warmup_start_lr + (peak_lr - warmup_start_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    peak_lr: float,
    warmup_steps: int,
    warmup_start_lr: float,
    min_lr: float,
    total_steps: int,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over the optimizer's base lr (= peak_lr); DeepSpeed steps it once per applied
    optimizer step and saves its state in every checkpoint."""
    for group in optimizer.param_groups:
        group["lr"] = peak_lr
        group["initial_lr"] = peak_lr

    def factor(step: int) -> float:
        return (
            lr_at(
                step,
                peak_lr=peak_lr,
                warmup_steps=warmup_steps,
                warmup_start_lr=warmup_start_lr,
                min_lr=min_lr,
                total_steps=total_steps,
            )
            / peak_lr
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
