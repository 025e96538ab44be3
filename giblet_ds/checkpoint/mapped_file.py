"""Positional reads of the tensors in a torch zip file that ``torch.load(mmap=True)`` mapped.

Reading a slice of a memory-mapped tensor pulls its pages into this process (they count in RSS
until the mapping goes); reading the same bytes with ``pread`` into a buffer we own does not, so
memory stays at the buffer's size whatever the file's.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from giblet_ds.checkpoint.safe_load import load_torch_file
from giblet_ds.errors import CheckpointError

__all__ = ["MappedTorchFile", "pread_into"]

_READ_CHUNK = 1 << 30  # Linux returns at most ~2 GiB per read; stay well below


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from byte ``offset`` of ``fd`` without moving a file position; bytes read.

    Loops because one read returns at most ~2 GiB on Linux; stops early only at end of file.
    """
    done = 0
    while done < len(view):
        part = view[done : min(len(view), done + _READ_CHUNK)]
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [part], offset + done)
        else:  # platforms without preadv (older macOS): pread into bytes, then copy
            data = os.pread(fd, len(part), offset + done)
            n = len(data)
            part[:n] = data
        if n <= 0:
            break
        done += n
    return done


def _record_offsets(path: Path) -> dict[int, int]:
    """Byte offset in the file of every non-empty ``data/<key>`` record -> its size."""
    out: dict[int, int] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        for info in zf.infolist():
            if "/data/" not in f"/{info.filename}" or info.file_size == 0:
                continue
            fh.seek(info.header_offset)
            head = fh.read(30)
            if len(head) != 30 or head[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{path}: bad zip header for record {info.filename}")
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            out[info.header_offset + 30 + name_len + extra_len] = info.file_size
    return out


def _iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _iter_tensors(v)


class MappedTorchFile:
    """A torch file loaded with mmap, plus the mapping from its tensors to byte offsets in it.

    torch maps the whole file once and gives each storage the slice at its record's offset, so
    ``storage.data_ptr() - record_offset`` is one constant for the file. It is derived from the
    lowest storage and checked against every record; if anything disagrees (another torch
    version), reads fall back to copying from the memory-mapped tensor, which is slower on memory
    but equally exact.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.obj = load_torch_file(path, mmap=True)
        self.size = path.stat().st_size
        self._base: int | None = None
        records = _record_offsets(path)
        storages = {}
        for t in _iter_tensors(self.obj):
            s = t.untyped_storage()
            if s.nbytes() > 0:
                storages[s.data_ptr()] = s.nbytes()
        if records and storages and len(records) == len(storages):
            base = min(storages) - min(records)
            if all(records.get(p - base) == n for p, n in storages.items()):
                self._base = base
        self._fd: int | None = None

    def file_offset(self, tensor: torch.Tensor) -> int | None:
        if self._base is None:
            return None
        return tensor.data_ptr() - self._base

    def read_into(self, out: torch.Tensor, src: torch.Tensor, start: int, numel: int) -> None:
        """Copy ``src.view(-1)[start:start + numel]`` into the 1-D contiguous tensor ``out``."""
        if start < 0 or start + numel > src.numel():
            raise CheckpointError(
                f"{self.path}: a parameter reaches past its partition (elements {start}.."
                f"{start + numel} of {src.numel()}); the tag's files do not belong together"
            )
        offset = self.file_offset(src)
        if offset is None or not src.is_contiguous():
            out.copy_(src.reshape(-1)[start : start + numel])
            return
        offset += start * src.element_size()
        nbytes = numel * src.element_size()
        if offset + nbytes > self.size:
            raise CheckpointError(f"{self.path}: file is truncated (needs {offset + nbytes} bytes)")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        view = out.view(torch.uint8).numpy().data.cast("B")
        done = pread_into(self._fd, view[:nbytes], offset)
        if done != nbytes:
            raise CheckpointError(f"{self.path}: unexpected end of file at byte {offset + done}")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
