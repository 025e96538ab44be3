"""Streaming writers for consolidated weights: PyTorch zip (.bin), safetensors, sharding, index JSON.

``torch.save`` and ``safetensors.torch.save_file`` need every tensor of a file in memory at once. The
writers here take the file's table of contents up front (name -> shape and dtype) and ask a producer
for one tensor at a time, so peak memory is one tensor. The bytes they write are the bytes those
libraries write for the same dict (the tests compare them), so any loader reads them unchanged.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from giblet_ds.checkpoint.formats import SAFETENSORS_DTYPES
from giblet_ds.errors import CheckpointError
from giblet_ds.run.layout import SAFE_WEIGHTS_NAME, WEIGHTS_NAME

__all__ = [
    "TensorMeta",
    "Producer",
    "ShardPlan",
    "plan_shards",
    "write_torch_file",
    "write_safetensors_file",
    "write_index",
    "staged_output_dir",
    "WEIGHTS_NAME",
    "SAFE_WEIGHTS_NAME",
]


@dataclass(frozen=True, eq=False)
class TensorMeta:
    """Shape and dtype of one output tensor. Two names holding the same object are tied weights.

    ``eq=False`` keeps identity semantics: ties are detected with ``is``, never by equal shapes.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    # Only recorded in the .bin pickle. DeepSpeed's output keeps the flag of the fp32 partitions
    # (True), so the consolidated files match byte for byte; loading ignores it.
    requires_grad: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


# Called with a tensor name, returns that tensor (contiguous, of the TensorMeta's shape and dtype).
# The writers finish with a tensor before the next call, so a producer may reuse one buffer.
Producer = Callable[[str], torch.Tensor]


def _checked(name: str, meta: TensorMeta, tensor: torch.Tensor) -> torch.Tensor:
    if tuple(tensor.shape) != meta.shape or tensor.dtype != meta.dtype:
        raise CheckpointError(
            f"internal: tensor {name} came out as {tuple(tensor.shape)} {tensor.dtype}, "
            f"expected {meta.shape} {meta.dtype}"
        )
    return tensor.contiguous()


def _unique(entries: Mapping[str, TensorMeta]) -> list[tuple[str, TensorMeta]]:
    """First name of every distinct TensorMeta, in order (ties are written once)."""
    seen: set[int] = set()
    out = []
    for name, meta in entries.items():
        if id(meta) not in seen:
            seen.add(id(meta))
            out.append((name, meta))
    return out


# ---------------------------------------------------------------------------------------------
# Sharding (the same split DeepSpeed's script gets from huggingface_hub)


@dataclass(frozen=True)
class ShardPlan:
    """Which tensors go to which file; ``metadata``/``weight_map`` form the index when sharded."""

    is_sharded: bool
    filename_to_tensors: dict[str, list[str]]
    tensor_to_filename: dict[str, str]
    metadata: dict[str, Any]


def plan_shards(
    entries: Mapping[str, TensorMeta], weights_name: str, max_shard_size: int | str | None
) -> ShardPlan:
    """Split like ``huggingface_hub.split_torch_state_dict_into_shards`` on empty tensors.

    DeepSpeed's script passes ``torch.empty`` tensors of the output dtype: sizes are numel x itemsize,
    tied names share a storage, and every zero-element tensor has data pointer 0 (so they count as
    one storage). The same rules are reproduced from metadata alone. ``None`` means one file.
    """
    if max_shard_size is None:
        names = list(entries)
        total = sum(meta.nbytes for _, meta in _unique(entries))
        return ShardPlan(False, {weights_name: names}, dict.fromkeys(names, weights_name),
                         {"total_size": total})  # fmt: skip
    from huggingface_hub import split_state_dict_into_shards_factory

    pattern = weights_name.replace(".bin", "{suffix}.bin").replace(
        ".safetensors", "{suffix}.safetensors"
    )
    try:
        split = split_state_dict_into_shards_factory(
            dict(entries),
            get_storage_size=lambda m: m.nbytes,
            get_storage_id=lambda m: ("empty",) if m.numel == 0 else id(m),
            filename_pattern=pattern,
            max_shard_size=max_shard_size,
        )
    except ValueError as exc:  # a malformed size string such as "5 GiB"
        raise CheckpointError(f"--max_shard_size {max_shard_size!r}: {exc}") from exc
    return ShardPlan(
        split.is_sharded,
        dict(split.filename_to_tensors),
        dict(split.tensor_to_filename),
        dict(split.metadata),
    )


def write_index(path: Path, plan: ShardPlan) -> None:
    """The ``*.index.json`` DeepSpeed writes: sorted keys, two-space indent, trailing newline."""
    index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# PyTorch zip format, written the way torch.serialization._save writes a dict of tensors
#
# torch has no public streaming writer: torch.save needs every tensor in memory at once, which for
# the 3.5B model is the whole model. Four private names are used, each because no public API does
# its job; tests/test_tools_zero_to_fp32.py::test_private_torch_names_we_rely_on fails loudly if torch
# renames or changes one of them:
# - torch._utils._rebuild_tensor_v2: the callable torch itself pickles for a tensor (a loader looks
#   it up by name, so the pickle must name exactly this);
# - torch.storage._dtype_to_storage_type_map: dtype -> the legacy storage class name in the pickle;
# - torch.serialization._get_storage_alignment: the record alignment torch.save uses (64 bytes);
# - torch.serialization._open_zipfile_writer: torch's own zip writer (CRCs, alignment, record order).

