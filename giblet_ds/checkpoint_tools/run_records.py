"""Read a run directory's ``metrics.jsonl`` (record kinds in docs/design.md)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from giblet_ds.errors import CheckpointError

__all__ = ["RunRecords", "read_metrics", "as_float"]

_KINDS = ("start", "train", "skip", "val", "checkpoint", "end")


def as_float(value: Any) -> float:
    """A logged number; the trainer writes NaN/Inf as the strings "nan"/"inf". None -> NaN."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class RunRecords:
    """The records of one run directory, split by kind, in file order."""

    run_dir: Path
    start: list[dict[str, Any]] = field(default_factory=list)
    train: list[dict[str, Any]] = field(default_factory=list)
    skip: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: list[dict[str, Any]] = field(default_factory=list)
    end: list[dict[str, Any]] = field(default_factory=list)
    last: dict[str, Any] | None = None
    bad_lines: list[int] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config of the latest (re)start, else RUN_DIR/config.resolved.yaml."""
        if self.start and self.start[-1].get("config"):
            return dict(self.start[-1]["config"])
        path = self.run_dir / "config.resolved.yaml"
        if path.is_file():
            import yaml

            try:
                loaded = yaml.safe_load(path.read_text())
            except yaml.YAMLError:
                return {}
            return loaded if isinstance(loaded, dict) else {}
        return {}

    @property
    def last_time(self) -> float | None:
        return as_float(self.last.get("time")) if self.last else None


def read_metrics(run_dir: str | Path) -> RunRecords:
    """Parse RUN_DIR/metrics.jsonl. A torn last line (a crash mid-write) is skipped and noted."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run directory not found")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no metrics.jsonl (not a giblet-ds run directory, or the run never started)"
        )
    out = RunRecords(run_dir)
    with path.open() as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                out.bad_lines.append(number)
                continue
            kind = record.get("kind") if isinstance(record, dict) else None
            if kind not in _KINDS:
                out.bad_lines.append(number)
                continue
            getattr(out, kind).append(record)
            out.last = record
    return out
