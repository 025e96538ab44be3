"""Temporal context: the window of k TRs a sample carries, and the mixer that folds it into one.

A BOLD volume is the stimulus of the previous ~8-10 TRs convolved with the haemodynamic response,
so the encoder turns each TR of the window into its own bottleneck code with the same weights and
:class:`TemporalMixer` sums the k codes with learned per-delay, per-dimension weights (a causal
depthwise convolution whose kernel spans the window: a finite impulse response per code
dimension, as voxelwise encoding models fit with FIR delays) for the fMRI head; the decoder reads
TR t's own code. docs/design.md, "Temporal context", says why this mixer, why after the
bottleneck, and why it starts at a canonical HRF.
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
    """(B, k, D) per-TR codes -> (B, D): ``sum_j mask[b, j] * w[j, d] * x[b, j, d]``.

    ``w = k * weight``, (k, D), one row per window slot (TR t last): k*D parameters, a few
    thousand next to the model's billions, so the parameter count does not grow with k beyond it.
    Padded TRs (mask False) add nothing. :meth:`reset_parameters` starts it as TR t alone (w = 1
    for the last TR, 0 for the others: the one-TR model); :meth:`set_kernel` starts every
    dimension at one given kernel over the slots (the trainer's canonical HRF). Stored divided by
    k because Adam moves every parameter by about lr per step whatever its gradient: reshaping
    the kernel takes moves of order 0.1-1 (an HRF's samples), ~1/lr steps; at k x lr per step it
    takes k times fewer (BENCHMARKS.md, "Temporal context").
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

    @torch.no_grad()
    def set_kernel(self, kernel: torch.Tensor) -> None:
        """Every dimension's effective weights (w) become ``kernel``, (k,) in slot order."""
        if kernel.shape != (self.context_trs,):
            raise ValueError(
                f"a start kernel for {self.context_trs} window slots must have shape "
                f"({self.context_trs},), got {tuple(kernel.shape)}"
            )
        self.weight.copy_((kernel.to(self.weight) / self.gain).unsqueeze(1).expand_as(self.weight))
