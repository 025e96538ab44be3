"""Load a trained model from any checkpoint form: a ZeRO tag, consolidated weights, a run directory.

The model is built on the meta device from the run config saved beside the weights
(``run_config.yaml`` in a tag, ``config.resolved.yaml`` in the run directory), then the weights
are assigned with ``load_state_dict(strict=True, assign=True)``: no second copy of the model is
ever allocated, and missing or unexpected names fail with PyTorch's own message.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from giblet_ds.checkpoint.formats import read_shard_index
from giblet_ds.checkpoint.safe_load import load_torch_file
from giblet_ds.checkpoint.zero_reader import ZeroCheckpoint
from giblet_ds.config import RunConfig, load_config
from giblet_ds.config.saved_model import check_saved_design
from giblet_ds.errors import CheckpointError
from giblet_ds.model import GibletAutoencoder
from giblet_ds.run.resolver import (
    CheckpointLocation,
    Prefer,
    find_run_config,
    resolve_checkpoint,
)

__all__ = ["iter_checkpoint_tensors", "load_model"]


def iter_checkpoint_tensors(location: CheckpointLocation) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a resolved checkpoint, one tensor read at a time; tied names of a
    ZeRO tag yield the same tensor object under each name."""
    if location.kind == "tag":
        with ZeroCheckpoint(location.path) as ckpt:
            read: dict[int, torch.Tensor] = {}
            for name, entry in ckpt.state_dict_entries().items():
                if id(entry) not in read:
                    read[id(entry)] = ckpt.read(entry)
                yield name, read[id(entry)]
        return
    path = location.path
    files = read_shard_index(path) if path.name.endswith(".index.json") else [path]
    for file in files:
        yield from _file_tensors(file)


def _file_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, fh.get_tensor(name)
        except (OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: unreadable safetensors file (truncated or not safetensors: {exc})"
            ) from exc
        return
    state = load_torch_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds {type(state).__name__}, not a state dict")
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor):
            yield name, tensor


def load_model(
    checkpoint: str | Path,
    *,
    config: str | Path | None = None,
    device: str | torch.device = "cpu",
    prefer: Prefer = "best",
    verify: bool = True,
) -> tuple[GibletAutoencoder, RunConfig, CheckpointLocation]:
    """The model of a checkpoint, weights loaded, in eval mode; with its config and location.

    ``checkpoint`` is anything :func:`giblet_ds.run.resolve_checkpoint` accepts; a run directory
    stands for its ``best`` tag when there is one (``prefer``), else its newest complete tag.
    Incomplete tags are refused; a tag is checked against its manifest unless ``verify=False``.
    """
    location = resolve_checkpoint(checkpoint, prefer=prefer, verify=verify)
    config_path = Path(config) if config is not None else find_run_config(location.path)
    check_saved_design(config_path)
    cfg = load_config(config_path)
    with torch.device("meta"):
        model = GibletAutoencoder(cfg.model)
    state: dict[str, torch.Tensor] = {}
    expected = model.state_dict()
    for name, tensor in iter_checkpoint_tensors(location):
        want = expected.get(name)
        if want is not None and tuple(tensor.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{location.path}: {name} has shape {tuple(tensor.shape)} but the model from "
                f"{config_path} expects {tuple(want.shape)}"
            )
        state[name] = tensor.to(device=device, dtype=want.dtype if want is not None else None)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{location.path} does not match the model built from {config_path}: {exc}"
        ) from exc
    # Non-persistent buffers are not in any state dict: they would stay on the meta device.
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"model tensors {left} were not filled from {location.path}")
    model.eval()
    return model, cfg, location
