"""Typed records of ``metrics.jsonl``: one dataclass per kind, shared by the writer and every reader.

Each line is one record's fields plus ``kind`` and ``time`` (seconds since the epoch). JSON has no
NaN or Inf: they are written as the strings ``"nan"``/``"inf"`` and read back as floats. The start
record carries :data:`SCHEMA_VERSION`; a reader ignores keys it does not know (newer writers) and
leaves fields it does not find at their defaults (older writers).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from giblet_ds.errors import CheckpointError
from giblet_ds.run.layout import RunDir

__all__ = [
    "SCHEMA_VERSION",
    "CheckpointRecord",
    "EndRecord",
    "Record",
    "RunRecords",
    "SkipRecord",
    "StartRecord",
    "TrainRecord",
    "ValRecord",
    "as_float",
    "read_metrics",
    "record_to_json",
]

SCHEMA_VERSION = 2
"""1: untyped records (before giblet_ds.run.records); 2: these dataclasses."""


def as_float(value: Any) -> float:
    """A logged number; NaN/Inf arrive as the strings "nan"/"inf". None -> NaN."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class Record:
    """Fields every record has."""

    kind: ClassVar[str] = ""
    time: float = field(default_factory=time.time)


@dataclass
class StartRecord(Record):
    kind: ClassVar[str] = "start"
    schema_version: int = SCHEMA_VERSION
    world_size: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved run config (giblet_ds.config.config_to_dict)."""
    param_counts: dict[str, int] = field(default_factory=dict)
    """Per parameter group, plus encoder, decoder and total."""
    steps_per_epoch: int = 0
    max_steps: int = 0
    start_step: int = 0
    store: str = ""
    store_hash: str | None = None
    fmri_noise_ceiling_r: float | None = None
    device: str = ""
    peak_flops: float | None = None
    mixer_start: list[float] | None = None
    """The temporal mixer's start kernel per window slot (model.context_init=hrf), None when it
    starts at TR t alone or there is no mixer (k = 1)."""
    launch: str = ""
    """Who set the ranks: launcher (deepspeed, torchrun), slurm (srun tasks) or single."""
    slurm_job_id: str | None = None
    """SLURM_JOB_ID (the same for every requeue of a job), None outside SLURM."""
    slurm_restart_count: int | None = None
    """SLURM_RESTART_COUNT: 0 on the first start, n after n requeues; None outside SLURM."""
    resume_changes: dict[str, list[Any]] = field(default_factory=dict)
    """Settings this resume applied or converted (docs/resume.md): dotted key -> [saved, now]."""
    resume_notes: list[str] = field(default_factory=list)
    """What the conversions did (early stopping restarted, the cosine re-planned)."""


@dataclass
class TrainRecord(Record):
    """One logged optimizer step."""

    kind: ClassVar[str] = "train"
    step: int = 0
    epoch: int = 0
    loss: float = math.nan
    terms: dict[str, float] = field(default_factory=dict)
    lr: float = math.nan
    grad_norm: float | None = None
    skipped_steps: int = 0
    """Skipped steps so far in this run."""
    step_time_s: float = math.nan
    samples_per_s: float = math.nan
    mfu: float | None = None
    """Model FLOP utilization, 0..1; None when the device's peak is unknown."""
    memory: dict[str, float] = field(default_factory=dict)
    """``rss_gb``, ``gpu_allocated_gb``, ``gpu_max_allocated_gb``, ``gpu_max_reserved_gb``."""
    devices: list[dict[str, Any]] = field(default_factory=list)
    """NVML readings per GPU, or one CPU reading (train/device_health.py)."""


@dataclass
class SkipRecord(Record):
    """An optimizer step skipped for a non-finite loss or gradient."""

    kind: ClassVar[str] = "skip"
    step: int = 0
    terms: list[str] = field(default_factory=list)
    consecutive: int = 0


