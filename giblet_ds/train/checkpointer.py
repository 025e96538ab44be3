"""Save and load one tag: the engine's ZeRO files plus the trainer's resumable state bundle.

Every rank calls :meth:`Checkpointer.save`, :meth:`Checkpointer.verify` and
:meth:`Checkpointer.load` (all collective). A tag is written into an empty staging folder
(``checkpoints/.staging/<tag>``); once every rank has written its files, the ranks checksum them
in parallel (each a share), rank 0 writes ``run_config.yaml``, ``metadata.json`` (step, world
size, ZeRO stage, the resume pre-checks), ``manifest.json`` and the ``complete`` marker, and moves
the folder into place, replacing a tag of the same name as a whole. Only then does it move
``latest`` and prune old step tags (giblet_ds.run.layout, giblet_ds.run.manifest).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from giblet_ds.config import RunConfig, load_config, precision, zero_stage
from giblet_ds.config.resume_rules import (
    PRECISION_KEY,
    WORLD_SIZE_KEY,
    ZERO_STAGE_KEY,
    ResumePlan,
    check_resume,
)
from giblet_ds.config.saved_model import check_saved_design
from giblet_ds.errors import CheckpointError
from giblet_ds.run.layout import BEST_TAG, TAG_CONFIG_NAME, RunDir
from giblet_ds.run.manifest import (
    METADATA_NAME,
    TagMetadata,
    manifest_entries,
    read_manifest,
    read_metadata,
    verify_manifest,
    write_manifest,
    write_metadata,
)
from giblet_ds.run.resolver import CheckpointLocation, find_run_config, resolve_resume
from giblet_ds.run.save_space import is_write_failure, space_problem, write_failure
from giblet_ds.run.scripts import write_converter_scripts
from giblet_ds.store import ResumableDistributedSampler, StoreInfo
from giblet_ds.train import distributed as dist
from giblet_ds.train.engine import checkpoint_world_size, convert_to_universal
from giblet_ds.train.resume import check_resumed_length

__all__ = ["Checkpointer", "ResumeTarget", "check_store_hash"]

log = logging.getLogger("giblet_ds")


@dataclass(frozen=True)
class ResumeTarget:
    """The tag a resume loads and what the resume changes (docs/resume.md)."""

    location: CheckpointLocation
    plan: ResumePlan


class Checkpointer:
    """One run directory's checkpoints, as seen by the trainer."""

    def __init__(self, run: RunDir, *, keep_last: int) -> None:
        self.run = run
        self.keep_last = keep_last

    def clear_staging(self) -> None:
        """Drop what saves killed midway left in the staging folder (rank 0, at start-up)."""
        if dist.is_rank0():
            for folder in self.run.staging.iterdir() if self.run.staging.is_dir() else []:
                if folder.is_dir():
                    shutil.rmtree(folder, ignore_errors=True)
        dist.barrier()

    def resume_target(
        self,
        resume: str,
        *,
        cfg: RunConfig,
        store: StoreInfo,
        sampler: ResumableDistributedSampler,
        ds_config: dict[str, Any],
        verify: bool,
    ) -> ResumeTarget | None:
        """The tag ``checkpoint.resume`` names, checked (manifest, every changed setting against
        the resume table, store, sampler, the run's length against the saved step) before
        anything is converted or written; on a new world size its
        universal copy (and ``ds_config`` is switched to universal loading). None: start fresh."""
        location = resolve_resume(resume, self.run.path)
        if location is None:
            return None
        if verify:
            self.verify(location)
        config_path = find_run_config(location.path)
        check_saved_design(config_path)
        meta = read_metadata(location.path)
        now = precision(ds_config)
        outside = {
            ZERO_STAGE_KEY: (None if meta is None else meta.zero_stage, zero_stage(ds_config)),
            PRECISION_KEY: (saved_precision(location.path, meta, now=now), now),
            WORLD_SIZE_KEY: (None if meta is None else meta.world_size, sampler.num_replicas),
        }
        plan = check_resume(
            load_config(config_path), cfg, where=str(location.path), outside=outside
        )
        if meta is not None and meta.store_hash is not None:
            check_store_hash(meta.store_hash, store)
        if meta is not None and meta.sampler is not None:
            try:
                sampler.check_state(meta.sampler)
            except ValueError as exc:
                raise CheckpointError(f"cannot resume from {location.path}: {exc}") from None
        if meta is not None:  # the run's new length against the saved step, before converting
            check_resumed_length(cfg, step=meta.step, sampler=sampler, sampler_state=meta.sampler)
        if self.needs_universal(location, sampler.num_replicas):
            location = self.to_universal(location)
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
        return ResumeTarget(location, plan)

    def needs_universal(self, location: CheckpointLocation, world_size: int) -> bool:
        """True when ``location`` was written by another number of ranks (its metadata says)."""
        return checkpoint_world_size(location.path) != world_size

    def to_universal(self, location: CheckpointLocation) -> CheckpointLocation:
        """DeepSpeed's universal copy of a tag (made once, on rank 0), to load on a new world size."""
        log.info("checkpoint %s was written by another world size: converting", location.tag)
        universal = convert_to_universal(location.checkpoints_dir, location.tag)
        return CheckpointLocation(
            "tag",
            location.checkpoints_dir / universal,
            location.run,
            f"universal copy of {location.tag}",
        )

    def verify(self, location: CheckpointLocation) -> None:
        """Check the tag against its manifest, the checksums split over the ranks; every rank
        raises the same CheckpointError naming the first file that does not match."""
        error: str | None = None
        try:
            files = read_manifest(location.path) or {}
            names = sorted(files)[dist.rank() :: dist.world_size()]
            verify_manifest(location.path, names)
        except CheckpointError as exc:
            error = str(exc)
        errors = [e for e in dist.all_gather_object(error) if e]
        if errors:
            raise CheckpointError(errors[0])

    def save(
        self,
        engine: Any,
        tag: str,
        *,
        step: int,
        state: dict[str, Any],
        config_yaml: str,
        store_hash: str | None = None,
        mask_hash: str | None = None,
    ) -> Path:
        """Write ``tag`` on every rank with ``state`` as DeepSpeed's client state; returns its folder
        (see the module docstring for the order)."""
        staged = self.run.staging_tag_dir(tag)
        # Rank 0 judges the space for everyone (free space moves between the ranks' looks).
        problem = dist.broadcast_object(space_problem(self.run, tag) if dist.is_rank0() else None)
        if problem is not None:
            raise CheckpointError(problem)
        with self._write_errors(tag):
            if dist.is_rank0():
                self.run.fresh_staging(tag)
            dist.barrier()
            engine.save_checkpoint(
                str(self.run.staging), tag=tag, client_state=state, save_latest=False
            )
        dist.barrier()
        # Rank 0's listing for everyone (a shared file system may show other ranks late).
        names = dist.broadcast_object(sorted(p.name for p in staged.iterdir() if p.is_file()))
        mine = manifest_entries(staged, names[dist.rank() :: dist.world_size()])
        entries = {k: v for part in dist.all_gather_object(mine) for k, v in part.items()}
        if dist.is_rank0():
            with self._write_errors(tag):
                (staged / TAG_CONFIG_NAME).write_text(config_yaml)
                write_metadata(
                    staged,
                    TagMetadata(
                        tag=tag,
                        step=step,
                        world_size=int(getattr(engine, "dp_world_size", dist.world_size())),
                        zero_stage=int(engine.zero_optimization_stage()),
                        store_hash=store_hash,
                        sampler=state.get("sampler"),
                        mask_hash=mask_hash,
                        precision=engine_precision(engine),
                    ),
                )
                entries.update(manifest_entries(staged, [TAG_CONFIG_NAME, METADATA_NAME]))
                write_manifest(staged, entries)
                self.run.mark_complete(tag, step, staged=True)
                self.run.commit_staged(tag)
                write_converter_scripts(self.run.checkpoints, self.run.staging)
                if tag != BEST_TAG:
                    self.run.write_latest(tag)
                    self.run.prune_step_tags(self.keep_last)
        dist.barrier()
        return self.run.tag_dir(tag)

    @contextlib.contextmanager
    def _write_errors(self, tag: str) -> Iterator[None]:
        """A failed write of ``tag`` (a full disk above all) as one CheckpointError that names
        the tag, the folder, the space needed and free and the tag to resume from. A rank that
        raises it exits; the launcher stops the others."""
        try:
            yield
        except (OSError, RuntimeError) as exc:
            if not is_write_failure(exc):
                raise
            raise CheckpointError(write_failure(self.run, tag, exc)) from exc

    def load(self, engine: Any, location: CheckpointLocation) -> dict[str, Any]:
        """Load the engine (weights, optimizer, scheduler) and return the saved client state."""
        path, state = engine.load_checkpoint(
            str(location.checkpoints_dir),
            tag=location.tag,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None or state is None:
            raise CheckpointError(f"DeepSpeed could not load {location.path}")
        return dict(state)


def check_store_hash(saved: str, store: StoreInfo) -> None:
    """Refuse to resume a checkpoint trained on another store."""
    if saved != store.build_hash:
        raise CheckpointError(
            f"the checkpoint was trained on a store with hash {saved}, but data.store="
            f"{store.path} has {store.build_hash}; resume with the same store or start a new run "
            "directory"
        )


def engine_precision(engine: Any) -> str:
    """``bf16``, ``fp16`` or ``fp32``: what a DeepSpeed engine trains in (saved with each tag)."""
    if engine.bfloat16_enabled():
        return "bf16"
    return "fp16" if engine.fp16_enabled() else "fp32"


def saved_precision(tag_dir: Path, meta: TagMetadata | None, *, now: str) -> str | None:
    """The precision a tag was written in: its metadata's. For tags written before that was
    recorded, from DeepSpeed's optimizer file names: ``bf16`` for its bf16 ones; plain ZeRO
    files are fp32 or fp16 (they share their names), reported as ``now`` when that is one of
    them (not told apart) and as ``fp32 or fp16`` against bf16; None without optimizer files."""
    if meta is not None and meta.precision is not None:
        return meta.precision
    if any(tag_dir.glob("bf16_zero_pp_rank_*")):
        return "bf16"
    if any(tag_dir.glob("zero_pp_rank_*_optim_states.pt")):
        return now if now != "bf16" else "fp32 or fp16"
    return None
