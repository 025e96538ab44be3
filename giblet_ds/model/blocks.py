"""Dense building blocks: Linear -> norm -> activation -> dropout, stacked into MLPs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["CheckpointFn", "DenseBlock", "DenseStack"]

# A function with torch.utils.checkpoint.checkpoint's calling convention: fn(module, *inputs).
CheckpointFn = Callable[..., torch.Tensor]


class DenseBlock(nn.Module):
    """One hidden layer.

    Default: Linear without bias -> LayerNorm -> ReLU -> Dropout. A bias right before a norm gets
    no gradient (the norm subtracts it again), which is why the old system's such biases stayed 0.
    ``seed_compat``: Linear with bias -> BatchNorm1d -> ReLU -> Dropout, as the old system built it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        seed_compat: bool = False,
        activation: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=seed_compat)
        self.norm: nn.Module = (
            nn.BatchNorm1d(out_features) if seed_compat else nn.LayerNorm(out_features)
        )
        self.activation: nn.Module = nn.ReLU() if activation else nn.Identity()
        self.dropout: nn.Module = (
            nn.Dropout(dropout) if activation and dropout > 0 else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.activation(self.norm(self.linear(x))))


class DenseStack(nn.Module):
    """Hidden blocks through ``widths``, optionally followed by a plain Linear to ``out_features``.

    ``last_activation=False`` leaves the last hidden block normalized but not activated (the
    bottleneck). Each block is one activation-checkpointing unit when ``checkpoint_fn`` is set.
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        *,
        out_features: int | None = None,
        seed_compat: bool = False,
        dropout: float = 0.0,
        last_activation: bool = True,
    ) -> None:
        super().__init__()
        blocks = []
        width_in = in_features
        for i, width in enumerate(widths):
            is_last = i == len(widths) - 1
            blocks.append(
                DenseBlock(
                    width_in,
                    width,
                    seed_compat=seed_compat,
                    activation=last_activation or not is_last,
                    dropout=dropout,
                )
            )
            width_in = width
        self.blocks = nn.ModuleList(blocks)
        self.out: nn.Linear | None = (
            nn.Linear(width_in, out_features) if out_features is not None else None
        )
        self.out_features = out_features if out_features is not None else width_in
        self.checkpoint_fn: CheckpointFn | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hidden(x)
        if self.out is not None:
            x = self.out(x)
        return x

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden blocks only (what the output Linear reads; subject heads read it too)."""
        for block in self.blocks:
            if self.checkpoint_fn is not None and self.training and torch.is_grad_enabled():
                x = self.checkpoint_fn(block, x)
            else:
                x = block(x)
        return x
