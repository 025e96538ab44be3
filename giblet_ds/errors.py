"""Project exceptions: every user-facing failure names the thing that is wrong and the fix."""

from __future__ import annotations

__all__ = ["GibletError", "ConfigError", "DataError", "StoreError", "CheckpointError"]


class GibletError(Exception):
    """Base class; command-line tools catch it, print its message and exit non-zero."""


class ConfigError(GibletError, ValueError):
    """A run config, override or DeepSpeed JSON is invalid (message names the dotted key)."""


class StoreError(GibletError):
    """The HDF5 feature store or a raw input file is missing, malformed or inconsistent."""

    def __init__(
        self,
        path: object,
        message: str,
        *,
        dataset: str | None = None,
        expected: object = None,
        actual: object = None,
    ) -> None:
        parts = [f"{path}"]
        if dataset is not None:
            parts.append(f"[{dataset}]")
        text = " ".join(parts) + f": {message}"
        if expected is not None:
            text += f" (expected {expected}, got {actual})"
        elif actual is not None:
            text += f" (got {actual})"
        super().__init__(text)
        self.path = path
        self.dataset = dataset
        self.expected = expected
        self.actual = actual


class DataError(GibletError, ValueError):
    """Training data or its statistics cannot be used (e.g. a target with zero variance)."""


class CheckpointError(GibletError):
    """A checkpoint directory, tag or file is missing, truncated or not ours."""
