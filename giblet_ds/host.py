"""Facts about this host that lower layers share: whether a process lives, and the free space of
a disk (standard library only; a layer of its own so that the run directory's lock and checkpoint
saves and the store writer ask one place)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["free_bytes", "pid_alive"]


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists on this host (also one of another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to someone else
        return True
    return True


def free_bytes(path: Path) -> int:
    """Bytes this process may still write on the file system of ``path`` (its nearest existing
    folder; ``statvfs``'s blocks free to users); 0 when no folder above it exists."""
    for folder in [path, *path.parents]:
        if folder.exists():
            return int(shutil.disk_usage(folder).free)
    return 0
