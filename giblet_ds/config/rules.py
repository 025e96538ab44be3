"""Single-field checks of the run config: each failure names the dotted key, the value and the fix."""

from __future__ import annotations

from collections.abc import Sequence

from giblet_ds.errors import ConfigError

__all__ = ["positive_ints", "require"]


def require(ok: bool, key: str, value: object, rule: str, fix: str = "") -> None:
    if not ok:
        message = f"{key} {rule}, got {value!r}"
        raise ConfigError(message + (f"; {fix}" if fix else ""))


def positive_ints(key: str, values: Sequence[int]) -> None:
    require(
        len(values) > 0 and all(isinstance(v, int) and v > 0 for v in values),
        key,
        list(values),
        "must be a non-empty list of positive integers",
    )
