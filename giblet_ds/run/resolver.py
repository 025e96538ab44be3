"""What a path means: one resolver from any path a user may give (a run directory, a checkpoints
folder, a tag folder, a consolidated file or folder) to one checkpoint, used by the trainer's
``--resume`` and by every tool.

Tools read only complete tags: in a giblet-ds checkpoints folder a tag without its ``complete``
marker is refused, naming the newest complete one; a folder DeepSpeed wrote alone (no markers at
all) is read as DeepSpeed would, through ``latest``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from giblet_ds.errors import CheckpointError
from giblet_ds.run.layout import (
    BEST_TAG,
    CHECKPOINTS_NAME,
    COMPLETE_MARKER,
    CONFIG_NAME,
    CONSOLIDATED_IN_FOLDER,
    CONSOLIDATED_SUFFIXES,
    LATEST_NAME,
    SAFE_WEIGHTS_NAME,
    STEP_TAG,
    TAG_CONFIG_NAME,
    UNIVERSAL_SUFFIX,
    RunDir,
    is_zero_tag_dir,
)
from giblet_ds.run.manifest import METADATA_NAME, read_metadata, verify_manifest

__all__ = [
    "CheckpointLocation",
    "Prefer",
    "find_run_config",
    "resolve_checkpoint",
    "resolve_resume",
    "tag_world_size",
]


@dataclass(frozen=True)
class CheckpointLocation:
    """What a user-given path resolved to.

    ``kind`` is ``tag`` (a DeepSpeed ZeRO tag folder, ``path`` is that folder) or ``consolidated``
    (``path`` is a ``.bin``/``.safetensors`` file or a ``*.index.json`` shard index). ``run`` is the
    run directory the tag belongs to, when the layout says so; ``how`` says how it was chosen.
    """

    kind: Literal["tag", "consolidated"]
    path: Path
    run: RunDir | None
    how: str

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def checkpoints_dir(self) -> Path:
        return self.path.parent


Prefer = Literal["latest", "best"]


def _run_of_checkpoints(checkpoints: Path) -> RunDir:
    return (
        RunDir(checkpoints.parent) if checkpoints.name == CHECKPOINTS_NAME else RunDir(checkpoints)
    )


def _keeps_markers(checkpoints: Path) -> bool:
    """True for a giblet-ds checkpoints folder, whose tags count only with a ``complete`` marker;
    False for a folder DeepSpeed wrote alone (no markers at all), read as DeepSpeed would."""
    if checkpoints.name == CHECKPOINTS_NAME and (checkpoints.parent / CONFIG_NAME).is_file():
        return True
    return any(
        (p / COMPLETE_MARKER).is_file() or (p / METADATA_NAME).is_file()
        for p in checkpoints.iterdir()
        if p.is_dir()
    )


def _complete_tags(checkpoints: Path) -> list[str]:
    """Complete tags (step tags and ``best``), oldest step first; a step tag wins a tie."""
    steps = []
    for p in checkpoints.iterdir():
        if p.is_dir() and not p.name.startswith(".") and not p.name.endswith(UNIVERSAL_SUFFIX):
            step = _marker_step(p)
            if step is not None and is_zero_tag_dir(p):
                steps.append((step, p.name != BEST_TAG, p.name))
    return [name for _, _, name in sorted(steps)]


def _marker_step(tag_dir: Path) -> int | None:
    marker = tag_dir / COMPLETE_MARKER
    if not marker.is_file():
        return None
    try:
        return int(marker.read_text().split()[0])
    except (ValueError, IndexError):
        return -1  # a marker without a step (older DeepSpeed-only copies): complete, oldest


def _refuse_incomplete(tag_dir: Path) -> None:
    """Raise naming ``tag_dir`` and the newest complete tag beside it, if it lacks its marker."""
    if (tag_dir / COMPLETE_MARKER).is_file() or not _keeps_markers(tag_dir.parent):
        return
    complete = _complete_tags(tag_dir.parent)
    newest = (
        f"the newest complete tag is {complete[-1]} ({tag_dir.parent / complete[-1]})"
        if complete
        else f"{tag_dir.parent} holds no complete tag"
    )
    raise CheckpointError(
        f"{tag_dir}: tag {tag_dir.name!r} is incomplete (no '{COMPLETE_MARKER}' marker: a save "
        f"that did not finish, its files may mix two steps); {newest}"
    )


def _pick_tag(checkpoints: Path, tag: str | None, prefer: Prefer) -> CheckpointLocation:
    """A tag inside a checkpoints folder: the one named, else ``best`` or the newest complete."""
    run = _run_of_checkpoints(checkpoints)
    found = sorted(
        p.name
        for p in checkpoints.iterdir()
        if p.is_dir() and not p.name.startswith(".") and is_zero_tag_dir(p)
    )
    if tag is not None:
        if not (checkpoints / tag).is_dir():
            raise CheckpointError(
                f"{checkpoints / tag}: tag folder not found (tags in {checkpoints}: "
                f"{found or 'none'})"
            )
        _refuse_incomplete(checkpoints / tag)
        return CheckpointLocation("tag", checkpoints / tag, run, f"tag {tag} as named")
    markers = _keeps_markers(checkpoints)
    best = checkpoints / BEST_TAG
    skipped = ""
    if prefer == "best" and best.is_dir() and is_zero_tag_dir(best):
        if not markers or (best / COMPLETE_MARKER).is_file():
            return CheckpointLocation("tag", best, run, "the best tag")
        skipped = f"'{BEST_TAG}' is incomplete, skipped; "
    complete = [
        t for t in found if STEP_TAG.match(t) and (checkpoints / t / COMPLETE_MARKER).is_file()
    ]
    if complete:
        return CheckpointLocation(
            "tag",
            checkpoints / complete[-1],
            run,
            f"{skipped}the newest complete tag {complete[-1]}",
        )
    if markers:
        any_complete = _complete_tags(checkpoints)
        if any_complete:
            name = any_complete[-1]
            return CheckpointLocation(
                "tag", checkpoints / name, run, f"{skipped}the newest complete tag {name}"
            )
        raise CheckpointError(
            f"{checkpoints}: no complete checkpoint (no tag folder holds a '{COMPLETE_MARKER}' "
            f"marker; tags found: {found or 'none'}, all from saves that did not finish)"
        )
    latest = checkpoints / LATEST_NAME
    if latest.is_file():  # a plain DeepSpeed checkpoints folder (no completeness markers)
        name = latest.read_text().strip()
        if not name:
            raise CheckpointError(f"{latest}: file is empty, it should name a tag")
        if not (checkpoints / name).is_dir():
            raise CheckpointError(
                f"{checkpoints / name}: tag folder not found (named by {latest}; tags in "
                f"{checkpoints}: {found or 'none'})"
            )
        return CheckpointLocation("tag", checkpoints / name, run, f"tag {name} named by 'latest'")
    raise CheckpointError(
        f"{checkpoints}: no complete checkpoint (no '{LATEST_NAME}' file and no step-NNNNNNNN "
        f"folder holding a '{COMPLETE_MARKER}' file; tags found: {found or 'none'}); pass a tag"
    )


def resolve_checkpoint(
    path: str | Path,
    *,
    tag: str | None = None,
    prefer: Prefer = "latest",
    verify: bool = True,
) -> CheckpointLocation:
    """Resolve any path a user may give to one checkpoint.

    Accepted: a consolidated file (``.bin``, ``.pt``, ``.safetensors``, ``*.index.json``), a
    folder of consolidated weights, a ZeRO tag folder, a checkpoints folder or a run directory
    (``tag`` if given, else ``best`` when ``prefer="best"`` and complete, else the newest complete
    tag; in a folder DeepSpeed wrote alone, the tag named by ``latest``). In a giblet-ds
    checkpoints folder only complete tags are read: a tag named without its ``complete`` marker
    raises CheckpointError naming the newest complete tag. With ``verify`` a tag's files are
    checked against its manifest (sizes and checksums; giblet_ds.run.manifest), naming the file
    that does not match. Raises CheckpointError naming what was searched.
    """
    location = _resolve(Path(path), tag, prefer)
    if verify and location.kind == "tag":
        verify_manifest(location.path)
    return location


def _resolve(path: Path, tag: str | None, prefer: Prefer) -> CheckpointLocation:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.name.endswith(".index.json") or path.suffix in CONSOLIDATED_SUFFIXES:
            return CheckpointLocation("consolidated", path, None, "the file as given")
        raise CheckpointError(
            f"{path}: not a .bin/.pt/.safetensors file or *.index.json shard index"
        )
    if is_zero_tag_dir(path):
        if tag is not None:
            raise CheckpointError(f"{path} is a tag folder itself; drop the tag {tag!r}")
        _refuse_incomplete(path)
        parent = path.parent
        run = _run_of_checkpoints(parent) if parent.name == CHECKPOINTS_NAME else None
        return CheckpointLocation("tag", path, run, "the tag folder as given")
    if (path / CHECKPOINTS_NAME).is_dir():
        return _pick_tag(path / CHECKPOINTS_NAME, tag, prefer)
    if (path / LATEST_NAME).is_file() or any(
        is_zero_tag_dir(p) for p in path.iterdir() if p.is_dir()
    ):
        return _pick_tag(path, tag, prefer)
    for name in CONSOLIDATED_IN_FOLDER:
        if (path / name).is_file():
            return CheckpointLocation("consolidated", path / name, None, f"{name} in the folder")
    raise CheckpointError(
        f"{path}: no checkpoint here (no ZeRO tag files, no {CHECKPOINTS_NAME}/ folder, no "
        f"'{LATEST_NAME}' file, no consolidated weights such as {SAFE_WEIGHTS_NAME})"
    )


def resolve_resume(resume: str, run_dir: Path) -> CheckpointLocation | None:
    """The checkpoint ``checkpoint.resume`` asks for, or None to start fresh.

    ``auto``: the newest complete step tag of RUN_DIR (None when there is none). ``none``: start
    fresh. A path: anything :func:`resolve_checkpoint` accepts that is a tag; it must be complete.
    The manifest is not checked here: the trainer's ranks check it together (faster).
    """
    if resume == "none":
        return None
    if resume == "auto":
        tags = RunDir(run_dir).complete_step_tags()
        if not tags:
            return None
        return CheckpointLocation(
            "tag", RunDir(run_dir).tag_dir(tags[-1]), RunDir(run_dir), f"newest complete {tags[-1]}"
        )
    try:
        location = resolve_checkpoint(resume, verify=False)
    except CheckpointError as exc:
        raise CheckpointError(f"--resume {resume}: {exc}") from None
    if location.kind != "tag":
        raise CheckpointError(
            f"--resume {resume}: {location.path} holds consolidated weights, which carry no "
            "optimizer or sampler state; resume from a ZeRO tag folder"
        )
    if not (location.path / COMPLETE_MARKER).is_file():
        raise CheckpointError(
            f"--resume {resume}: {location.path} has no '{COMPLETE_MARKER}' marker (a save that "
            "did not finish); pick a complete tag"
        )
    return location


def tag_world_size(tag_dir: Path) -> int | None:
    """The data-parallel world size that wrote ``tag_dir``, from its ``metadata.json`` (None when
    the tag has none, e.g. one DeepSpeed wrote alone)."""
    meta = read_metadata(tag_dir)
    return None if meta is None else meta.world_size


def find_run_config(checkpoint: Path) -> Path:
    """The run config saved with a checkpoint: in the tag/file's folder or up to 3 folders up."""
    start = checkpoint if checkpoint.is_dir() else checkpoint.parent
    searched = []
    for folder in [start, *list(start.parents)[:3]]:
        for name in (TAG_CONFIG_NAME, CONFIG_NAME):
            candidate = folder / name
            searched.append(str(candidate))
            if candidate.is_file():
                return candidate
    raise CheckpointError(
        f"{checkpoint}: no run config found (searched {', '.join(searched)}); pass --config"
    )
