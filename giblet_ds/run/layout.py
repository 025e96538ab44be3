"""The run directory: every file name the trainer writes and the tools read, and what a path means.

This module is the one home of those names; nothing else in the package spells them out.

```
RUN_DIR/
  config.resolved.yaml      the full run config after overrides
  metrics.jsonl             typed records, one JSON object per line (giblet_ds.run.records)
  train.log                 rank-0 log
  checkpoints/
    latest                  names the newest complete step tag (DeepSpeed's convention)
    step-00000123/          a DeepSpeed tag + run_config.yaml + metadata.json + manifest.json
                            + complete (written last; see giblet_ds.run.manifest)
    best/                   the best validation tag (never overwritten by the final weights)
    zero_to_fp32.py         giblet-ds's safe converter (in place of DeepSpeed's copy)
    zero_to_torch.py        DeepSpeed's dtype-choosing wrapper, which imports the file above
    .staging/<tag>/         a tag being written (moved into place when every rank has finished)
  wandb/
  wandb_run_id              the wandb run id of this run (fresh per run, reused on resume)
```

A tag is written into ``checkpoints/.staging/<tag>`` and moved into place by
:meth:`RunDir.commit_staged` only when every rank has written its files and rank 0 has written
``metadata.json``, ``manifest.json`` and the ``complete`` marker; a tag already there under that name
(e.g. the previous ``best``) is replaced as a whole, never mixed. Only then is ``latest`` moved. A
run killed during a save therefore resumes from the previous complete tag, and a later save of the
same tag starts from an empty staging folder.

Tools read only complete tags (:func:`resolve_checkpoint`): in a giblet-ds checkpoints folder a tag
without its ``complete`` marker is refused, naming the newest complete one.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from giblet_ds.errors import CheckpointError
from giblet_ds.run.manifest import METADATA_NAME, read_metadata, verify_manifest

__all__ = [
    "BEST_TAG",
    "CONSOLIDATED_SUFFIXES",
    "COMPLETE_MARKER",
    "CheckpointLocation",
    "RunDir",
    "SAFE_WEIGHTS_NAME",
    "TAG_CONFIG_NAME",
    "TENSOR_KINDS_NAME",
    "UNIVERSAL_SUFFIX",
    "WEIGHTS_NAME",
    "find_run_config",
    "is_zero_tag_dir",
    "resolve_checkpoint",
    "resolve_resume",
    "step_tag",
    "tag_world_size",
]

CONFIG_NAME = "config.resolved.yaml"
METRICS_NAME = "metrics.jsonl"
LOG_NAME = "train.log"
CHECKPOINTS_NAME = "checkpoints"
LATEST_NAME = "latest"
WANDB_NAME = "wandb"
BEST_TAG = "best"
COMPLETE_MARKER = "complete"
TAG_CONFIG_NAME = "run_config.yaml"
UNIVERSAL_SUFFIX = "-universal"
STAGING_NAME = ".staging"
WANDB_ID_NAME = "wandb_run_id"
# Beside consolidated weights: name -> param | frozen | buffer, so the audit judges a consolidated
# file as it judges the tag it came from (a .bin cannot tell trainable from frozen).
TENSOR_KINDS_NAME = "tensor_kinds.json"
STEP_TAG = re.compile(r"^step-(\d{8})$")
# DeepSpeed's model-state file names: one of them marks a folder as a ZeRO tag.
_MODEL_STATE_NAMES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
# Consolidated weights (tools/zero_to_fp32.py), with Hugging Face's names.
WEIGHTS_NAME = "pytorch_model.bin"
SAFE_WEIGHTS_NAME = "model.safetensors"
CONSOLIDATED_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
_CONSOLIDATED_IN_FOLDER = (
    SAFE_WEIGHTS_NAME + ".index.json",
    WEIGHTS_NAME + ".index.json",
    SAFE_WEIGHTS_NAME,
    WEIGHTS_NAME,
)


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def is_zero_tag_dir(path: Path) -> bool:
    """True when ``path`` holds the model-state file of a DeepSpeed tag."""
    return any((path / name).is_file() for name in _MODEL_STATE_NAMES)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class RunDir:
    """One run directory and the names inside it (see the module docstring)."""

    path: Path

    @classmethod
    def of(cls, path: str | Path) -> RunDir:
        return cls(Path(path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_NAME

    @property
    def log(self) -> Path:
        return self.path / LOG_NAME

    @property
    def wandb(self) -> Path:
        return self.path / WANDB_NAME

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_NAME

    def evaluation(self, split: str) -> Path:
        """Where the end-of-training evaluation of ``best`` on ``split`` goes."""
        return self.path / f"evaluation-{split}"

    def tag_dir(self, tag: str) -> Path:
        return self.checkpoints / tag

    @property
    def staging(self) -> Path:
        return self.checkpoints / STAGING_NAME

    def staging_tag_dir(self, tag: str) -> Path:
        """Where ``tag`` is written before :meth:`commit_staged` moves it into place."""
        return self.staging / tag

    @property
    def wandb_id(self) -> Path:
        return self.path / WANDB_ID_NAME

    # -- reading ---------------------------------------------------------------------------

    def tags(self) -> list[str]:
        """Every tag folder (complete or not), sorted by name."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(
            p.name for p in self.checkpoints.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def is_complete(self, tag: str) -> bool:
        return (self.tag_dir(tag) / COMPLETE_MARKER).is_file()

    def completed_step(self, tag: str) -> int | None:
        """The step written in a tag's ``complete`` marker, None when incomplete."""
        marker = self.tag_dir(tag) / COMPLETE_MARKER
        if not marker.is_file():
            return None
        try:
            return int(marker.read_text().split()[0])
        except (ValueError, IndexError):
            return None

    def complete_step_tags(self) -> list[str]:
        """Complete step tags, oldest first."""
        return [t for t in self.tags() if STEP_TAG.match(t) and self.is_complete(t)]

    def latest_tag(self) -> str | None:
        """The tag named by ``checkpoints/latest`` (None when there is no such file)."""
        latest = self.checkpoints / LATEST_NAME
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        if not tag:
            raise CheckpointError(f"{latest}: file is empty, it should name a tag")
        return tag

    # -- writing (rank 0 only) ----------------------------------------------------------------

    def mark_complete(self, tag: str, step: int, *, staged: bool = False) -> None:
        folder = self.staging_tag_dir(tag) if staged else self.tag_dir(tag)
        _atomic_write(folder / COMPLETE_MARKER, f"{step}\n")

    def unmark_complete(self, tag: str) -> None:
        (self.tag_dir(tag) / COMPLETE_MARKER).unlink(missing_ok=True)

    def fresh_staging(self, tag: str) -> Path:
        """An empty staging folder for ``tag`` (what a crashed save left there is deleted)."""
        folder = self.staging_tag_dir(tag)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def commit_staged(self, tag: str) -> Path:
        """Move the staged ``tag`` into place, replacing a tag of that name as a whole.

        The old folder is first renamed aside (one rename each way, so readers see the old tag or
        the new one, and during the instant between them no tag), then deleted, together with its
        universal-format copy, which was converted from the old files.
        """
        staged, target = self.staging_tag_dir(tag), self.tag_dir(tag)
        if not (staged / COMPLETE_MARKER).is_file():
            raise CheckpointError(f"{staged}: staged tag has no '{COMPLETE_MARKER}' marker")
        old = self.staging / f"{tag}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(staged, target)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.tag_dir(tag + UNIVERSAL_SUFFIX), ignore_errors=True)
        return target

    def write_latest(self, tag: str) -> None:
        """DeepSpeed's ``latest`` file (read by load_checkpoint and zero_to_fp32), atomically."""
        _atomic_write(self.checkpoints / LATEST_NAME, tag)

    def prune_step_tags(self, keep_last: int) -> list[str]:
        """Delete all but the newest ``keep_last`` complete step tags (and stale incomplete ones
        older than the newest complete tag). Returns the deleted tag names."""
        complete = self.complete_step_tags()
        doomed = complete[:-keep_last] if keep_last > 0 else []
        if complete:
            newest = complete[-1]
            doomed += [
                t
                for t in self.tags()
                if STEP_TAG.match(t) and not self.is_complete(t) and t < newest
            ]
        for name in doomed:
            shutil.rmtree(self.tag_dir(name), ignore_errors=True)
            # its universal-format copy, made when a run resumed on another world size
            shutil.rmtree(self.tag_dir(name + UNIVERSAL_SUFFIX), ignore_errors=True)
        return doomed


# ---------------------------------------------------------------------------------------------
# What a path means


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
    for name in _CONSOLIDATED_IN_FOLDER:
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
