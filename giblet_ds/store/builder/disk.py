"""Disk space and I/O failures of a store being written: the store's size on disk, the free space
check before writing, and the reason of a failed write (see ``writer`` for how they are used).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import h5py

from giblet_ds.errors import StoreError
from giblet_ds.host import free_bytes
from giblet_ds.store.layout import StoreLayout

__all__ = [
    "free_bytes",
    "store_bytes",
    "check_free_space",
    "create_unbuffered",
    "io_reason",
    "size_text",
]

_OVERHEAD_BYTES = 64 << 10
_BYTES_PER_CHUNK = 256
"""HDF5 metadata on top of the data: object headers, and chunk index nodes (~190 bytes a chunk
measured on the test store); generous, so a store that passes the check fits."""
_NO_SPACE = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "the file is too large for the file system",
}


def store_bytes(layout: StoreLayout) -> int:
    """Bytes a store of ``layout`` takes on disk, HDF5 metadata included (an upper estimate)."""
    return layout.nbytes() + _OVERHEAD_BYTES + _BYTES_PER_CHUNK * layout.n_chunks()


def create_unbuffered(path: Path) -> h5py.File:
    """A new HDF5 file whose raw data writes reach the disk inside the call that makes them:
    no chunk cache and no sieve buffer (the contiguous datasets' write-behind buffer), so a
    failed write raises there, never later in a released handle (see writer.py's module doc)."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)  # as h5py.File does: close closes everything
    fapl.set_sieve_buf_size(0)
    fapl.set_cache(0, 0, 0, 0.75)  # chunk cache: 0 slots, 0 bytes
    return h5py.File(h5py.h5f.create(os.fsencode(path), h5py.h5f.ACC_TRUNC, fapl=fapl))


def size_text(n: int) -> str:
    """Bytes as MB (GB from 1 GB), two decimals."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def check_free_space(
    path: Path, layout: StoreLayout, *, written: int = 0, lower_bound: bool = False
) -> int:
    """Raise ``StoreError`` (naming the folder, the bytes needed and free) when a store of
    ``layout`` at ``path`` does not fit beside the ``written`` bytes already on disk; returns
    the store's size. ``lower_bound``: the layout leaves something out (the message says "at
    least")."""
    total = store_bytes(layout)
    need = max(0, total - written)
    free = free_bytes(path.parent)
    if need > free:
        amount = ("at least " if lower_bound else "about ") + size_text(need)
        # Worth saying only once the video is on disk (the empty file is a few hundred bytes).
        done = f" more ({size_text(total)} in all)" if written > _OVERHEAD_BYTES else ""
        raise StoreError(
            path.parent,
            f"not enough free space for {path.name}: it needs {amount}{done}, {size_text(free)} "
            "free. Free some space, or give --out on another file system",
        )
    return total


def io_reason(err: BaseException) -> str | None:
    """Why a write failed, when ``err`` is an I/O failure (h5py raises OSError with the errno,
    and RuntimeError carrying HDF5's "errno = N" text from some handle operations)."""
    code = getattr(err, "errno", None)
    if not isinstance(code, int) and "errno = " in str(err):
        digits = str(err).split("errno = ", 1)[1].split(",", 1)[0].strip()
        code = int(digits) if digits.isdigit() else None
    if isinstance(code, int) and code:
        return _NO_SPACE.get(code, os.strerror(code))
    return str(err) if isinstance(err, OSError) else None
