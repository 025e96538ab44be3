"""Checkpoint tools: ZeRO consolidation, weight audit, health report, reconstruction plots.

Read-only towards checkpoints and run directories; never imports DeepSpeed (its pickled objects
are read through inert stand-ins, see :mod:`safe_load`).
"""

from giblet_ds.checkpoint_tools.consolidate import (
    OUTPUT_DTYPES,
    ConversionResult,
    convert_zero_checkpoint,
)
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
    "ConversionResult",
    "ParamEntry",
    "TensorMeta",
    "ZeroCheckpoint",
    "convert_zero_checkpoint",
    "load_torch_file",
    "plan_shards",
    "resolve_tag_dir",
    "write_safetensors_file",
    "write_torch_file",
]
