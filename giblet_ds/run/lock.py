"""One training job per run directory: a lock file that names its holder.

Two trainings writing one run directory interleave their saves, their ``latest`` and their
``metrics.jsonl``; a scheduler that starts a job twice (or a user who submits the same command
again) must be refused before anything is written. The first rank takes ``RUN_DIR/run.lock``:

- liveness comes from an OS lock (``flock``) held on the open file for the life of the process, so
  a holder that dies for any reason (SIGKILL, a lost node) leaves a lock that the next job takes
  over, with a warning naming the old holder;
- the file's text names the holder (host, pid, SLURM job id and restart count, start time), so a
  refusal says who holds it;
- where the file system offers no ``flock`` (some NFS and Lustre mounts), the record alone decides:
  a holder on this host whose pid is gone, or a holder of this same SLURM job id (a requeued job:
  SLURM ends every task of a job before it requeues it), is taken over; anything else is refused
  with the path to delete once the user is sure the holder is gone.

The lock is released (and its file removed) by :meth:`RunLock.release`, and by the OS at exit.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from giblet_ds.errors import GibletError
from giblet_ds.host import pid_alive

__all__ = ["LockHolder", "RunDirLockedError", "RunLock"]

_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


class RunDirLockedError(GibletError):
    """Another live job holds the run directory."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a run directory."""

    host: str
    pid: int
    slurm_job_id: str | None
    slurm_restart_count: str | None
    started: str

    @classmethod
    def current(cls, env: Mapping[str, str] | None = None) -> LockHolder:
        env = os.environ if env is None else env
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            slurm_job_id=env.get("SLURM_JOB_ID"),
            slurm_restart_count=env.get("SLURM_RESTART_COUNT"),
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        """The holder a lock file names; None for an empty or foreign file."""
        try:
            raw = json.loads(text)
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        if self.slurm_job_id and self.slurm_restart_count not in (None, "", "0"):
            job += f" (restart {self.slurm_restart_count})"
        return f"host {self.host}, pid {self.pid}{job}, since {self.started}"


class RunLock:
    """The lock of one run directory's ``run.lock`` file (see the module docstring)."""

    def __init__(self, path: Path, holder: LockHolder | None = None) -> None:
        self.path = Path(path)
        self.holder = holder or LockHolder.current()
        self.took_over: LockHolder | None = None
        """The previous holder whose stale lock this one replaced, if any."""
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock; raises :class:`RunDirLockedError` naming the holder when it is held."""
        handle = open(self.path, "a+")  # noqa: SIM115 (held open for the life of the lock)
        try:
            handle.seek(0)
            previous = LockHolder.parse(handle.read())
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise self._held(previous) from None
                if exc.errno not in _NO_FLOCK:
                    raise
                self._judge_without_flock(previous)
            self.took_over = previous
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(asdict(self.holder)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            handle.close()
            raise
        self._file = handle

    def _judge_without_flock(self, previous: LockHolder | None) -> None:
        if previous is None:
            return
        me = self.holder
        if previous.slurm_job_id and previous.slurm_job_id == me.slurm_job_id:
            return  # a requeued job: SLURM ended the old tasks before requeueing
        if previous.host == me.host and not pid_alive(previous.pid):
            return
        if previous.host == me.host and previous.pid == me.pid:
            return
        raise RunDirLockedError(
            f"{self.path} names {previous.describe()}, and this file system offers no flock to"
            " tell whether that holder is alive; if no job uses this run directory any more,"
            f" delete {self.path} and start again"
        )

    def _held(self, holder: LockHolder | None) -> RunDirLockedError:
        who = holder.describe() if holder else "an unnamed process"
        return RunDirLockedError(
            f"the run directory {self.path.parent} is in use by another training ({who}):"
            " two jobs would interleave their checkpoints and logs. Wait for it to end, cancel it,"
            " or give this run another checkpoint.run_dir"
        )

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._file is None:
            return
        try:
            current = LockHolder.parse(self.path.read_text()) if self.path.exists() else None
            if current == self.holder:
                self.path.unlink()
        finally:
            self._file.close()
            self._file = None
