"""Preemption: SIGTERM or SIGUSR1 asks the run to stop at the next step boundary after a save.

SLURM (``#SBATCH --signal=USR1@300``, or its SIGTERM at the time limit or on preemption) and cloud
schedulers signal the training processes some time before killing them. A handler only records the
signal; the trainer asks every rank at each step boundary (:meth:`PreemptionWatch.agreed`, one
all-reduce of one number, so a signal seen by one rank stops all of them at the same step), saves a
complete step tag, writes an ``end`` record with status ``preempted`` and returns; launch/train.py
then exits with :data:`PREEMPTED_EXIT_CODE`, which launch/slurm_train.sbatch turns into a requeue.

DeepSpeed's own launcher answers SIGTERM by SIGKILLing its ranks (nothing would be saved): with it,
send SIGUSR1 to the rank processes themselves, not to the launcher (see README.md).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from giblet_ds.train import distributed as dist
from giblet_ds.train import signal_latch
from giblet_ds.train.signal_latch import PREEMPTION_SIGNALS

__all__ = ["PREEMPTED_EXIT_CODE", "PREEMPTION_SIGNALS", "PreemptionWatch"]

log = logging.getLogger("giblet_ds")

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry".
PREEMPTED_EXIT_CODE = 75


class PreemptionWatch:
    """Records SIGTERM/SIGUSR1 while installed, through :mod:`giblet_ds.train.signal_latch`.

    A signal the latch recorded before (launch/train.py installs it on its first line) counts as
    received. Leaving the context restores the handlers that were there before it, unless the latch
    was already installed then (it stays for the rest of the process)."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    @property
    def received(self) -> str | None:
        return signal_latch.received()

    def __enter__(self) -> PreemptionWatch:
        self._previous = signal_latch.latch_preemption_signals()
        return self

    def __exit__(self, *exc: object) -> None:
        signal_latch.unlatch(self._previous)
        self._previous = {}

    def agreed(self, device: torch.device | str = "cpu") -> bool:
        """True on every rank when any rank received a signal (collective: every rank calls)."""
        return dist.any_rank(self.received is not None, device)

    def signal_name(self) -> str:
        """The signal some rank received (collective; call after :meth:`agreed` said True)."""
        names = [n for n in dist.all_gather_object(self.received) if n]
        return names[0] if names else "a preemption signal"
