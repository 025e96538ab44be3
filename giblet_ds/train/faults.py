"""Fault injection for tests of the failure paths (never set in real runs).

GIBLET_FAULT_NAN_STEPS=3,4   rank 0's batch becomes NaN at these optimizer steps (1-based).
GIBLET_FAULT_KILL_AT_STEP=5  after step 5 and what follows it (validation and saves; for an
                             epoch's last step, the end-of-epoch ones), rank 0 SIGKILLs its whole
                             process group, as a crashed node would.
GIBLET_FAULT_SIGNAL_AT_STEP=5:USR1
                             right after step 5's optimizer step, rank 0 (only) sends itself the
                             signal (USR1 or TERM), as a scheduler preempting the job would.
GIBLET_FAULT_SLOW_STEPS=2.5  every rank sleeps this many seconds after each optimizer step, so a
                             test can signal a real job (scancel, a time limit) mid-run; the
                             numbers are those of a run without it.
"""

from __future__ import annotations

import os
import signal
import time

import torch

__all__ = ["maybe_kill", "maybe_poison", "maybe_signal", "maybe_slow_down"]


def _steps(name: str) -> set[int]:
    raw = os.environ.get(name, "")
    return {int(s) for s in raw.split(",") if s.strip()}


def maybe_poison(batch: dict[str, torch.Tensor], step: int, rank: int) -> None:
    if rank == 0 and step in _steps("GIBLET_FAULT_NAN_STEPS"):
        batch["video"] = torch.full_like(batch["video"], float("nan"))


def maybe_kill(step: int, rank: int) -> None:
    if rank == 0 and step in _steps("GIBLET_FAULT_KILL_AT_STEP"):
        os.killpg(os.getpgrp(), signal.SIGKILL)


def maybe_signal(step: int, rank: int) -> None:
    raw = os.environ.get("GIBLET_FAULT_SIGNAL_AT_STEP", "")
    if rank != 0 or not raw:
        return
    at, _, name = raw.partition(":")
    if int(at) == step:
        os.kill(os.getpid(), getattr(signal, f"SIG{name or 'USR1'}"))


def maybe_slow_down() -> None:
    seconds = os.environ.get("GIBLET_FAULT_SLOW_STEPS", "")
    if seconds:
        time.sleep(float(seconds))
