"""Rank 0's outputs: the metric records (giblet_ds.run.records), the log file, and wandb."""

from __future__ import annotations

import dataclasses
import logging
import re
import uuid
from pathlib import Path
from typing import Any

from giblet_ds.errors import GibletError
from giblet_ds.run.layout import RunDir
from giblet_ds.run.records import Record, TrainRecord, ValRecord, record_to_json
from giblet_ds.run.save_space import record_write_failure

__all__ = ["RunLog", "setup_file_logging", "wandb_run_id"]

log = logging.getLogger("giblet_ds")


def setup_file_logging(run_dir: Path, enabled: bool) -> None:
    """Console on rank 0 only (other ranks stay quiet), plus RUN_DIR/train.log."""
    log.handlers.clear()
    log.propagate = False
    if not enabled:
        log.addHandler(logging.NullHandler())
        return
    log.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(), logging.FileHandler(RunDir(run_dir).log)):
        handler.setFormatter(fmt)
        log.addHandler(handler)


def wandb_run_id(run: RunDir, *, resuming: bool) -> str:
    """The wandb run id of this run: the one kept in RUN_DIR/wandb_run_id when resuming, else a
    fresh random one written there (rank 0 only). Never the folder's name: two runs in folders of
    one name (e.g. the default runs/giblet_3p5b) would otherwise log into one wandb run."""
    path = run.wandb_id
    if resuming and path.is_file():
        kept = path.read_text().strip()
        if re.fullmatch(r"[a-z0-9]{8,64}", kept):
            return kept
        log.warning("%s holds %r, not a wandb run id: starting a new wandb run", path, kept)
    fresh = uuid.uuid4().hex[:16]
    run.path.mkdir(parents=True, exist_ok=True)
    path.write_text(fresh + "\n")
    return fresh


class RunLog:
    """Appends records to metrics.jsonl and mirrors numeric ones to wandb. No-op off rank 0."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        wandb_mode: str,
        wandb_project: str,
        wandb_run_name: str,
        wandb_run_id: str,
        config: dict[str, Any],
    ) -> None:
        self.enabled = enabled
        self.path = RunDir(run_dir).metrics
        self._wandb: Any = None
        if enabled and wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=wandb_project,
                name=wandb_run_name or run_dir.name,
                dir=str(run_dir),
                mode=wandb_mode,  # type: ignore[arg-type]  # validated by LoggingConfig
                config=config,
                resume="allow",
                id=wandb_run_id,
            )

    def write(self, record: Record) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a") as fh:
                fh.write(record_to_json(record) + "\n")
        except OSError as exc:  # a full disk: say which file, and where the run resumes
            raise GibletError(
                record_write_failure(RunDir(self.path.parent), self.path, exc)
            ) from exc
        if self._wandb is not None and isinstance(record, TrainRecord | ValRecord):
            fields = dataclasses.asdict(record)
            fields.pop("time")
            flat = {f"{record.kind}/{k}": v for k, v in _flatten(fields).items()}
            self._wandb.log(flat, step=record.step)
            if isinstance(record, ValRecord) and record.is_best:
                # the dashboard's run table shows these: "is it learning?" without opening a plot
                self._wandb.summary["best/val_metric"] = record.best_metric
                self._wandb.summary["best/val_fmri_r_mean"] = record.fmri_r_mean
                self._wandb.summary["best/val_fmri_r_reliable"] = record.fmri_r_reliable
                self._wandb.summary["best/step"] = record.step

    @property
    def wants_images(self) -> bool:
        """True when images logged now would go somewhere (rank 0 with wandb on)."""
        return self._wandb is not None

    def log_images(self, step: int, images: dict[str, Any]) -> None:
        """Log (H, W, 3) uint8 arrays as wandb images at ``step``."""
        if self._wandb is None or not images:
            return
        import wandb

        self._wandb.log({k: wandb.Image(v) for k, v in images.items()}, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _flatten(fields: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in fields.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out
