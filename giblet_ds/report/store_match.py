"""Is the store a tool was given the one the checkpoint was trained on?

A model's fMRI outputs are per voxel of its training store's mask, in that mask's order. A store
with the same voxel count but another mask passes every size check and scores the model against
other voxels (a meaningless r, maps in another space), so :func:`check_store_match` refuses it. A
store with the same mask but other data (another session, a cross-store test) is legitimate: it is
said on the console and recorded in the tool's outputs, never passed silently.

What the checkpoint was trained on comes from its tag's ``metadata.json`` (``store_hash``,
``mask_hash``), else from the training store its run config names (``data.store``) when that file
is still there.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from giblet_ds.config import RunConfig
from giblet_ds.errors import CheckpointError, GibletError
from giblet_ds.run.manifest import read_metadata
from giblet_ds.run.resolver import CheckpointLocation
from giblet_ds.store import StoreInfo, mask_sha256, open_store

__all__ = ["StoreMatch", "check_store_match"]

log = logging.getLogger("giblet_ds")

Verdict = Literal["training store", "other store, same mask", "other store, mask unchecked",
                  "training store unknown"]  # fmt: skip


@dataclass(frozen=True)
class StoreMatch:
    """How the evaluated store relates to the checkpoint's training store (recorded in outputs)."""

    verdict: Verdict
    store: str
    store_hash: str
    trained_store: str | None
    """``data.store`` of the checkpoint's run config."""
    trained_store_hash: str | None
    note: str
    """One line for the console and the outputs; empty for the training store."""

    @property
    def is_training_store(self) -> bool:
        return self.verdict == "training store"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _training_store(cfg: RunConfig) -> tuple[StoreInfo | None, str | None]:
    """The store the run config names, opened when it is still there and valid."""
    named = getattr(cfg.data, "store", None)
    if not named:
        return None, None
    path = Path(str(named))
    if not path.is_file():
        return None, str(named)
    try:
        return open_store(path), str(named)
    except GibletError:  # rebuilt, moved or broken since: say nothing about it
        return None, str(named)


def check_store_match(location: CheckpointLocation, cfg: RunConfig, info: StoreInfo) -> StoreMatch:
    """Compare ``info`` with the store ``location`` was trained on: raises CheckpointError for
    another mask; warns (and says so in the returned note) for another store of the same mask or
    one whose mask cannot be checked."""
    meta = read_metadata(location.path) if location.kind == "tag" else None
    trained, named = _training_store(cfg)
    trained_hash = meta.store_hash if meta is not None and meta.store_hash else None
    if trained_hash is None and trained is not None:
        trained_hash = trained.build_hash
    trained_mask = meta.mask_hash if meta is not None else None
    if trained_mask is None and trained is not None and trained.build_hash == trained_hash:
        trained_mask = mask_sha256(trained.path)

    def match(verdict: Verdict, note: str) -> StoreMatch:
        return StoreMatch(verdict, str(info.path), info.build_hash, named, trained_hash, note)

    if trained_hash == info.build_hash:
        return match("training store", "")
    here = mask_sha256(info.path)
    what = f"{location.path} was trained on store {(trained_hash or '(unknown hash)')[:12]}"
    what += f" (data.store={named})" if named else ""
    if trained_mask is not None and trained_mask != here:
        raise CheckpointError(
            f"{what}, whose brain mask differs from that of {info.path} (store {info.build_hash[:12]},"
            f" mask {here[:12]} against the training mask {trained_mask[:12]}): the model's "
            "per-voxel outputs would be scored against other voxels. Use the training store, or "
            "a store built with the training mask (tools/build_store.py with the same mask)"
        )
    if trained_mask is not None:
        note = (
            f"OTHER STORE: {what}; {info.path} (store {info.build_hash[:12]}) has the same mask "
            "but other data: these are cross-store scores, not the model's held-out score"
        )
        verdict: Verdict = "other store, same mask"
    elif trained_hash is not None:
        note = (
            f"OTHER STORE: {what}; {info.path} is store {info.build_hash[:12]} and the training "
            "mask is unknown (the training store is gone and the tag predates mask hashes): the "
            "voxels may not be the model's; check the masks before reading these numbers"
        )
        verdict = "other store, mask unchecked"
    else:
        note = (
            f"UNKNOWN TRAINING STORE: {location.path} records no store hash and its run config's "
            f"data.store ({named or 'not set'}) cannot be read: cannot check that {info.path} is "
            "the training store or has its mask"
        )
        verdict = "training store unknown"
    log.warning("%s", note)
    return match(verdict, note)
