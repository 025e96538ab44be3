"""DeepSpeed 0.19.8's ``zero_to_fp32`` module, on giblet-ds's safe streaming reader and writer.

The same module-level names, signatures and results as ``deepspeed/utils/zero_to_fp32.py``
(``OUTPUT_DTYPE_NAMES``, ``get_fp32_state_dict_from_zero_checkpoint``,
``load_state_dict_from_zero_checkpoint``, ``convert_zero_checkpoint_to_state_dict``,
``convert_zero_checkpoint_to_fp32_state_dict``), so DeepSpeed's ``zero_to_torch.py``, which does
``import zero_to_fp32``, works with our script in place of DeepSpeed's. Differences: no file is
unpickled with ``weights_only=False``; only complete tags are read and checked against their
manifest; errors are :class:`~giblet_ds.errors.CheckpointError` with the file named. ``main`` is
the command line of ``tools/zero_to_fp32.py`` (and of the copy beside every checkpoints folder).
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from giblet_ds.checkpoint.consolidate import OUTPUT_DTYPES, convert_zero_checkpoint
from giblet_ds.checkpoint.zero_reader import ParamEntry, ZeroCheckpoint
from giblet_ds.errors import GibletError

__all__ = [
    "OUTPUT_DTYPE_NAMES",
    "build_parser",
    "convert_zero_checkpoint_to_fp32_state_dict",
    "convert_zero_checkpoint_to_state_dict",
    "get_fp32_state_dict_from_zero_checkpoint",
    "load_state_dict_from_zero_checkpoint",
    "main",
]

debug = 0  # DeepSpeed's zero_to_torch.py sets it; no effect here

OUTPUT_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _resolve_output_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """DeepSpeed's rule: a name of OUTPUT_DTYPE_NAMES (optionally ``torch.``-prefixed, any case)
    or one of its dtypes; anything else is a ValueError listing the choices."""
    resolved: Any = dtype
    if isinstance(dtype, str):
        name = dtype[6:] if dtype.startswith("torch.") else dtype
        resolved = OUTPUT_DTYPE_NAMES.get(name.lower())
    if resolved not in set(OUTPUT_DTYPE_NAMES.values()):
        supported = ", ".join(sorted(OUTPUT_DTYPE_NAMES))
        raise ValueError(f"Unsupported output dtype {dtype!r}. Choose one of: {supported}")
    return resolved


class LazyTensor:
    """One tensor of a tag, read on ``.contiguous()`` (DeepSpeed's lazy_mode pseudo tensor)."""

    def __init__(self, ckpt: ZeroCheckpoint, entry: ParamEntry) -> None:
        self._ckpt, self._entry = ckpt, entry
        self.shape = torch.Size(entry.shape)
        self.dtype = entry.dtype

    def contiguous(self) -> torch.Tensor:
        return self._ckpt.read(self._entry)


def get_fp32_state_dict_from_zero_checkpoint(
    checkpoint_dir: str | Path,
    tag: str | None = None,
    exclude_frozen_parameters: bool = False,
    lazy_mode: bool = False,
) -> dict[str, Any]:
    """The consolidated fp32 state dict of a ZeRO-1/2/3 tag (``checkpoint_dir/tag``; without
    ``tag`` the newest complete tag, or the one ``latest`` names in a DeepSpeed-only folder).

    Buffers keep DeepSpeed's order and dtypes (floating ones as fp32); tied names share one
    tensor. ``lazy_mode=True`` returns :class:`LazyTensor` values read on ``.contiguous()`` (the
    files stay open while the dict is alive). Memory: the whole model in fp32 unless lazy.
    """
    ckpt = ZeroCheckpoint.open(checkpoint_dir, tag)
    entries = ckpt.state_dict_entries(exclude_frozen_parameters)
    if lazy_mode:
        lazy: dict[int, LazyTensor] = {}
        return OrderedDict(
            (name, lazy.setdefault(id(e), LazyTensor(ckpt, e))) for name, e in entries.items()
        )
    with ckpt:
        read: dict[int, torch.Tensor] = {}
        return OrderedDict(
            (name, read[id(e)] if id(e) in read else read.setdefault(id(e), ckpt.read(e)))
            for name, e in entries.items()
        )


def convert_zero_checkpoint_to_state_dict(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    dtype: str | torch.dtype = torch.float32,
    max_shard_size: int | str | None = "5GB",
    safe_serialization: bool = False,
    tag: str | None = None,
    exclude_frozen_parameters: bool = False,
) -> None:
    """Write the consolidated weights (``pytorch_model*.bin`` or ``model*.safetensors`` + index
    when sharded) in ``dtype``, streaming one tensor at a time; integer buffers keep theirs."""
    target = _resolve_output_dtype(dtype)
    convert_zero_checkpoint(
        checkpoint_dir,
        output_dir,
        tag=tag,
        dtype=target,
        max_shard_size=max_shard_size,
        safe_serialization=safe_serialization,
        exclude_frozen_parameters=exclude_frozen_parameters,
    )


def convert_zero_checkpoint_to_fp32_state_dict(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    max_shard_size: int | str | None = "5GB",
    safe_serialization: bool = False,
    tag: str | None = None,
    exclude_frozen_parameters: bool = False,
) -> None:
    """:func:`convert_zero_checkpoint_to_state_dict` in fp32 (DeepSpeed's older name)."""
    convert_zero_checkpoint_to_state_dict(
        checkpoint_dir,
        output_dir,
        dtype=torch.float32,
        max_shard_size=max_shard_size,
        safe_serialization=safe_serialization,
        tag=tag,
        exclude_frozen_parameters=exclude_frozen_parameters,
    )


def load_state_dict_from_zero_checkpoint(
    model: nn.Module, checkpoint_dir: str | Path, tag: str | None = None
) -> nn.Module:
    """Move ``model`` to the CPU and load the tag's fp32 weights into it (``strict=False``, as
    DeepSpeed does); returns the model."""
    state_dict = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag)
    model = model.cpu()
    model.load_state_dict(state_dict, strict=False)
    return model


