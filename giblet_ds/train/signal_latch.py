"""The first thing a training process does: latch SIGTERM and SIGUSR1 until the trainer can act.

SLURM's ``--signal=USR1@N``, ``scancel --signal`` and preemption may reach a rank at any moment,
also while it is still importing torch and DeepSpeed (seconds), joining the process group or
loading a checkpoint. Python's default action for SIGUSR1 and SIGTERM is to die, and a rank that
dies before its handler exists saves nothing and exits with no status the batch script can requeue.
launch/train.py therefore calls :func:`latch_preemption_signals` on its first line, before any slow
import; the latch only records the signal, and the trainer reads it (through
giblet_ds.train.preemption) at its first step boundary, or at once when training begins.

Standard library only, so that importing it costs nothing.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any

__all__ = ["PREEMPTION_SIGNALS", "clear", "latch_preemption_signals", "received", "unlatch"]

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: str | None = None
_installed = False


def _record(signum: int, frame: FrameType | None) -> None:
    global _received
    if _received is None:
        _received = signal.Signals(signum).name
        # os.write, not print: a handler that runs inside another write to sys.stderr would make
        # print raise "reentrant call".
        message = (
            f"giblet-ds: {_received} received: this rank stops at its next step boundary"
            " after a complete save\n"
        )
        os.write(sys.stderr.fileno(), message.encode())


def latch_preemption_signals() -> dict[int, Any]:
    """Record SIGTERM/SIGUSR1 from now on instead of dying (main thread only). Returns the handlers
    it replaced, for :func:`unlatch`; empty when the latch was already installed."""
    global _installed
    if _installed:
        return {}
    previous: dict[int, Any] = {sig: signal.signal(sig, _record) for sig in PREEMPTION_SIGNALS}
    _installed = True
    return previous


def unlatch(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`latch_preemption_signals` replaced (no-op when it replaced
    none: an earlier caller owns the latch)."""
    global _installed
    if previous:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _installed = False


def received() -> str | None:
    """The first preemption signal recorded since the latch was installed (or cleared), or None."""
    return _received


def clear() -> None:
    """Forget a recorded signal (tests; a process runs one training)."""
    global _received
    _received = None
