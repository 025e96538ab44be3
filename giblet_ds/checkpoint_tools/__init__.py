"""Checkpoint tools: ZeRO consolidation, weight audit, health report, reconstruction plots.

Read-only towards checkpoints and run directories; never imports DeepSpeed (its pickled objects
are read through inert stand-ins, see :mod:`safe_load`). Command-line wrappers live in ``tools/``.
"""

from giblet_ds.checkpoint_tools.audit import AuditReport, Finding, audit_path, format_report
from giblet_ds.checkpoint_tools.consolidate import (
    OUTPUT_DTYPES,
    ConversionResult,
    convert_zero_checkpoint,
)
from giblet_ds.checkpoint_tools.health import HealthReport, build_health_report
from giblet_ds.checkpoint_tools.loss_curves import plot_loss_curves
from giblet_ds.checkpoint_tools.reconstructions import (
    ReconstructionResult,
    load_model,
    render_reconstructions,
)
from giblet_ds.checkpoint_tools.run_records import RunRecords, read_metrics
from giblet_ds.checkpoint_tools.safe_load import load_torch_file
from giblet_ds.checkpoint_tools.serialization import (
    TensorMeta,
    plan_shards,
    write_safetensors_file,
    write_torch_file,
)
from giblet_ds.checkpoint_tools.zero_reader import ParamEntry, ZeroCheckpoint, resolve_tag_dir

__all__ = [
    "OUTPUT_DTYPES",
    "AuditReport",
    "ConversionResult",
    "Finding",
    "HealthReport",
    "ParamEntry",
    "ReconstructionResult",
    "RunRecords",
    "TensorMeta",
    "ZeroCheckpoint",
    "audit_path",
    "build_health_report",
    "convert_zero_checkpoint",
    "format_report",
    "load_model",
    "load_torch_file",
    "plan_shards",
    "plot_loss_curves",
    "read_metrics",
    "render_reconstructions",
    "resolve_tag_dir",
    "write_safetensors_file",
    "write_torch_file",
]
