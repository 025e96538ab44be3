"""The health report's normalization check judges what the loss uses: the mean variance."""

from __future__ import annotations

import json
from pathlib import Path

import h5py

from giblet_ds.report.health_disk import store as _store
from giblet_ds.run.records import read_metrics
from giblet_ds.store import write_synthetic_store


def _run_dir(tmp_path: Path, store: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "start", "store": str(store)}) + "\n")
    return run


def test_constant_pixels_are_counted_not_failed(tmp_path: Path) -> None:
    store = write_synthetic_store(tmp_path / "s.h5")
    with h5py.File(store, "r+") as handle:
        var = handle["stats/video/var"]
        values = var[()]
        values[:7] = 0.0  # letterbox pixels never change
        var[...] = values
    lines, checks = _store(read_metrics(_run_dir(tmp_path, store)))
    (check,) = checks
    assert check.level == "ok", check
    video_row = next(line for line in lines if line.startswith("| video"))
    assert "| 7 of 180 | yes |" in video_row


def test_all_constant_target_fails(tmp_path: Path) -> None:
    store = write_synthetic_store(tmp_path / "s.h5")
    with h5py.File(store, "r+") as handle:
        handle["stats/text/var"][...] = 0.0
    _, checks = _store(read_metrics(_run_dir(tmp_path, store)))
    assert [(c.level, c.note) for c in checks] == [
        ("fail", "zero mean or non-finite variance in ['text']")
    ]
