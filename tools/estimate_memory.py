#!/usr/bin/env python
"""Parameters per group and memory per GPU (ZeRO-2 / ZeRO-3, activations) for a run config.

    python tools/estimate_memory.py --config launch/configs/giblet_3p5b.yaml --num-gpus 8
    python tools/estimate_memory.py --set optim.micro_batch_size=4 --num-nodes 2

Builds the model on the meta device: nothing is allocated, so it runs on a laptop.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from giblet_ds.config import load_config
from giblet_ds.errors import GibletError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "launch" / "configs" / "giblet_3p5b.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run YAML (default: 3.5B)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. optim.lr=3e-4",
    )
    parser.add_argument("--num-gpus", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes (default 1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Only DeepSpeed's arithmetic is used: no accelerator, and no warning about not finding one.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from giblet_ds.memory_estimate import estimate, format_estimate
        from giblet_ds.resolve import resolve

        world = args.num_gpus * args.num_nodes
        resolved = resolve(
            load_config(args.config, args.set), world_size=world, require_store=False
        )
        print(resolved.describe_sizes())
        print(
            format_estimate(
                estimate(resolved.cfg, num_gpus=args.num_gpus, num_nodes=args.num_nodes)
            )
        )
    except GibletError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
