#!/usr/bin/env python
"""Consolidate a DeepSpeed ZeRO-1/2/3 checkpoint into plain PyTorch or safetensors weights.

Drop-in for DeepSpeed's ``zero_to_fp32.py`` (same arguments, file names and tensors), streaming one
parameter at a time so memory stays near the largest tensor. Exit codes: 0 written, 2 unreadable or
incomplete checkpoint (nothing is written then).

    tools/zero_to_fp32.py runs/demo/checkpoints runs/demo/consolidated
    tools/zero_to_fp32.py runs/demo/checkpoints out/ -t best --safe_serialization --dtype bf16
"""

from __future__ import annotations

import argparse
import sys

from giblet_ds.checkpoint import OUTPUT_DTYPES, convert_zero_checkpoint
from giblet_ds.errors import GibletError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "checkpoint_dir", help="folder holding the tag folders and 'latest' (or a tag folder)"
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
        help="tag folder to convert, e.g. step-00000123 or best (default: 'latest')",
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
        "-d", "--debug", action="store_true", help="accepted for compatibility; no effect"
    )
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shard: int | str | None = None if args.no_shard else args.max_shard_size
    if isinstance(shard, str) and shard.strip().isdigit():
        shard = int(shard)

    def on_file(path: object, n: int) -> None:
        print(f"  {path}  ({n} tensors)")

    try:
        result = convert_zero_checkpoint(
            args.checkpoint_dir,
            args.output_dir,
            tag=args.tag,
            dtype=args.dtype,
            max_shard_size=shard,
            safe_serialization=args.safe_serialization,
            exclude_frozen_parameters=args.exclude_frozen_parameters,
            on_file=on_file,
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


if __name__ == "__main__":
    sys.exit(main())
