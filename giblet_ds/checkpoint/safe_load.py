"""Read PyTorch checkpoint files so that reading them can never run code.

Every file goes through ``torch.load(weights_only=True)``. DeepSpeed's optimizer files pickle three
small plain-data classes (a loss scaler, the ZeRO stage enum, fragment addresses) and our trainer's
client state may hold numpy RNG state. Instead of importing DeepSpeed (tools never do) or ever falling
back to ``weights_only=False``, those names are mapped to inert stand-ins here: a stand-in only
receives attributes, it has no behaviour that unpickling could trigger.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from giblet_ds.errors import CheckpointError

__all__ = ["DeepSpeedRecord", "load_torch_file", "check_zip_file", "allowed_globals"]


class DeepSpeedRecord:
    """Inert stand-in for a DeepSpeed plain-data object; holds the attributes it was pickled with."""

    ds_class: str = "?"

    def __repr__(self) -> str:
        return f"{self.ds_class}({self.__dict__!r})"


def _record_class(full_name: str) -> type[DeepSpeedRecord]:
    short = full_name.rsplit(".", 1)[-1]
    return type(short, (DeepSpeedRecord,), {"ds_class": full_name, "__module__": __name__})


def _zero_stage(value: object) -> int:
    """Stand-in for ``ZeroStageEnum(value)``: the enum is pickled as a call with its int value."""
    if not isinstance(value, int) or not 0 <= value <= 3:
        raise pickle.UnpicklingError(f"ZeroStageEnum value must be 0..3, got {value!r}")
    return value


# DeepSpeed names as they appear in GLOBAL opcodes. Classes that are only ever rebuilt with NEWOBJ
# plus a state dict become DeepSpeedRecord subclasses.
_DS_RECORDS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _numpy_globals() -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    """numpy array and scalar reconstruction (RNG state in the trainer's client_state).

    numpy pickles arrays as ``_reconstruct(ndarray, shape, dtype)`` followed by ``__setstate__`` with
    the raw bytes; neither runs user code. Both the numpy 1 (``numpy.core``) and numpy 2
    (``numpy._core``) paths are listed so files written by either load.
    """
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 1.26
        from numpy.core import multiarray  # type: ignore[no-redef]

    items: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [np.ndarray, np.dtype]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        items.append((multiarray._reconstruct, f"{mod}._reconstruct"))
        items.append((multiarray.scalar, f"{mod}.scalar"))
    for dt in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
               np.uint64, np.float16, np.float32, np.float64):  # fmt: skip
        items.append(type(np.dtype(dt)))
    return items


def allowed_globals() -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    """The complete allowlist handed to ``torch.serialization.safe_globals``."""
    items: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        (_record_class(name), name) for name in _DS_RECORDS
    ]
    items.append((_zero_stage, "deepspeed.runtime.zero.config.ZeroStageEnum"))
    items.extend(_numpy_globals())
    return items


_ALLOWED = allowed_globals()


def check_zip_file(path: Path) -> None:
    """Fail with a clear message unless ``path`` is a complete zip-format torch file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: file is empty (a save was interrupted?)")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile as exc:
        raise CheckpointError(
            f"{path}: not a complete PyTorch zip checkpoint ({exc}); the file is truncated, "
            "still being written, or not a torch.save file"
        ) from exc
    for info in infos:
        if info.header_offset + info.file_size > size:
            raise CheckpointError(f"{path}: record {info.filename} runs past the end of the file")


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def load_torch_file(path: str | Path, *, mmap: bool = True) -> Any:
    """``torch.load`` with ``weights_only=True`` and the allowlist; storages memory-mapped by default.

    With ``mmap=True`` no tensor bytes are read until a tensor is touched, so opening a multi-GB
    optimizer file only parses its pickle.
    """
    path = Path(path)
    check_zip_file(path)
    try:
        with torch.serialization.safe_globals(_ALLOWED):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL_RE.search(str(exc))
        what = f"it references {found.group(1)}" if found else str(exc).splitlines()[0]
        raise CheckpointError(
            f"{path}: refused to unpickle: {what}, which is not on the allowlist of plain-data "
            "types (giblet_ds/checkpoint/safe_load.py). Reading a checkpoint must never run "
            "code; if the file is trusted and the type is plain data, add it to the allowlist."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc})") from exc
