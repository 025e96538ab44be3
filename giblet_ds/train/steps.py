"""What one optimizer step produced, and the bookkeeping around it: micro-batch grouping for
gradient accumulation, skipped-step counting, MFU."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from giblet_ds.errors import GibletError
from giblet_ds.run.records import SkipRecord

__all__ = ["SkipCounter", "StepResult", "accumulation_groups", "mfu"]

log = logging.getLogger("giblet_ds")


@dataclass
class StepResult:
    """One optimizer step, averaged over its micro batches."""

    loss: float
    terms: dict[str, float]
    applied: bool
    lr: float
    """The learning rate this step used (the schedule advances only on applied steps)."""
    nonfinite_terms: list[str] = field(default_factory=list)


def accumulation_groups(
    batches: Iterable[dict[str, torch.Tensor]], accum: int, steps: int
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """At most ``steps`` groups of ``accum`` consecutive micro batches (one optimizer step each)."""
    if steps <= 0:
        return
    group: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []
            steps -= 1
            if steps == 0:
                return


def mfu(flops_per_sample: int, samples: int, seconds: float, peak_flops: float | None,
        world_size: int) -> float | None:  # fmt: skip
    """Model FLOP utilization (0..1) of one step; None when the device's peak is unknown."""
    if not peak_flops:
        return None
    return flops_per_sample * samples / seconds / (peak_flops * world_size)


@dataclass
class SkipCounter:
    """Optimizer steps skipped for a non-finite loss or gradient: in all, and in a row."""

    total: int = 0
    consecutive: int = 0

    def update(self, result: StepResult, step: int) -> SkipRecord | None:
        """Count ``result``; the record to log when the step was skipped."""
        if result.applied:
            self.consecutive = 0
            return None
        self.total += 1
        self.consecutive += 1
        terms = result.nonfinite_terms or ["gradient"]
        log.warning("step %d skipped: non-finite %s (%d in a row)", step, ", ".join(terms),
                    self.consecutive)  # fmt: skip
        return SkipRecord(step=step, terms=terms, consecutive=self.consecutive)

    def check(self, record: SkipRecord, limit: int) -> None:
        """Stop the run after ``limit`` skipped steps in a row (train.max_consecutive_skips)."""
        if self.consecutive >= limit:
            raise GibletError(
                f"{self.consecutive} optimizer steps in a row had a non-finite loss or gradient, "
                f"the last at step {record.step} (terms: {', '.join(record.terms)}); stopping. "
                "Lower optim.lr or check the store for bad values (tools/audit_weights.py on the "
                "last checkpoint)"
            )

    def state_dict(self) -> dict[str, Any]:
        # the key names of checkpoints written before this class existed
        return {"skipped_total": self.total, "consecutive_skips": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = int(state["skipped_total"])
        self.consecutive = int(state["consecutive_skips"])
