"""The run directory: its file names, what a user-given path means, and the typed metric records.

The lowest layer above ``errors``: the trainer writes through it and every tool reads through it.
"""

from giblet_ds.run.layout import BEST_TAG, COMPLETE_MARKER, RunDir, is_zero_tag_dir, step_tag
from giblet_ds.run.records import (
    SCHEMA_VERSION,
    CheckpointRecord,
    EndRecord,
    Record,
    RunRecords,
    SkipRecord,
    StartRecord,
    TrainRecord,
    ValRecord,
    as_float,
    read_metrics,
    record_to_json,
)
from giblet_ds.run.resolver import (
    CheckpointLocation,
    find_run_config,
    resolve_checkpoint,
    resolve_resume,
)

__all__ = [
    "BEST_TAG",
    "COMPLETE_MARKER",
    "SCHEMA_VERSION",
    "CheckpointLocation",
    "CheckpointRecord",
    "EndRecord",
    "Record",
    "RunDir",
    "RunRecords",
    "SkipRecord",
    "StartRecord",
    "TrainRecord",
    "ValRecord",
    "as_float",
    "find_run_config",
    "is_zero_tag_dir",
    "read_metrics",
    "record_to_json",
    "resolve_checkpoint",
    "resolve_resume",
    "step_tag",
]
