"""Offline weight files for EnCodec and the CLIP text tower (``--encodec-weights``, ``--clip-weights``).

Cluster compute nodes often have no internet: the user copies a weight file from a machine that
has (or names a fine-tuned model's state dict), and the build loads it into the same network the
package would build. A file whose name carries a checksum the package publishes (EnCodec's
``encodec_24khz-d7cc33bc.th``, OpenAI CLIP URLs) is verified against it; every file's SHA-256 is
recorded in the store. A wrong, truncated or mismatched file is a ``StoreError`` naming it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from giblet_ds.errors import StoreError
from giblet_ds.store.builder.hashing import file_sha256

__all__ = [
    "ENCODEC_CHECKPOINT",
    "encodec_published_sha256",
    "weight_file_record",
    "load_state_dict",
    "load_module_weights",
    "clip_text_state",
    "published_clip_sha256",
]

ENCODEC_CHECKPOINT = "encodec_24khz-d7cc33bc.th"
_CHECKSUM_NAME = re.compile(r"^encodec_24khz-([0-9a-f]{8,64})\.th$")
_CLIP_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.",
                   "text_projection", "cls_emb")  # fmt: skip


def weight_file_record(
    path: Path, flag: str, published_sha256: str | None = None
) -> dict[str, Any]:
    """``{"name", "bytes", "sha256", "checksum"}`` of a weight file, verified against
    ``published_sha256`` (a prefix is enough, as EnCodec publishes 8 hex digits) when given."""
    if not path.is_file():
        raise StoreError(path, "weight file not found", dataset=flag)
    digest = file_sha256(path)
    checksum = "not published (any state dict)"
    if published_sha256:
        if not digest.startswith(published_sha256):
            raise StoreError(
                path,
                "checksum does not match the one the package publishes for this file name "
                "(a truncated or different file?); copy the file again",
                dataset=flag,
                expected=f"sha256 {published_sha256}...",
                actual=f"sha256 {digest[: len(published_sha256)]}...",
            )
        checksum = f"verified against the published {published_sha256}"
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": digest, "checksum": checksum}


def encodec_published_sha256(path: Path) -> str | None:
    """The checksum in an EnCodec checkpoint's name (``encodec_24khz-<sha256 prefix>.th``)."""
    match = _CHECKSUM_NAME.match(path.name)
    return match.group(1) if match else None


def published_clip_sha256(model_name: str, path: Path) -> str | None:
    """The SHA-256 open_clip publishes for a checkpoint of ``model_name`` named like ``path``
    (OpenAI's URLs carry it: ``.../models/<sha256>/ViT-B-32.pt``), else None."""
    import open_clip

    for tag in open_clip.list_pretrained_tags_by_model(model_name):
        url = open_clip.get_pretrained_cfg(model_name, tag).get("url", "")
        parts = url.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-1] == path.name and re.fullmatch(r"[0-9a-f]{64}", parts[-2]):
            return parts[-2]
    return None


def load_state_dict(path: Path, flag: str) -> dict[str, Any]:
    """The tensors of a weight file: a torch state dict (``torch.save``; also wrapped as
    ``{"state_dict": ...}`` or ``{"model": ...}``), a TorchScript archive, or ``.safetensors``.
    Never runs pickled code (``weights_only=True``)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        try:
            state: Any = torch.load(path, map_location="cpu", weights_only=True)
        except RuntimeError as err:
            if "TorchScript" not in str(err) and "constants.pkl" not in str(err):
                raise
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as err:  # truncated zip archives, pickles, bad headers: many types
        raise StoreError(
            path,
            f"not a readable weight file ({type(err).__name__}: {err}); expected a torch state "
            "dict (torch.save(model.state_dict(), PATH)) or a .safetensors file",
            dataset=flag,
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise StoreError(
            path, "does not hold a state dict (a mapping of names to tensors)", dataset=flag,
            actual=type(state).__name__,
        )  # fmt: skip
    return dict(state)


def load_module_weights(module: Any, state: Mapping[str, Any], path: Path, flag: str) -> None:
    """``module.load_state_dict(state, strict=True)``, with missing, unexpected and mis-shaped
    names reported as a ``StoreError`` naming the file."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        raise StoreError(
            path,
            "weights do not fit the network the build uses: "
            + "; ".join(
                part
                for part in (
                    f"missing {len(missing)} ({', '.join(missing[:4])})" if missing else "",
                    f"unexpected {len(unexpected)} ({', '.join(unexpected[:4])})"
                    if unexpected
                    else "",
                    f"shape differs ({', '.join(shapes[:3])})" if shapes else "",
                )
                if part
            ),
            dataset=flag,
        )
    module.load_state_dict(state, strict=True)


def clip_text_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The text-tower part of an open_clip state dict: a text tower's own keys, a ``CLIP``'s
    top-level text keys, or a ``CustomTextCLIP``'s ``text.*`` keys (prefix removed)."""
    if any(k.startswith("text.") for k in state):
        return {k[len("text.") :]: v for k, v in state.items() if k.startswith("text.")}
    return {k: v for k, v in state.items() if k.startswith(_CLIP_TEXT_KEYS)}
