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
import signal
from types import FrameType
from typing import Any

import torch

from giblet_ds.train import distributed as dist

__all__ = ["PREEMPTED_EXIT_CODE", "PREEMPTION_SIGNALS", "PreemptionWatch"]

log = logging.getLogger("giblet_ds")

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry".
PREEMPTED_EXIT_CODE = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatch:
    """Records SIGTERM/SIGUSR1 while installed (a context manager restores the old handlers)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("%s received: stopping after this step's save", self.received)

    def __enter__(self) -> PreemptionWatch:
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self, device: torch.device | str = "cpu") -> bool:
        """True on every rank when any rank received a signal (collective: every rank calls)."""
        return dist.any_rank(self.received is not None, device)

    def signal_name(self) -> str:
        """The signal some rank received (collective; call after :meth:`agreed` said True)."""
        names = [n for n in dist.all_gather_object(self.received) if n]
        return names[0] if names else "a preemption signal"
