"""The files of an exported model folder, its manifest, and the errors of using one.

An export is a folder that needs nothing else: every file is listed in ``manifest.json`` with its
size and SHA-256, so a missing or altered file is named before anything is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from giblet_ds.errors import GibletError
from giblet_ds.store.builder.hashing import file_sha256

__all__ = [
    "BUNDLE_FORMAT",
    "CARD",
    "CODEBOOKS",
    "CONFIG",
    "EVALUATION",
    "FEATURES",
    "FMRI_STATS",
    "MANIFEST",
    "MASK",
    "REQUIRED",
    "WEIGHTS",
    "BundleError",
    "FeatureWeightsError",
    "PredictionError",
    "staged_files",
    "staged_output",
    "verify_bundle",
    "write_manifest",
]

BUNDLE_FORMAT = 1
WEIGHTS = "model.safetensors"
CONFIG = "run_config.yaml"
FEATURES = "features.json"
MASK = "mask.nii.gz"
FMRI_STATS = "fmri_stats.safetensors"
CODEBOOKS = "encodec_codebooks.safetensors"
"""Only for stores built with --no-pretrained: EnCodec's k-means codebooks of the training movie."""
EVALUATION = "evaluation.json"
CARD = "README.md"
MANIFEST = "manifest.json"
REQUIRED = (WEIGHTS, CONFIG, FEATURES, MASK, FMRI_STATS, CARD)


class BundleError(GibletError):
    """An exported model folder is missing a file, holds an altered one, or is not an export."""


class FeatureWeightsError(GibletError):
    """The EnCodec or CLIP weights at hand differ from those the model's features were made with."""


class PredictionError(GibletError):
    """A prediction cannot be made or would not mean what it says (non-finite, unknown subject)."""


def write_manifest(folder: Path) -> Path:
    """Write ``manifest.json``: name, bytes and SHA-256 of every other file in ``folder``."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    path = folder / MANIFEST
    path.write_text(json.dumps({"format": BUNDLE_FORMAT, "files": files}, indent=1) + "\n")
    return path


def verify_bundle(folder: Path, *, checksums: bool = True) -> dict[str, Any]:
    """The manifest of an export after checking it: every required and listed file present, of
    its size and (``checksums``) SHA-256. BundleError naming the file and the fix otherwise."""
    fix = "export it again with tools/export_model.py (or copy the whole folder)"
    if not folder.is_dir():
        raise BundleError(f"{folder}: not a folder; give the folder tools/export_model.py wrote")
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder}: no {MANIFEST}, so not a complete model export; {fix}")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc}); {fix}") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{path}: export format {manifest.get('format')!r}, this giblet-ds reads "
            f"{BUNDLE_FORMAT}; {fix}"
        )
    missing = [name for name in (*REQUIRED, *files) if not (folder / name).is_file()]
    if missing:
        raise BundleError(f"{folder}: missing {', '.join(sorted(set(missing)))}; {fix}")
    for name, entry in files.items():
        file = folder / name
        if file.stat().st_size != entry["bytes"]:
            raise BundleError(
                f"{file}: {file.stat().st_size} bytes, the manifest says {entry['bytes']} "
                f"(truncated or replaced); {fix}"
            )
        if checksums and file_sha256(file) != entry["sha256"]:
            raise BundleError(f"{file}: SHA-256 differs from the manifest (altered); {fix}")
    unlisted = [n for n in REQUIRED if n not in files]
    if unlisted:
        raise BundleError(f"{path}: does not list {', '.join(unlisted)}; {fix}")
    return dict(manifest)


@contextmanager
def staged_output(final: Path, *, is_dir: bool) -> Iterator[Path]:
    """A hidden temporary path beside ``final``, moved onto it when the block ends without an
    exception and deleted otherwise: nothing partial is ever left under ``final``'s name.
    ``final`` must not exist (nothing is overwritten)."""
    if final.exists():
        raise GibletError(f"{final} exists; choose another output path or remove it first")
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if temp.is_dir():
        shutil.rmtree(temp)
    temp.unlink(missing_ok=True)
    if is_dir:
        temp.mkdir()
    try:
        yield temp
        os.replace(temp, final)
    finally:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        elif temp.exists():
            temp.unlink()


@contextmanager
def staged_files(finals: list[Path]) -> Iterator[list[Path]]:
    """Hidden temporary paths beside ``finals``; all moved onto their final names (each atomically
    replacing an older file) only when the block ends without an exception, else all deleted: a
    failed run leaves every earlier output as it was and no partial one."""
    # Hidden, and ending in the final name: nibabel picks the format (and gzip) from the suffix.
    temps = [p.with_name(f".tmp-{os.getpid()}-{p.name}") for p in finals]
    for final in finals:
        final.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield temps
        for temp, final in zip(temps, finals, strict=True):
            os.replace(temp, final)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
