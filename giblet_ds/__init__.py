"""giblet-ds: train and use stimulus-to-fMRI encoding models with DeepSpeed.

``import giblet_ds`` stays light (no torch); ``giblet_ds.load_pretrained`` is imported on first
use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_pretrained"]


def __getattr__(name: str) -> Any:
    # A lazy attribute (PEP 562): the loader pulls in torch, safetensors and nibabel.
    if name == "load_pretrained":
        from giblet_ds.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'giblet_ds' has no attribute {name!r}")
