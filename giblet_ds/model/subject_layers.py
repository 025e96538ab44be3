"""Subject heads: each subject's own fMRI output on the shared readout, plus the average subject.

The shared fMRI head (``encoder.fmri_head``) predicts what every subject has in common; each
subject adds a low-rank residual read from the head's last hidden layer, and a bias:

    y_s = W h + b  +  (h A_s) B_s + c_s          h: (H,) the head's last hidden layer

with A_s (H, r), B_s (r, V), c_s (V,). One more slot, the *average subject*, has the same form.
In training each (sample, subject) pair takes the average subject's output instead of its own
with probability ``subject_dropout`` (TRIBE's subject dropout, Algonauts 2025): the average slot
is then fit to every subject's volumes, whose least-squares solution is the subject mean, so it
serves as the model's subject-mean prediction and as the start of a new subject
(:meth:`SubjectLayers.add_subject`). Why a low-rank residual rather than a per-voxel affine:
docs/design.md, "Subject heads".
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SubjectLayers", "subject_layer_count"]


def subject_layer_count(n_subjects: int, in_features: int, n_voxels: int, rank: int) -> int:
    """Parameters of :class:`SubjectLayers`: (n_subjects + 1) slots (the last is the average
    subject) of rank x (in_features + n_voxels) residual weights and n_voxels biases."""
    return (n_subjects + 1) * (rank * (in_features + n_voxels) + n_voxels)


class SubjectLayers(nn.Module):
    """``n_subjects`` + 1 low-rank residual outputs on a shared readout (the last slot is the
    average subject). Construction declares shapes only; :meth:`reset_parameters` sets them."""

    def __init__(
        self, n_subjects: int, in_features: int, n_voxels: int, rank: int, subject_dropout: float
    ) -> None:
        super().__init__()
        if n_subjects < 1 or rank < 1:
            raise ValueError(f"SubjectLayers needs n_subjects >= 1 and rank >= 1, got "
                             f"{n_subjects} and {rank}")  # fmt: skip
        slots = n_subjects + 1
        self.n_subjects = n_subjects
        self.subject_dropout = subject_dropout
        self.down = nn.Parameter(torch.empty(slots, in_features, rank))
        """(S + 1, H, r): A_s, the hidden layer into each slot's r residual directions."""
        self.up = nn.Parameter(torch.empty(slots, rank, n_voxels))
        """(S + 1, r, V): B_s, the residual directions onto the voxels."""
        self.bias = nn.Parameter(torch.empty(slots, n_voxels))
        """(S + 1, V): c_s, each slot's offset from the shared readout's bias."""

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A_s normal with std sqrt(1 / H) (a linear map, no activation after it); B_s and c_s
        zero, as every output layer starts (GibletAutoencoder.init_weights): each subject starts
        as the shared readout, and B_s receives a gradient from the first step (LoRA's start)."""
        nn.init.normal_(self.down, mean=0.0, std=math.sqrt(1.0 / self.down.shape[1]))
        nn.init.zeros_(self.up)
        nn.init.zeros_(self.bias)

    def forward(
        self, hidden: torch.Tensor, shared: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, H), shared (B, V) -> (average subject (B, V), subjects (B, S, V)).

        In training mode each (sample, subject) output is replaced by the average subject's with
        probability ``subject_dropout`` (torch's RNG, so a resume replays the same draws).
        """
        low = torch.einsum("bh,shr->bsr", hidden, self.down)
        every = shared.unsqueeze(1) + torch.einsum("bsr,srv->bsv", low, self.up) + self.bias
        average, own = every[:, -1], every[:, :-1]
        if self.training and self.subject_dropout > 0:
            drop = torch.rand(own.shape[:2], device=own.device) < self.subject_dropout
            own = torch.where(drop.unsqueeze(-1), average.unsqueeze(1), own)
        return average, own

    @torch.no_grad()
    def add_subject(self) -> SubjectLayers:
        """A copy with one more subject, slot S (before the average subject), started as the
        average subject: the new subject's first predictions are the subject-mean predictions.
        Every other slot is copied exactly."""
        out = SubjectLayers(
            self.n_subjects + 1,
            self.down.shape[1],
            self.up.shape[2],
            self.up.shape[1],
            self.subject_dropout,
        ).to(device=self.down.device, dtype=self.down.dtype)
        for name in ("down", "up", "bias"):
            old = getattr(self, name)
            new = getattr(out, name)
            new[: self.n_subjects] = old[: self.n_subjects]
            new[self.n_subjects] = old[-1]
            new[-1] = old[-1]
        return out
