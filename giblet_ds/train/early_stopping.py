"""Early stopping on one validation metric, with state that checkpoints carry."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["EarlyStopping"]


@dataclass
class EarlyStopping:
    """Counts validations without an improvement of at least ``min_delta``.

    Every rank feeds it the same all-reduced metric, so every rank takes the same decision.
    ``patience`` 0 never stops.
    """

    mode: str
    patience: int
    min_delta: float
    best: float = math.nan
    best_step: int = -1
    bad_validations: int = 0

    def update(self, value: float, step: int) -> bool:
        """Record a validation; True when it is a new best."""
        if not math.isfinite(value):
            self.bad_validations += 1
            return False
        if math.isnan(self.best) or self._improves(value):
            self.best, self.best_step, self.bad_validations = value, step, 0
            return True
        self.bad_validations += 1
        return False

    def _improves(self, value: float) -> bool:
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_validations >= self.patience

    @property
    def patience_left(self) -> int:
        return max(0, self.patience - self.bad_validations) if self.patience > 0 else -1

    def state_dict(self) -> dict[str, float | int | str]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, float | int | str]) -> None:
        for key in ("best", "best_step", "bad_validations"):
            setattr(self, key, type(getattr(self, key))(state[key]))

    def restart(self) -> None:
        """Forget the best and the count (a resume changed what the metric measures): the next
        validation sets the new best."""
        self.best, self.best_step, self.bad_validations = math.nan, -1, 0
