"""What the consolidated formats share: the safetensors dtype codes and the shard index.

One table and one index reader, used by the writers (serialization), the audit and the model loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from giblet_ds.errors import CheckpointError

__all__ = ["SAFETENSORS_DTYPES", "read_shard_index"]

# safetensors' dtype codes (its format spec) for the dtypes a checkpoint holds.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def read_shard_index(index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names, in first-appearance order; all must exist.

    The index is Hugging Face's: ``{"metadata": {...}, "weight_map": {tensor name: file name}}``.
    """
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index}: not a shard index JSON with a weight_map ({exc})") from exc
    files = [index.parent / name for name in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index}: shard file(s) missing: {', '.join(missing)}")
    return files
