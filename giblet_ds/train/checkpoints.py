"""Checkpoint folders: tag names, the `latest` pointer, completeness, resume resolution, pruning.

A tag is complete when every rank has written its files: the trainer calls :func:`mark_complete`
after a barrier that follows DeepSpeed's save, and only then moves ``latest``. A run killed during
a save therefore resumes from the previous complete tag.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from giblet_ds.errors import CheckpointError

__all__ = [
    "BEST_TAG",
    "UNIVERSAL_SUFFIX",
    "COMPLETE_MARKER",
    "complete_step_tags",
    "is_complete",
    "mark_complete",
    "prune_step_tags",
    "resolve_resume",
    "step_tag",
    "write_latest",
]

BEST_TAG = "best"
COMPLETE_MARKER = "complete"
UNIVERSAL_SUFFIX = "-universal"
STEP_TAG = re.compile(r"^step-(\d{8})$")


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE_MARKER).is_file()


def mark_complete(tag_dir: Path, step: int) -> None:
    _atomic_write(tag_dir / COMPLETE_MARKER, f"{step}\n")


def write_latest(checkpoint_dir: Path, tag: str) -> None:
    """DeepSpeed's `latest` file (read by load_checkpoint and zero_to_fp32), written atomically."""
    _atomic_write(checkpoint_dir / "latest", tag)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def complete_step_tags(checkpoint_dir: Path) -> list[str]:
    """Complete step tags, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    tags = [p.name for p in checkpoint_dir.iterdir() if STEP_TAG.match(p.name) and is_complete(p)]
    return sorted(tags)


def resolve_resume(resume: str, run_dir: Path) -> tuple[Path, str] | None:
    """(checkpoint_dir, tag) to load, or None to start fresh.

    ``auto``: the newest complete tag under RUN_DIR/checkpoints (None when there is none). ``none``:
    start fresh. A path: a tag folder, or a checkpoints folder (its newest complete tag); a path
    that holds no complete checkpoint is an error naming what was searched.
    """
    if resume == "none":
        return None
    if resume == "auto":
        checkpoint_dir = run_dir / "checkpoints"
        tags = complete_step_tags(checkpoint_dir)
        return (checkpoint_dir, tags[-1]) if tags else None
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume {path}: no such file or folder")
    if path.is_dir() and is_complete(path):
        return path.parent, path.name
    if path.is_dir() and (tags := complete_step_tags(path)):
        return path, tags[-1]
    if path.is_dir() and (tags := complete_step_tags(path / "checkpoints")):
        return path / "checkpoints", tags[-1]
    raise CheckpointError(
        f"--resume {path}: no complete checkpoint found (searched {path}, {path / 'checkpoints'} "
        f"for folders named step-NNNNNNNN holding a '{COMPLETE_MARKER}' file)"
    )


def prune_step_tags(checkpoint_dir: Path, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete step tags (and stale incomplete ones older
    than the newest complete tag). Returns the deleted tag names."""
    complete = complete_step_tags(checkpoint_dir)
    doomed = complete[:-keep_last] if keep_last > 0 else []
    if complete:
        newest = complete[-1]
        doomed += [
            p.name
            for p in checkpoint_dir.iterdir()
            if STEP_TAG.match(p.name) and not is_complete(p) and p.name < newest
        ]
    for name in doomed:
        shutil.rmtree(checkpoint_dir / name, ignore_errors=True)
        # its universal-format copy, made when a run resumed on another world size
        shutil.rmtree(checkpoint_dir / f"{name}{UNIVERSAL_SUFFIX}", ignore_errors=True)
    return doomed
