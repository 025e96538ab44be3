"""Checkpoints on disk: read ZeRO tags without DeepSpeed, consolidate, write, load safely, audit.

Read-only towards checkpoints; never imports DeepSpeed (its pickled objects are read through inert
stand-ins, see :mod:`safe_load`). Command-line wrappers live in ``tools/``.
"""

from giblet_ds.checkpoint.audit import AuditReport, Finding, audit_path, format_report
from giblet_ds.checkpoint.consolidate import (
    OUTPUT_DTYPES,
    ConversionResult,
    convert_zero_checkpoint,
)
from giblet_ds.checkpoint.loading import iter_checkpoint_tensors, load_model
from giblet_ds.checkpoint.safe_load import load_torch_file
from giblet_ds.checkpoint.serialization import (
    TensorMeta,
    plan_shards,
    write_safetensors_file,
    write_torch_file,
)
from giblet_ds.checkpoint.zero_reader import ParamEntry, ZeroCheckpoint

__all__ = [
    "OUTPUT_DTYPES",
    "AuditReport",
    "ConversionResult",
    "Finding",
    "ParamEntry",
    "TensorMeta",
    "ZeroCheckpoint",
    "audit_path",
    "convert_zero_checkpoint",
    "format_report",
    "iter_checkpoint_tensors",
    "load_model",
    "load_torch_file",
    "plan_shards",
    "write_safetensors_file",
    "write_torch_file",
]
