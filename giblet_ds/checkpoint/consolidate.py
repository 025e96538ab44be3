"""Consolidate a ZeRO tag into one state dict on disk, streaming one parameter at a time.

Same output as DeepSpeed's ``zero_to_fp32.py`` (file names, shard split, index JSON, tensor values
and order), built from :mod:`zero_reader` and :mod:`serialization` so peak memory is about the
largest single tensor instead of the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from giblet_ds.checkpoint.serialization import (
    SAFE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    TensorMeta,
    plan_shards,
    staged_output_dir,
    write_index,
    write_safetensors_file,
    write_torch_file,
)
from giblet_ds.checkpoint.zero_reader import ParamEntry, ZeroCheckpoint
from giblet_ds.errors import CheckpointError
from giblet_ds.run.layout import TENSOR_KINDS_NAME

__all__ = ["convert_zero_checkpoint", "ConversionResult", "OUTPUT_DTYPES"]

OUTPUT_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass
class ConversionResult:
    """What a conversion wrote."""

    tag_dir: Path
    stage: int
    world_size: int
    output_dir: Path
    files: list[Path] = field(default_factory=list)
    index: Path | None = None
    num_tensors: int = 0
    num_elements: int = 0
    total_bytes: int = 0


def convert_zero_checkpoint(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    *,
    tag: str | None = None,
    dtype: Literal["fp32", "bf16", "fp16"] | torch.dtype = "fp32",
    max_shard_size: int | str | None = "5GB",
    safe_serialization: bool = False,
    exclude_frozen_parameters: bool = False,
    on_file: Callable[[Path, int], None] | None = None,
    verify: bool = True,
) -> ConversionResult:
    """Write the consolidated weights of a ZeRO-1/2/3 tag to ``output_dir``.

    ``max_shard_size=None`` writes a single file whatever its size. Floating tensors are cast to
    ``dtype`` (integer buffers keep theirs, as in DeepSpeed). ``on_file(path, n_tensors)`` is called
    after each file is written. Raises :class:`CheckpointError` for a missing, truncated or foreign
    input; in that case nothing is left in ``output_dir``. Only a complete tag is read, checked
    against its manifest unless ``verify=False`` (giblet_ds.run.resolve_checkpoint). Beside the
    weights, ``tensor_kinds.json`` says which tensors were trainable, frozen or buffers (read by
    the audit; DeepSpeed's files are unchanged).
    """
    target = OUTPUT_DTYPES[dtype] if isinstance(dtype, str) else dtype
    if target not in OUTPUT_DTYPES.values():
        raise CheckpointError(f"dtype must be one of {sorted(OUTPUT_DTYPES)}, got {dtype!r}")
    output_dir = Path(output_dir)
    weights_name = SAFE_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
    index_name = weights_name + ".index.json"

    with ZeroCheckpoint.open(checkpoint_dir, tag, verify=verify) as ckpt:
        entries = ckpt.state_dict_entries(exclude_frozen_parameters)
        metas: dict[str, TensorMeta] = {}
        by_entry: dict[int, TensorMeta] = {}
        for name, entry in entries.items():
            if id(entry) not in by_entry:
                out_dtype = target if entry.dtype.is_floating_point else entry.dtype
                by_entry[id(entry)] = TensorMeta(entry.shape, out_dtype, entry.requires_grad)
            metas[name] = by_entry[id(entry)]
        plan = plan_shards(metas, weights_name, max_shard_size)

        # One fp32 buffer (and one output-dtype buffer) of the largest parameter's size, reused
        # for every tensor: the writer is done with a tensor before it asks for the next one.
        largest = max((e.numel for e in entries.values() if e.kind == "param"), default=0)
        scratch: dict[torch.dtype, torch.Tensor] = {}

        def buffer(dtype: torch.dtype) -> torch.Tensor:
            if dtype not in scratch:
                scratch[dtype] = torch.empty(largest, dtype=dtype)
            return scratch[dtype]

        def produce(name: str) -> torch.Tensor:
            entry: ParamEntry = entries[name]
            if entry.kind != "param":
                tensor = ckpt.read(entry)
                return tensor.to(metas[name].dtype) if tensor.is_floating_point() else tensor
            tensor = ckpt.read(entry, out=buffer(torch.float32))
            if target == torch.float32:
                return tensor
            converted = buffer(target)[: entry.numel].view(entry.shape)
            return converted.copy_(tensor)  # same rounding as Tensor.to (round to nearest even)

        result = ConversionResult(ckpt.tag_dir, ckpt.stage, ckpt.world_size, output_dir)
        with staged_output_dir(output_dir, last=(index_name,)) as stage:
            for filename, names in plan.filename_to_tensors.items():
                sub = {n: metas[n] for n in names}
                if safe_serialization:
                    write_safetensors_file(stage / filename, sub, produce, {"format": "pt"})
                else:
                    write_torch_file(stage / filename, sub, produce)
                if on_file is not None:
                    on_file(output_dir / filename, len(names))
            kinds = {name: entries[name].kind for name in metas}
            (stage / TENSOR_KINDS_NAME).write_text(json.dumps(kinds, indent=1) + "\n")
            if plan.is_sharded:
                write_index(stage / index_name, plan)
        result.files = [output_dir / f for f in plan.filename_to_tensors]
        result.index = output_dir / index_name if plan.is_sharded else None
        result.num_tensors = len(metas)
        unique = {id(m): m for m in metas.values()}.values()
        result.num_elements = sum(m.numel for m in unique)
        result.total_bytes = sum(m.nbytes for m in unique)
        return result
