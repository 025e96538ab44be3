"""launch/train.py's main(), unchanged, plus two things bench/gpu_check.py needs from inside the
training process (the deepspeed launcher starts this file in place of launch/train.py, with the
same arguments):

- GIBLET_BENCH_PEAKS=PATH: at exit, write the process's peak memory as JSON: torch's peak
  allocated and reserved GPU bytes (metrics.jsonl logs allocated only) and the peak RSS.
- GIBLET_BENCH_SKIP_SAVE=all (or =best): DeepSpeed's save_checkpoint writes only a note into the
  tag folder, for every tag (or for the `best` tag only). The trainer validates and saves when it
  reaches train.max_steps (`best` first, then the step tag) and has no switch to skip that; for
  the 3.5B model a tag is about 49 GB, and the timing runs must not each write one (the device
  machine's disk is 64 GiB). The run that checks saving keeps only its step tag.
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SKIP_NOTE = "SKIPPED_BY_GPU_CHECK.txt"


def _skip_saves(which: str) -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    real_save = DeepSpeedEngine.save_checkpoint

    def save_note(self: Any, save_dir: str, tag: str | None = None, **kwargs: Any) -> bool:
        if which == "best" and tag != "best":
            return bool(real_save(self, save_dir, tag=tag, **kwargs))
        folder = Path(save_dir) / str(tag)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SKIP_NOTE).write_text(
            f"bench/gpu_check.py skipped this save (GIBLET_BENCH_SKIP_SAVE={which}): not a checkpoint\n"
        )
        return True

    DeepSpeedEngine.save_checkpoint = save_note


def _write_peaks(path: Path) -> None:
    import torch

    peaks: dict[str, Any] = {
        "rss_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks.update(
            gpu_peak_allocated_gb=torch.cuda.max_memory_allocated() / 1e9,
            gpu_peak_reserved_gb=torch.cuda.max_memory_reserved() / 1e9,
        )
    path.write_text(json.dumps(peaks))


def main() -> int:
    skip = os.environ.get("GIBLET_BENCH_SKIP_SAVE", "")
    if skip in ("all", "best"):
        _skip_saves(skip)
    train = runpy.run_path(str(REPO / "launch" / "train.py"), run_name="giblet_train")
    peaks_path = os.environ.get("GIBLET_BENCH_PEAKS")
    try:
        return int(train["main"](sys.argv[1:]))
    finally:
        if peaks_path:
            _write_peaks(Path(peaks_path))


if __name__ == "__main__":
    sys.exit(main())
