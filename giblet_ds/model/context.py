"""Temporal context: the window of k TRs a sample carries, and the mixer that folds it into one.

A BOLD volume is the stimulus of the previous ~8-10 TRs convolved with the haemodynamic response,
so the encoder embeds each TR of the window with the same weights and :class:`TemporalMixer` sums
the k embeddings with learned per-delay, per-feature weights (a causal depthwise convolution whose
kernel spans the window: a finite impulse response per feature, as voxelwise encoding models fit
with FIR delays). docs/design.md, "Temporal context", says why this mixer and not another.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["CONTEXT_MASK", "WINDOW_KEYS", "TemporalMixer", "current_tr"]

WINDOW_KEYS = ("video", "audio_codes", "text", "text_mask")
"""Sample keys that carry a window axis (length k, TR t in the last slot, the other rows in time
order: giblet_ds.store.dataset.window_slots) when ``context_trs > 1``."""
CONTEXT_MASK = "context_mask"
"""Sample key of the (k,) bool mask of real TRs in the window (False: padding); only for k > 1."""


def current_tr(
    sample: Mapping[str, torch.Tensor], *, batched: bool = True
) -> dict[str, torch.Tensor]:
    """The sample with every windowed key cut to its last TR (TR t, the one the targets pair with).

    A sample without ``context_mask`` (``context_trs`` = 1) has no window axis and comes back as is.
    ``batched``: the window axis is dim 1 (after the batch), else dim 0. Other keys are unchanged.
    """
    if CONTEXT_MASK not in sample:
        return dict(sample)
    axis = 1 if batched else 0
    return {
        key: value.select(axis, -1) if key in WINDOW_KEYS else value
        for key, value in sample.items()
        if key != CONTEXT_MASK
    }


class TemporalMixer(nn.Module):
    """(B, k, D) per-TR features -> (B, D): ``sum_j mask[b, j] * w[j, d] * x[b, j, d]``.

    ``w = k * weight``, (k, D), one row per window slot (TR t last): k*D parameters, a few thousand next to the
    model's billions, so the parameter count does not grow with k beyond it. Padded TRs (mask
    False) add nothing. Starts as TR t alone (w = 1 for the last TR, 0 for the others): the
    model starts as the one-TR model and learns what the older TRs add. Stored divided by k
    because Adam moves every parameter by about lr per step whatever its gradient: the kernel
    needs moves of order 1 (an HRF's shape) and would take ~1/lr steps to get them; at k x lr per
    step it takes k times fewer (measured on the demo: BENCHMARKS.md, "Temporal context").
    """

    def __init__(self, context_trs: int, features: int) -> None:
        super().__init__()
        self.context_trs = context_trs
        self.gain = float(context_trs)
        self.weight = nn.Parameter(torch.empty(context_trs, features))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, k, D), mask (B, k) bool or None (every TR real) -> (B, D)."""
        if x.shape[1] != self.context_trs:
            raise ValueError(
                f"expected a window of {self.context_trs} TRs (model.context_trs), got {x.shape[1]}"
            )
        weight = (self.weight * self.gain).to(x.dtype)
        if mask is not None:
            x = x * mask.to(x.dtype).unsqueeze(-1)
        return torch.einsum("bkd,kd->bd", x, weight)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        self.weight[-1] = 1.0 / self.gain
