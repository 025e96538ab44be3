"""Small formatting helpers for markdown reports: numbers, durations, sizes, tables.

Every function takes NaN for "unknown" and prints it as ``-``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from giblet_ds.run.records import as_float

__all__ = ["duration", "finite", "mean", "median", "num", "size", "table", "to_int"]


def finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def median(values: Sequence[float]) -> float:
    vals = finite(values)
    return statistics.median(vals) if vals else math.nan


def mean(values: Sequence[float]) -> float:
    vals = finite(values)
    return statistics.fmean(vals) if vals else math.nan


def num(x: float, fmt: str = ".4f") -> str:
    return "-" if not math.isfinite(x) else format(x, fmt)


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def to_int(value: Any) -> int:
    x = as_float(value)
    return int(x) if math.isfinite(x) else 0


def size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.2f} TB"
