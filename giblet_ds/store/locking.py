"""Opening a store for reading where HDF5 file locking may be unavailable (NFS, some Lustre).

HDF5 locks a file with flock() when it opens it. On file systems without working locks the call
fails ("No locks available") and a valid store would look unreadable. Stores are never written
in place (builds rename a finished file), so readers need no lock; but HDF5 refuses one file
opened with two different locking flags in one process, so readers keep the default where it
works and switch per file, for the rest of the process, only where it cannot work.
"""

from __future__ import annotations

import errno
import os
import re
import warnings
from pathlib import Path

import h5py

from giblet_ds.errors import StoreError

__all__ = ["LOCKING_HINT", "lock_problem", "open_read_only"]

# Files whose lock calls failed with "locks unavailable": opened without locking from then on, so
# one process never opens a file with two different locking flags (HDF5 refuses that: "file
# locking flag values don't match", the reason a blanket locking=False was reverted in 87f93a0).
_UNLOCKED: set[str] = set()
# errno values of flock() meaning the file system cannot lock (NFS without lockd, some Lustre
# mounts), as opposed to EWOULDBLOCK: another process holds the lock.
_LOCKS_UNAVAILABLE = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)
LOCKING_HINT = (
    "set HDF5_USE_FILE_LOCKING=FALSE in the environment of every process that reads the store "
    "(stores are never written in place, so readers need no lock)"
)


def lock_problem(err: OSError) -> str | None:
    """What an ``OSError`` from opening an HDF5 file says about file locking, or None.

    ``"unavailable"``: the file system has no working locks (errno ENOLCK "No locks available",
    ENOSYS, EOPNOTSUPP); ``"held"``: another process holds a conflicting lock (it has the file
    open for writing); ``"mismatch"``: this process already has the file open with other locking
    flags. h5py reports flock failures as "unable to lock file, errno = N, error message = ...".
    """
    text = str(err)
    if "locking flag values don't match" in text:
        return "mismatch"
    if "unable to lock file" not in text:
        return None
    match = re.search(r"errno = (\d+)", text)
    code = int(match.group(1)) if match else err.errno
    return "unavailable" if code in _LOCKS_UNAVAILABLE else "held"


def open_read_only(path: str | Path) -> h5py.File:
    """Open a store read-only (the one place readers open the file).

    HDF5's default file locking is tried first, so a process that also opens the file with plain
    h5py uses the same flags. Where the file system cannot lock (flock fails with "No locks
    available" on some NFS and Lustre mounts) the file is opened without locking, and stays so
    for the rest of the process. A file another process holds locked for writing raises
    ``StoreError`` saying so. ``HDF5_USE_FILE_LOCKING=FALSE`` in the environment turns locking off
    for every open.
    """
    key = os.path.realpath(path)
    if key in _UNLOCKED:
        return h5py.File(path, "r", locking=False)
    try:
        return h5py.File(path, "r")
    except OSError as err:
        problem = lock_problem(err)
        if problem == "held":
            raise StoreError(
                path,
                f"another process holds a write lock on this file ({err}); stores are never "
                "written in place, so something else is writing it; if no process is, the "
                f"lock is stale: {LOCKING_HINT}",
            ) from None
        if problem not in ("unavailable", "mismatch"):
            raise
        try:
            handle = h5py.File(path, "r", locking=False)
        except OSError as again:
            raise StoreError(
                path,
                f"HDF5 file locking failed ({err}) and opening without a lock failed too "
                f"({again}); {LOCKING_HINT}",
            ) from None
        if problem == "unavailable":
            _UNLOCKED.add(key)
            warnings.warn(
                f"{path}: file locking is not available here ({err}); reading without a lock. "
                f"To silence this, {LOCKING_HINT}",
                RuntimeWarning,
                stacklevel=2,
            )
        return handle