@dataclass
class ValRecord(Record):
    kind: ClassVar[str] = "val"
    step: int = 0
    epoch: int = 0
    loss: float = math.nan
    terms: dict[str, float] = field(default_factory=dict)
    fmri_r_mean: float = math.nan
    fmri_r_median: float = math.nan
    fmri_r_frac_gt_0p1: float = math.nan
    fmri_spatial_r: float = math.nan
    fmri_noise_ceiling_r: float | None = None
    fmri_r_reliable: float = math.nan
    """Mean r over the reliable voxels (training-TR inter-subject r > data.reliable_isc_threshold)."""
    fmri_r_normalized: float | None = None
    """fmri_r_reliable / the mean ceiling of those voxels on these TRs (None: one subject)."""
    fmri_n_reliable: int | None = None
    """How many voxels are reliable."""
    fmri_constant_term: float | None = None
    """Normalized fMRI loss of the training-mean constant on these TRs: the score to beat."""
    fmri_r_reliable_by_subject: dict[str, float] | None = None
    """Subject heads (data.target=subjects): subject id -> mean r of that subject's own head
    against that subject's own volumes over the reliable voxels, in store order; None (null) for
    a subject-mean target. The fmri_r_* fields above score the average-subject output against the
    subject mean, and they alone drive early stopping and ``best``."""
    is_best: bool = False
    best_metric: float | None = None
    patience_left: int | None = None


@dataclass
class CheckpointRecord(Record):
    kind: ClassVar[str] = "checkpoint"
    step: int = 0
    tag: str = ""
    path: str = ""


@dataclass
class EndRecord(Record):
    kind: ClassVar[str] = "end"
    step: int = 0
    status: str = "failed"
    """finished | early_stopped | preempted (a SIGTERM/SIGUSR1 stopped it at a step boundary after
    a complete save; launch/train.py then exits 75 and the run resumes from that save) | failed"""
    reason: str = ""


KINDS: dict[str, type[Record]] = {
    cls.kind: cls
    for cls in (StartRecord, TrainRecord, SkipRecord, ValRecord, CheckpointRecord, EndRecord)
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible as "nan"/"inf"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def record_to_json(record: Record) -> str:
    """One metrics.jsonl line (without the newline)."""
    return json.dumps(_jsonable({"kind": record.kind, **dataclasses.asdict(record)}))


def _field_names(cls: type[Record]) -> tuple[frozenset[str], frozenset[str]]:
    """(every field, the float-typed ones) of a record class."""
    fields = dataclasses.fields(cls)
    names = frozenset(f.name for f in fields)
    return names, frozenset(f.name for f in fields if "float" in str(f.type))


# Computed once per kind at import, not once per line read.
_FIELDS = {kind: _field_names(cls) for kind, cls in KINDS.items()}


def record_from_json(data: dict[str, Any]) -> Record | None:
    """The typed record of one parsed line; None for an unknown kind."""
    cls = KINDS.get(str(data.get("kind")))
    if cls is None:
        return None
    names, floats = _FIELDS[cls.kind]
    values = {}
    for key, value in data.items():
        if key not in names:
            continue
        if key in floats and value is not None and not isinstance(value, dict | list):
            value = as_float(value)  # "nan"/"inf" back to floats
        values[key] = value
    return cls(**values)


@dataclass
class RunRecords:
    """The records of one run directory, split by kind, in file order."""

    run_dir: Path
    start: list[StartRecord] = field(default_factory=list)
    train: list[TrainRecord] = field(default_factory=list)
    skip: list[SkipRecord] = field(default_factory=list)
    val: list[ValRecord] = field(default_factory=list)
    checkpoint: list[CheckpointRecord] = field(default_factory=list)
    end: list[EndRecord] = field(default_factory=list)
    last: Record | None = None
    bad_lines: list[int] = field(default_factory=list)

    @property
    def run(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config of the latest (re)start, else RUN_DIR/config.resolved.yaml."""
        if self.start and self.start[-1].config:
            return dict(self.start[-1].config)
        path = self.run.config
        if path.is_file():
            try:
                loaded = yaml.safe_load(path.read_text())
            except yaml.YAMLError:
                return {}
            return loaded if isinstance(loaded, dict) else {}
        return {}

    @property
    def last_time(self) -> float | None:
        return as_float(self.last.time) if self.last else None


def read_metrics(run_dir: str | Path) -> RunRecords:
    """Parse RUN_DIR/metrics.jsonl. A torn last line (a crash mid-write) is skipped and noted."""
    run = RunDir.of(run_dir)
    if not run.path.is_dir():
        raise CheckpointError(f"{run.path}: run directory not found")
    if not run.metrics.is_file():
        raise CheckpointError(
            f"{run.metrics}: no metrics file (not a giblet-ds run directory, or the run never "
            "started)"
        )
    out = RunRecords(run.path)
    with run.metrics.open() as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                record = record_from_json(data) if isinstance(data, dict) else None
            except (ValueError, TypeError):
                record = None
            if record is None:
                out.bad_lines.append(number)
                continue
            getattr(out, record.kind).append(record)
            out.last = record
    return out
