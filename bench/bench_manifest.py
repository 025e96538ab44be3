#!/usr/bin/env python
"""Cost of a checkpoint tag's manifest (giblet_ds.run.manifest): XXH3-128 per GB, side by side
with reading the same bytes without hashing and with hashlib's sha256, on one file of SIZE_GB.

    python bench/bench_manifest.py --size-gb 2 --dir /path/on/the/checkpoint/filesystem

Run twice: the first pass reads from disk (if the file is larger than the page cache, every
pass does), the second from the page cache (the hash's own speed). Numbers go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import tempfile
import time
from pathlib import Path

from giblet_ds.run.manifest import checksum_file

CHUNK = 8 << 20


def _read_only(path: Path) -> str:
    buffer = bytearray(CHUNK)
    with path.open("rb", buffering=0) as fh:
        while fh.readinto(buffer):
            pass
    return ""


def _sha256(path: Path) -> str:
    return checksum_file(path, CHUNK, hashlib.sha256)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--dir", default=None, help="folder for the test file (default: a temp dir)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(dir=args.dir))
    path = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = int(args.size_gb * 1e9)
    block = os.urandom(CHUNK)
    started = time.perf_counter()
    with path.open("wb") as fh:
        for _ in range(size // CHUNK):
            fh.write(block)
    size = path.stat().st_size
    write_s = time.perf_counter() - started
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; file {size / 1e9:.2f} GB "
          f"written in {write_s:.2f} s ({size / 1e9 / write_s:.2f} GB/s, page cache)")  # fmt: skip
    for name, fn in (("read only", _read_only), ("xxh3_128 (manifest)", checksum_file),
                     ("sha256", _sha256)):  # fmt: skip
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            fn(path)
            times.append(time.perf_counter() - started)
        best = min(times)
        print(f"{name:22s} best of {args.repeat}: {best / (size / 1e9):.3f} s per GB "
              f"({size / 1e9 / best:.2f} GB/s)")  # fmt: skip
    path.unlink()
    folder.rmdir()


if __name__ == "__main__":
    main()
