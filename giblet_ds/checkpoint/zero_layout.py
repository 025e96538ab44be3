"""Where each parameter's bytes live in a DeepSpeed ZeRO tag (the layout rules DeepSpeed's own
``zero_to_fp32.py`` relies on), computed from the partition sizes alone.

* ZeRO-1/2: rank r holds slice r of each group's flat vector; the ranks' slices concatenated give
  the group vector, in which parameters follow each other in ``param_shapes`` order (plus optional
  per-parameter alignment padding).
* ZeRO-3: every parameter is split in ``ceil(numel / world_size)`` pieces, rank r holding piece r at
  the same offset of its own flat vector; the concatenated pieces are truncated to ``numel``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from giblet_ds.errors import CheckpointError

__all__ = ["ParamEntry", "Piece", "z3_partition", "zero2_entries", "zero3_entries"]


@dataclass(frozen=True)
class Piece:
    """``numel`` elements from ``start`` of group ``group``'s flat tensor on rank ``rank``."""

    rank: int
    group: int
    start: int
    numel: int


@dataclass(eq=False)
class ParamEntry:
    """One tensor of the consolidated state dict and where its bytes live.

    ``kind`` is ``param`` (fp32 partitions), ``buffer`` or ``frozen`` (read from the model-state
    files). Tied names map to the same ParamEntry object.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: Literal["param", "buffer", "frozen"]
    pieces: tuple[Piece, ...] = ()
    group: int = 0
    tensor: torch.Tensor | None = field(default=None, repr=False)
    requires_grad: bool = False  # the flag of the saved source tensor (kept in .bin output)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def z3_partition(numel: int, world_size: int) -> int:
    return math.ceil(numel / world_size)


def zero2_entries(
    tag_dir: Path, shapes: list[dict[str, Any]], fp32: list[list[torch.Tensor]], alignment: Any
) -> list[ParamEntry]:
    """ZeRO-1/2: rank r holds slice r of each group's flat vector; parameters follow each other in
    ``shapes`` order (plus optional per-parameter alignment padding)."""
    ws = len(fp32)
    out = []
    for g, group_shapes in enumerate(shapes):
        sizes = [int(fp32[r][g].numel()) for r in range(ws)]
        starts = [sum(sizes[:r]) for r in range(ws)]
        avail = sum(sizes)
        paddings = alignment[g] if alignment is not None else None
        if paddings is not None and len(paddings) != len(group_shapes):
            raise CheckpointError(
                f"{tag_dir}: group {g} has {len(group_shapes)} parameters but "
                f"{len(paddings)} alignment paddings"
            )
        offset = 0
        for i, (name, shape) in enumerate(group_shapes.items()):
            numel = math.prod(shape)
            pieces = []
            lo, hi = offset, offset + numel
            for r in range(ws):
                a, b = max(lo, starts[r]), min(hi, starts[r] + sizes[r])
                if a < b:
                    pieces.append(Piece(r, g, a - starts[r], b - a))
            if sum(p.numel for p in pieces) != numel:
                raise CheckpointError(
                    f"{tag_dir}: parameter {name} ({numel} elements at {offset}) runs past "
                    f"the {avail} elements of group {g}'s partitions"
                )
            grad = any(fp32[p.rank][g].requires_grad for p in pieces)
            out.append(ParamEntry(name, tuple(shape), torch.float32, "param", tuple(pieces), g,
                                  requires_grad=grad))  # fmt: skip
            offset = hi + (int(paddings[i]) if paddings is not None else 0)
        # DeepSpeed pads each group to a multiple of 2 x world size; both counts must agree
        # after that rounding, as its own script checks.
        align = 2 * ws
        if align * math.ceil(offset / align) != align * math.ceil(avail / align):
            raise CheckpointError(
                f"{tag_dir}: consumed {offset} of {avail} elements in group {g}; the "
                "parameter shapes do not match the optimizer partitions"
            )
    return out


def zero3_entries(
    tag_dir: Path,
    shapes: list[dict[str, Any]],
    fp32: list[list[torch.Tensor]],
    optim_files: list[Path],
) -> list[ParamEntry]:
    """ZeRO-3: every parameter is split in ``ceil(numel / world_size)`` pieces, rank r holding piece
    r at the same offset of its own flat vector."""
    ws = len(fp32)
    group_sizes = [int(t.numel()) for t in fp32[0]]
    for r in range(ws):
        if [int(t.numel()) for t in fp32[r]] != group_sizes:
            raise CheckpointError(f"{optim_files[r]}: partition sizes differ from rank 0's")
    bounds = [0]
    for n in group_sizes:
        bounds.append(bounds[-1] + n)
    merged: dict[str, Any] = {}
    for group_shapes in shapes:
        merged.update(group_shapes)
    out = []
    offset = 0
    for name, shape in merged.items():
        numel = math.prod(shape)
        part = z3_partition(numel, ws)
        pieces = []
        remaining = numel
        for r in range(ws):
            lo, hi = offset, offset + min(part, remaining)
            for g in range(len(group_sizes)):
                a, b = max(lo, bounds[g]), min(hi, bounds[g + 1])
                if a < b:
                    pieces.append(Piece(r, g, a - bounds[g], b - a))
            remaining -= hi - lo
            if remaining <= 0:
                break
        if offset + part > bounds[-1]:
            raise CheckpointError(
                f"{tag_dir}: parameter {name} runs past the {bounds[-1]} elements of the "
                "flat partitions; the parameter shapes do not match the optimizer files"
            )
        group = next(g for g in range(len(group_sizes)) if bounds[g] <= offset < bounds[g + 1])
        grad = any(fp32[p.rank][p.group].requires_grad for p in pieces)
        out.append(ParamEntry(name, tuple(shape), torch.float32, "param", tuple(pieces), group,
                              requires_grad=grad))  # fmt: skip
        offset += part
    if offset * ws != bounds[-1] * ws:
        raise CheckpointError(
            f"{tag_dir}: consumed {offset * ws} of {bounds[-1] * ws} elements; the "
            "parameter shapes do not match the optimizer partitions"
        )
    return out
