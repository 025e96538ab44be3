"""Learning rate per optimizer step: linear warmup, then cosine decay to a floor; and how a resume
re-plans it when the run's length changed (docs/resume.md)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from giblet_ds.config import RunConfig

__all__ = ["Schedule", "lr_at", "make_scheduler", "set_schedule"]


@dataclass(frozen=True)
class Schedule:
    """Warmup from ``warmup_start_lr`` to ``peak_lr``, then a cosine down to ``min_lr`` at
    ``total_steps``. A resume that changed the run's length re-plans the cosine from the step it
    resumed at (``decay_start``), starting at the lr reached there (``decay_start_factor`` x
    ``peak_lr``), so the lr never jumps."""

    peak_lr: float
    warmup_steps: int
    warmup_start_lr: float
    min_lr: float
    total_steps: int
    decay_start: int = 0
    """Step where the cosine starts when after the warmup (a re-plan); else it starts there."""
    decay_start_factor: float = 1.0
    """The lr at ``decay_start``, as a fraction of ``peak_lr`` (scales with a new peak)."""

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based).

        Warmup: ``warmup_start_lr + (peak_lr - warmup_start_lr) * step / warmup_steps`` for step <
        warmup_steps. Then ``min_lr + (top - min_lr) * (1 + cos(pi * p)) / 2`` with p = (step -
        start) / (total_steps - start), clamped to [0, 1]; start and top are the warmup's end and
        peak_lr, or ``decay_start`` and ``decay_start_factor * peak_lr`` after a re-plan.
        """
        if step < self.warmup_steps:
            return (
                self.warmup_start_lr
                + (self.peak_lr - self.warmup_start_lr) * step / self.warmup_steps
            )
        start, top = self.warmup_steps, self.peak_lr
        if self.decay_start > self.warmup_steps:
            start, top = self.decay_start, self.decay_start_factor * self.peak_lr
        progress = min(1.0, (step - start) / max(1, self.total_steps - start))
        return self.min_lr + (top - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def continuing(self, saved: Schedule, step: int) -> Schedule:
        """This schedule (the resumed run's settings) continuing a run that followed ``saved`` up to
        its step ``step``. Same length: the saved re-plan, if any, is kept and every other setting
        (peak, warmup, floor) applies as if planned. Another length after the warmup: the cosine
        is re-planned from ``step``, at the fraction of the peak the saved schedule had reached."""
        if saved.total_steps == self.total_steps:
            return dataclasses.replace(
                self, decay_start=saved.decay_start, decay_start_factor=saved.decay_start_factor
            )
        if step <= max(saved.warmup_steps, saved.decay_start):
            return self  # the cosine had not begun: it is planned with the new length
        return dataclasses.replace(
            self, decay_start=step, decay_start_factor=saved.lr(step) / saved.peak_lr
        )

    @classmethod
    def of(cls, cfg: RunConfig, total_steps: int) -> Schedule:
        """The schedule a run of ``cfg`` plans over ``total_steps`` optimizer steps."""
        s = cfg.schedule
        return cls(cfg.optim.lr, s.warmup_steps, s.warmup_start_lr, s.min_lr, total_steps)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Schedule:
        return cls(**state)


def lr_at(
    step: int,
    *,
    peak_lr: float,
    warmup_steps: int,
    warmup_start_lr: float,
    min_lr: float,
    total_steps: int,
) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of a schedule never re-planned."""
    return Schedule(peak_lr, warmup_steps, warmup_start_lr, min_lr, total_steps).lr(step)


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
    schedule = Schedule(peak_lr, warmup_steps, warmup_start_lr, min_lr, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _factor(schedule))


def set_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, schedule: Schedule) -> None:
    """Make ``scheduler`` follow ``schedule`` from its current step on, and set each group's lr for
    the next step. After a load: DeepSpeed restores the scheduler's ``base_lrs`` and the optimizer's
    group lrs from the checkpoint, which would keep the saved peak (and the saved lr for the first
    resumed step) whatever the config now says."""
    groups = scheduler.optimizer.param_groups
    factor = _factor(schedule)
    scheduler.lr_lambdas = [factor for _ in groups]
    scheduler.base_lrs = [schedule.peak_lr for _ in groups]
    # LambdaLR's own arithmetic (base x factor): an unchanged resume stays bit-identical
    lr = schedule.peak_lr * factor(scheduler.last_epoch)
    for group in groups:
        group["lr"] = lr
        group["initial_lr"] = schedule.peak_lr
    scheduler._last_lr = [lr for _ in groups]  # what get_last_lr() reports


def _factor(schedule: Schedule) -> Any:
    """LambdaLR's multiplier of the base lr (= peak_lr). A plain function: LambdaLR saves no state
    for it, so a loaded checkpoint cannot bring back an old schedule's settings."""

    def factor(step: int) -> float:
        return schedule.lr(step) / schedule.peak_lr

    return factor
