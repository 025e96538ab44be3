"""Shared fixtures: environment for CPU DeepSpeed runs and tiny synthetic stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tests run on CPU, offline, one thread per rank.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A schema-valid store with uneven sizes (37 TRs, 23 voxels) and planted fMRI."""
    from giblet_ds.store import write_synthetic_store

    return write_synthetic_store(tmp_path_factory.mktemp("store") / "tiny.h5")
