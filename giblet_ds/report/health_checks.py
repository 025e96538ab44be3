"""What a health check returns, and where the report starts to warn."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["ICON", "Check", "HealthReport", "Level", "Thresholds"]

Level = Literal["ok", "info", "warn", "fail"]
ICON = {"ok": "✅ OK", "info": "ℹ️ INFO", "warn": "⚠️ WARN", "fail": "❌ FAIL"}
RANK = {"ok": 0, "info": 0, "warn": 1, "fail": 2}


@dataclass(frozen=True)
class Thresholds:
    """Where the report starts to warn."""

    r_near_zero: float = 0.02  # |mean per-voxel r| below this: the model predicts no signal
    min_improvement: float = 0.01  # relative loss decrease below this over the run: flat
    stale_after_s: float | None = None  # silence before a running run counts as crashed
    hot_c: float = 85.0
    mem_full: float = 0.97
    low_util_pct: float = 50.0


@dataclass
class Check:
    component: str
    level: Level
    note: str


@dataclass
class HealthReport:
    run_dir: Path
    status: str  # running | finished | early-stopped | preempted | crashed
    checks: list[Check] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)  # markdown sections in order

    @property
    def verdict(self) -> str:
        worst = max((RANK[c.level] for c in self.checks), default=0)
        return ("HEALTHY", "NEEDS ATTENTION", "UNHEALTHY")[worst]

    def markdown(self) -> str:
        return "\n".join(self.blocks).rstrip() + "\n"
