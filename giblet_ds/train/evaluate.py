"""Validation: loss terms and fMRI scores over a whole split, reduced exactly across ranks."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from giblet_ds.losses import TERMS, NormalizedLoss
from giblet_ds.metrics import VoxelCorrelation
from giblet_ds.model import GibletOutput
from giblet_ds.store import StoreDataset
from giblet_ds.train import distributed as dist

__all__ = ["evaluate"]

BATCH_KEYS = ("video", "audio_codes", "text", "text_mask", "context_mask", "fmri")


@torch.no_grad()
def evaluate(
    engine: Any,
    dataset: StoreDataset,
    loss_fn: NormalizedLoss,
    *,
    micro_batch_size: int,
    to_device: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
) -> dict[str, float]:
    """``loss``, ``loss_<term>`` and the fMRI scores of ``dataset`` (every sample once).

    Rank r takes samples r, r + world, ...; every rank runs the same number of batches (ZeRO-3
    gathers parameters collectively, so a rank that stopped early would hang the others), padding
    with repeats that are masked out. Per-sample loss sums, counts and the voxel-correlation sums
    are all-reduced, so the result is exact, not an average of averages.
    """
    rank, world = dist.rank(), dist.world_size()
    engine.eval()
    n = len(dataset)
    mine = list(range(rank, n, world))
    per_rank = math.ceil(math.ceil(n / world) / micro_batch_size) * micro_batch_size
    padded = mine + [mine[0] if mine else 0] * (per_rank - len(mine))
    real = [True] * len(mine) + [False] * (per_rank - len(mine))
    scores = VoxelCorrelation(dataset.info.n_voxels)
    sums = torch.zeros(len(TERMS) + 2, dtype=torch.float64)  # terms..., total, count
    for start in range(0, per_rank, micro_batch_size):
        items = [dataset[i] for i in padded[start : start + micro_batch_size]]
        keys = [k for k in BATCH_KEYS if k in items[0]]  # context_mask only when k > 1
        batch = to_device({k: torch.stack([item[k] for item in items]) for k in keys})
        output = engine(
            batch["video"], batch["audio_codes"], batch["text"], batch.get("context_mask")
        )
        for j, keep in enumerate(real[start : start + micro_batch_size]):
            if not keep:
                continue
            result = loss_fn(_select(output, j), {k: v[j : j + 1] for k, v in batch.items()})
            for i, name in enumerate(TERMS):
                if name in result.terms:
                    sums[i] += result.terms[name].item()
            sums[-2] += result.total.item()
            sums[-1] += 1
            scores.update(output.fmri[j : j + 1].float().cpu(), batch["fmri"][j : j + 1].cpu())
    dist.all_reduce_sum(sums)
    dist.all_reduce_sum(scores.state)
    count = sums[-1].item()
    metrics = {"loss": sums[-2].item() / count}
    for i, name in enumerate(TERMS):
        if loss_fn.weights.get(name, 0.0) > 0:
            metrics[f"loss_{name}"] = sums[i].item() / count
    metrics.update(scores.compute().as_dict())
    engine.train()
    return metrics


def _select(output: GibletOutput, j: int) -> GibletOutput:
    return GibletOutput(*(tensor[j : j + 1] for tensor in output))