_STORAGE = "storage"  # one object for every persistent id, as in torch, so pickle memoizes it
_CPU = "cpu"


class _StorageRef:
    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles exactly like a contiguous CPU tensor that owns its storage."""

    __slots__ = ("storage", "shape", "requires_grad")

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...], requires_grad: bool) -> None:
        self.storage, self.shape, self.requires_grad = storage, shape, requires_grad

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= max(d, 1)
        hooks: OrderedDict[Any, Any] = OrderedDict()  # torch pickles empty backward hooks
        args = (
            self.storage,
            0,
            tuple(self.shape),
            tuple(reversed(stride)),
            self.requires_grad,
            hooks,
        )
        return (torch._utils._rebuild_tensor_v2, args)


def _storage_type(dtype: torch.dtype) -> Any:
    names = torch.storage._dtype_to_storage_type_map()
    if dtype not in names:
        raise CheckpointError(f"cannot write dtype {dtype} to a .bin file")
    return getattr(torch, names[dtype])


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            return (_STORAGE, _storage_type(obj.dtype), obj.key, _CPU, obj.numel)
        return None


def write_torch_file(path: Path, entries: Mapping[str, TensorMeta], produce: Producer) -> None:
    """Write what ``torch.save({name: tensor, ...}, path)`` writes, one tensor in memory at a time.

    Storage keys are numbered in order of first appearance (torch's format version 1), tied names
    reference one storage, and records carry torch's alignment and CRCs because torch's own zip
    writer writes them. Only the random ``.data/serialization_id`` differs between two saves.
    """
    refs: dict[int, _TensorRef] = {}
    obj: dict[str, _TensorRef] = {}
    for name, meta in entries.items():
        if id(meta) not in refs:
            storage = _StorageRef(str(len(refs)), meta.dtype, meta.numel)
            refs[id(meta)] = _TensorRef(storage, meta.shape, meta.requires_grad)
        obj[name] = refs[id(meta)]
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    data = buf.getvalue()
    alignment = str(torch.serialization._get_storage_alignment())
    with torch.serialization._open_zipfile_writer(str(path)) as zf:
        zf.write_record("data.pkl", data, len(data))
        zf.write_record(".format_version", "1", 1)
        zf.write_record(".storage_alignment", alignment, len(alignment))
        zf.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        for name, meta in _unique(entries):
            tensor = _checked(name, meta, produce(name))
            if tensor.storage_offset() != 0:  # the record is written from the storage's start
                tensor = tensor.clone()
            key = refs[id(meta)].storage.key
            zf.write_record(f"data/{key}", tensor.untyped_storage(), meta.nbytes)
            del tensor


# ---------------------------------------------------------------------------------------------
# safetensors

_ST_CODES = SAFETENSORS_DTYPES
# safetensors lays tensors out by dtype, largest first, then by name (the tests pin this order).
_ST_RANK = {code: i for i, code in enumerate(
    ["U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
     "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"])}  # fmt: skip


def write_safetensors_file(
    path: Path,
    entries: Mapping[str, TensorMeta],
    produce: Producer,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write what ``safetensors.torch.save_file(dict, path, metadata)`` writes, tensor by tensor."""
    if sys.byteorder != "little":
        raise CheckpointError("safetensors output needs a little-endian machine")
    ties = [name for name, meta in entries.items() if sum(m is meta for m in entries.values()) > 1]
    if ties:
        raise CheckpointError(
            f"tied tensors {ties} cannot be stored in safetensors (it refuses shared memory); "
            "write the .bin format instead (drop --safe_serialization)"
        )
    for name, meta in entries.items():
        if meta.dtype not in _ST_CODES:
            raise CheckpointError(f"tensor {name}: dtype {meta.dtype} has no safetensors code")
    order = sorted(entries, key=lambda n: (_ST_RANK[_ST_CODES[entries[n].dtype]], n))
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        meta = entries[name]
        header[name] = {
            "dtype": _ST_CODES[meta.dtype],
            "shape": list(meta.shape),
            "data_offsets": [offset, offset + meta.nbytes],
        }
        offset += meta.nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header with spaces to 8 bytes
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name in order:
            tensor = _checked(name, entries[name], produce(name))
            if tensor.numel():
                fh.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor


# ---------------------------------------------------------------------------------------------
# All-or-nothing output


@contextmanager
def staged_output_dir(output_dir: Path, *, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a hidden staging folder inside ``output_dir``; on success move its files in.

    Files keep their final basenames while being written (torch stores the basename inside the zip).
    Files named in ``last`` (the index) are moved after the weights, so a reader that finds the index
    finds every shard. On any failure the staging folder is removed, and ``output_dir`` too if this
    call created it and it is empty: no partial output is left behind.
    """
    created = not output_dir.exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"{output_dir}: cannot create output folder ({exc})") from exc
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=output_dir))
    try:
        yield stage
        names = sorted(p.name for p in stage.iterdir())
        for name in [n for n in names if n not in last] + [n for n in names if n in last]:
            os.replace(stage / name, output_dir / name)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with suppress(OSError):
                output_dir.rmdir()
        raise
    stage.rmdir()
