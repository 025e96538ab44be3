"""Disk space for a checkpoint save: checked before the save where its size is known, and a save
that fails to write said in one line.

A failed save is safe (the tag stays in ``.staging`` and ``latest`` keeps naming the last complete
tag), but torch reports a full disk as ``[enforce fail at inline_container.cc:672] . unexpected
pos 3200 vs 3092`` or an ``OSError`` naming no file. These messages name the tag, the folder, the
space needed and free, and the tag the same command resumes from.
"""

from __future__ import annotations

import errno
from pathlib import Path

from giblet_ds.host import free_bytes
from giblet_ds.run.layout import BEST_TAG, RunDir

__all__ = [
    "expected_tag_bytes",
    "is_write_failure",
    "record_write_failure",
    "space_problem",
    "write_failure",
]

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# What torch's zip writer says when a write came up short (it never passes errno on).
_TORCH_WRITE_FAILURES = ("inline_container", "file write failed", "unexpected pos")
FIX = "free space, lower checkpoint.keep_last, or set checkpoint.run_dir on a larger disk"


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def expected_tag_bytes(run: RunDir) -> tuple[int, str] | None:
    """The size of the newest complete tag and its name: what the next save will about take (the
    same model, optimizer and world size). None before the first save."""
    latest = run.latest_tag()
    candidates = [latest] if latest else []
    candidates += reversed(run.complete_step_tags())
    candidates.append(BEST_TAG)
    for tag in candidates:
        if run.is_complete(tag):
            folder = run.tag_dir(tag)
            return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()), tag
    return None


def _resume_hint(run: RunDir, tag: str | None) -> str:
    """Where the same command starts again; ``tag``: a partial copy of it was left in staging."""
    latest = run.latest_tag()
    where = (
        f"`latest` still names {latest}, complete, and the same command resumes from it"
        if latest
        else "No complete tag yet: the same command starts from scratch"
    )
    if tag is None:
        return where
    return f"{where}; the partial copy in {run.staging_tag_dir(tag)} is removed at the next start"


def space_problem(run: RunDir, tag: str) -> str | None:
    """Why ``tag`` cannot be saved (not enough free space for a tag the size of the last one),
    or None when it fits or its size is not known yet."""
    expected = expected_tag_bytes(run)
    if expected is None:
        return None
    needed, like = expected
    free = free_bytes(run.checkpoints)
    if free >= needed:
        return None
    return (
        f"checkpoint {tag} not saved: it needs about {_human(needed)} (the size of {like}) in "
        f"{run.checkpoints} and that file system has {_human(free)} free; nothing was written. "
        f"{_resume_hint(run, None)}. Fix: {FIX}"
    )


def is_write_failure(exc: BaseException) -> bool:
    """An error of writing a file (a full disk, a quota, an I/O error), as opposed to a bug."""
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_WRITE_FAILURES)


def write_failure(run: RunDir, tag: str, exc: BaseException) -> str:
    """One line for a save of ``tag`` that failed writing: what, where, needed and free."""
    free = free_bytes(run.checkpoints)
    expected = expected_tag_bytes(run)
    needed = "its size is not known yet"
    if expected is not None:
        needed = f"it needs about {_human(expected[0])} (the size of {expected[1]})"
    # torch's writer drops errno: a short write with (almost) nothing left is a full disk too
    full = getattr(exc, "errno", None) in _FULL_ERRNOS or free < (
        expected[0] if expected is not None else 1 << 20
    )
    what = "the disk is full" if full else "a write failed"
    if isinstance(exc, OSError) and exc.filename is not None:
        reason = f"{exc.strerror}: {exc.filename}"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return (
        f"checkpoint {tag} not saved: {what} writing into {run.checkpoints} ({reason}); "
        f"{needed}, {_human(free)} free now. {_resume_hint(run, tag)}. Fix: {FIX}"
    )


def record_write_failure(run: RunDir, path: Path, exc: OSError) -> str:
    """One line for a metric record that could not be appended to ``path`` (an OSError of a
    file write names no file)."""
    return (
        f"cannot append to {path} ({exc.strerror or exc}): {_human(free_bytes(path.parent))} "
        f"free on its file system. {_resume_hint(run, None)}. Fix: {FIX}"
    )
