"""Save and load one tag: the engine's ZeRO files plus the trainer's resumable state bundle.

Every rank calls :meth:`Checkpointer.save` and :meth:`Checkpointer.load` (both are collective). A tag
is complete once every rank has written its files: rank 0 writes the ``complete`` marker after a
barrier, and only then moves ``latest`` and prunes old step tags (giblet_ds.run.layout).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from giblet_ds.errors import CheckpointError
from giblet_ds.run.layout import (
    BEST_TAG,
    TAG_CONFIG_NAME,
    CheckpointLocation,
    RunDir,
)
from giblet_ds.train import distributed as dist
from giblet_ds.train.engine import checkpoint_world_size, convert_to_universal

__all__ = ["Checkpointer"]

log = logging.getLogger("giblet_ds")


class Checkpointer:
    """One run directory's checkpoints, as seen by the trainer."""

    def __init__(self, run: RunDir, *, keep_last: int) -> None:
        self.run = run
        self.keep_last = keep_last

    def needs_universal(self, location: CheckpointLocation, world_size: int) -> bool:
        """True when ``location`` was written by another number of ranks."""
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

    def save(
        self, engine: Any, tag: str, *, step: int, state: dict[str, Any], config_yaml: str
    ) -> Path:
        """Write ``tag`` on every rank with ``state`` as DeepSpeed's client state; returns its folder.

        Rewriting ``best`` drops its marker first: it is incomplete until every rank has written.
        """
        tag_dir = self.run.tag_dir(tag)
        if dist.is_rank0():
            self.run.unmark_complete(tag)
        dist.barrier()
        engine.save_checkpoint(
            str(self.run.checkpoints), tag=tag, client_state=state, save_latest=False
        )
        dist.barrier()
        if dist.is_rank0():
            (tag_dir / TAG_CONFIG_NAME).write_text(config_yaml)
            self.run.mark_complete(tag, step)
            if tag != BEST_TAG:
                self.run.write_latest(tag)
                self.run.prune_step_tags(self.keep_last)
        dist.barrier()
        return tag_dir

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