# ---------------------------------------------------------------------------------------------
# Command line (DeepSpeed's arguments, plus --dtype, --no-shard and --no-verify)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zero_to_fp32.py", description=_USAGE, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "checkpoint_dir",
        help="folder holding the tag folders (a checkpoints folder), a run directory or a tag folder",
    )
    p.add_argument(
        "output_dir", help="folder for pytorch_model*.bin / model*.safetensors (+ index)"
    )
    p.add_argument(
        "--max_shard_size",
        default="5GB",
        help="largest file before sharding, digits and a unit: 5GB, 500MB (default 5GB)",
    )
    p.add_argument(
        "--safe_serialization",
        action="store_true",
        help="write model.safetensors instead of pytorch_model.bin",
    )
    p.add_argument(
        "-t",
        "--tag",
        default=None,
        help="tag folder to convert, e.g. step-00000123 or best (default: the newest complete tag)",
    )
    p.add_argument(
        "--exclude_frozen_parameters",
        action="store_true",
        help="leave out parameters with requires_grad=False",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(OUTPUT_DTYPES),
        default="fp32",
        help="dtype of floating tensors in the output (default fp32)",
    )
    p.add_argument("--no-shard", action="store_true", help="always write one file")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking the tag's files against its manifest (sizes and checksums)",
    )
    p.add_argument(
        "-d", "--debug", action="store_true", help="accepted for compatibility; no effect"
    )
    return p  # fmt: skip


_USAGE = """Consolidate a DeepSpeed ZeRO-1/2/3 checkpoint into plain PyTorch or safetensors weights.

Drop-in for DeepSpeed's zero_to_fp32.py (same arguments, file names and tensors), streaming one
parameter at a time so memory stays near the largest tensor, never unpickling code. Only complete
tags are read (a tag without its 'complete' marker is refused, naming the newest complete one),
checked against their manifest first (--no-verify skips that). Exit codes: 0 written, 2
unreadable, incomplete or corrupted checkpoint (nothing is written then).

    zero_to_fp32.py runs/demo/checkpoints runs/demo/consolidated
    zero_to_fp32.py runs/demo/checkpoints out/ -t best --safe_serialization --dtype bf16
"""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shard: int | str | None = None if args.no_shard else args.max_shard_size
    if isinstance(shard, str) and shard.strip().isdigit():
        shard = int(shard)

    def on_file(path: object, n: int) -> None:
        print(f"  {path}  ({n} tensors)")

    try:
        if args.tag is None:
            from giblet_ds.run.resolver import resolve_checkpoint

            picked = resolve_checkpoint(args.checkpoint_dir, verify=False)
            print(f"zero_to_fp32: using {picked.how} ({picked.path})")
        result = convert_zero_checkpoint(
            args.checkpoint_dir,
            args.output_dir,
            tag=args.tag,
            dtype=args.dtype,
            max_shard_size=shard,
            safe_serialization=args.safe_serialization,
            exclude_frozen_parameters=args.exclude_frozen_parameters,
            on_file=on_file,
            verify=not args.no_verify,
        )
    except GibletError as exc:
        print(f"zero_to_fp32: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"consolidated ZeRO-{result.stage} tag {result.tag_dir} ({result.world_size} rank(s)): "
        f"{result.num_tensors} tensors, {result.num_elements:,} elements, "
        f"{result.total_bytes / 1e9:.3f} GB ({args.dtype}) in {len(result.files)} file(s)"
        + (f" + {result.index.name}" if result.index else "")
    )
    return 0
