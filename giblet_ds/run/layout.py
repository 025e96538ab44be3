"""The run directory: every file name the trainer writes and the tools read, and what a path means.

This module is the one home of those names; nothing else in the package spells them out.

```
RUN_DIR/
  config.resolved.yaml      the full run config after overrides
  metrics.jsonl             typed records, one JSON object per line (giblet_ds.run.records)
  train.log                 rank-0 log
  run.lock                  held by the training job that owns this folder (giblet_ds.run.lock)
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

What a user-given path means (run dir, checkpoints folder, tag, consolidated weights) is answered
by :mod:`giblet_ds.run.resolver`.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from giblet_ds.errors import CheckpointError

__all__ = [
    "BEST_TAG",
    "CONSOLIDATED_SUFFIXES",
    "COMPLETE_MARKER",
    "RunDir",
    "SAFE_WEIGHTS_NAME",
    "TAG_CONFIG_NAME",
    "TENSOR_KINDS_NAME",
    "UNIVERSAL_SUFFIX",
    "WEIGHTS_NAME",
    "is_zero_tag_dir",
    "step_tag",
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
LOCK_NAME = "run.lock"
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
CONSOLIDATED_IN_FOLDER = (
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
    def lock(self) -> Path:
        return self.path / LOCK_NAME

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
