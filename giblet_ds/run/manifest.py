"""What a checkpoint tag holds beside DeepSpeed's files: its metadata and its manifest.

Write order inside a tag (all in a staging folder, see :class:`giblet_ds.run.layout.RunDir`):
DeepSpeed's rank files -> ``run_config.yaml`` -> ``metadata.json`` -> ``manifest.json`` ->
``complete``. The manifest lists every other file of the tag with its size and an XXH3-128 checksum
(xxhash: a non-cryptographic hash that streams at several GB/s per core, so checking a 56 GB tag
costs about what reading it costs; it guards against flipped bits and truncated copies, not
against tampering). ``metadata.json`` says who wrote the tag (step, data-parallel world size,
ZeRO stage): the world size of a save is read from there, never by counting files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from giblet_ds.errors import CheckpointError

__all__ = [
    "CHECKSUM",
    "MANIFEST_NAME",
    "METADATA_NAME",
    "TagMetadata",
    "checksum_file",
    "manifest_entries",
    "read_manifest",
    "read_metadata",
    "verify_manifest",
    "write_manifest",
    "write_metadata",
]

MANIFEST_NAME = "manifest.json"
METADATA_NAME = "metadata.json"
CHECKSUM = "xxh3_128"
_CHUNK = 8 << 20  # 8 MiB reads: large enough to stream at disk speed, small enough to stay cached


def checksum_file(
    path: Path, chunk: int = _CHUNK, new_digest: Callable[[], Any] = xxhash.xxh3_128
) -> str:
    """XXH3-128 hex digest of a file, read in ``chunk``-byte blocks into one reused buffer.

    ``new_digest`` swaps the hash (any hashlib-style constructor), so a benchmark can time another
    one over exactly this read loop."""
    digest = new_digest()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def manifest_entries(tag_dir: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"size": bytes, "xxh3_128": hex}}`` for the named files of ``tag_dir``."""
    return {
        name: {"size": (tag_dir / name).stat().st_size, CHECKSUM: checksum_file(tag_dir / name)}
        for name in names
    }


def write_manifest(tag_dir: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Write ``manifest.json`` (atomically) from entries of :func:`manifest_entries`."""
    body = {"format": 1, "checksum": CHECKSUM, "files": dict(sorted(entries.items()))}
    _write_json(tag_dir / MANIFEST_NAME, body)


def read_manifest(tag_dir: Path) -> dict[str, dict[str, Any]] | None:
    """The manifest's file entries, None when the tag has no manifest (an older or foreign tag)."""
    path = tag_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    body = _read_json(path)
    files = body.get("files")
    if body.get("checksum") != CHECKSUM or not isinstance(files, dict):
        raise CheckpointError(
            f"{path}: not a giblet-ds manifest (expected checksum {CHECKSUM!r} and a 'files' map)"
        )
    return files


def verify_manifest(tag_dir: Path, names: Iterable[str] | None = None) -> None:
    """Check files of ``tag_dir`` against its manifest; raise CheckpointError naming the first
    file that is missing, of another size or of another checksum, or a rank file the manifest
    does not list. ``names`` restricts the checksums to those files (ranks split the work); sizes
    and the file list are always checked in full. A tag without a manifest passes (nothing to
    verify: tags written before manifests existed, or by DeepSpeed alone)."""
    files = read_manifest(tag_dir)
    if files is None:
        return
    fix = "the tag is corrupted: resume from an older complete tag, or pass --no-verify to skip"
    for name, entry in files.items():
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {MANIFEST_NAME} but missing; {fix}")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(
                f"{path}: {size} bytes, the manifest says {entry['size']} (truncated or "
                f"overwritten); {fix}"
            )
    extra = sorted(
        p.name
        for p in tag_dir.iterdir()
        if p.is_file() and p.name.endswith(".pt") and p.name not in files
    )
    if extra:
        raise CheckpointError(
            f"{tag_dir}: files not written by the save that made this tag: {', '.join(extra)} "
            f"(not in {MANIFEST_NAME}); {fix}"
        )
    for name in files if names is None else names:
        if name not in files:
            continue
        actual = checksum_file(tag_dir / name)
        if actual != files[name][CHECKSUM]:
            raise CheckpointError(
                f"{tag_dir / name}: checksum {actual} does not match the manifest's "
                f"{files[name][CHECKSUM]} ({CHECKSUM}); {fix}"
            )


@dataclass(frozen=True)
class TagMetadata:
    """Who wrote a tag: ``world_size`` data-parallel ranks at optimizer step ``step``; with what
    a resume checks before touching the tag (``store_hash``, the ``sampler`` position), and the
    training store's voxel space (``mask_hash``), which the tools check a store against."""

    tag: str
    step: int
    world_size: int
    zero_stage: int
    store_hash: str | None = None
    sampler: dict[str, Any] | None = None
    mask_hash: str | None = None
    precision: str | None = None
    """``bf16``, ``fp16`` or ``fp32`` (tags written before it was recorded: None)."""


def write_metadata(tag_dir: Path, meta: TagMetadata) -> None:
    _write_json(tag_dir / METADATA_NAME, {"format": 1, **meta.__dict__})


def read_metadata(tag_dir: Path) -> TagMetadata | None:
    """The tag's metadata, None when it has none (a tag written by DeepSpeed alone)."""
    path = tag_dir / METADATA_NAME
    if not path.is_file():
        return None
    body = _read_json(path)
    try:
        return TagMetadata(
            tag=str(body["tag"]),
            step=int(body["step"]),
            world_size=int(body["world_size"]),
            zero_stage=int(body["zero_stage"]),
            store_hash=body.get("store_hash"),
            sampler=body.get("sampler"),
            mask_hash=body.get("mask_hash"),
            precision=body.get("precision"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed tag metadata ({exc!r})") from None


def _write_json(path: Path, body: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(body, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return body
