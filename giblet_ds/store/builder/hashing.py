"""Content hashes that decide whether a store is current (no stale caches, REFERENCE.md)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["file_sha256", "settings_sha256", "build_sha256"]

_BLOCK = 8 << 20


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in 8 MiB blocks, so multi-GB movies do not fill memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def settings_sha256(settings: Mapping[str, Any]) -> str:
    """SHA-256 of the settings as canonical JSON (sorted keys), so key order never matters."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def build_sha256(settings_hash: str, input_hashes: Mapping[str, Any], schema_version: int) -> str:
    """Identity of a store: schema version, settings and every input file's hash together."""
    return settings_sha256(
        {"schema": schema_version, "settings": settings_hash, "inputs": dict(input_hashes)}
    )
