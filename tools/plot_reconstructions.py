#!/usr/bin/env python
"""Plot what a trained checkpoint reconstructs: video frames, audio codes, text embeddings, fMRI.

--checkpoint takes a ZeRO tag folder, a run directory (its best tag, else latest), a consolidated
file (.bin/.safetensors/*.index.json) or a zero_to_fp32 output folder; the run config is found
beside it (run_config.yaml / config.resolved.yaml) or given with --config. Writes per-sample PNGs,
voxel_r.nii.gz (per-voxel r in the store's mask space), slice and histogram PNGs, metrics.json and
index.html into --out.

Exit codes: 0 written, 2 unreadable checkpoint, config or store.

    tools/plot_reconstructions.py --checkpoint runs/demo --store demo.h5 --out runs/demo/plots
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from giblet_ds.errors import GibletError
from giblet_ds.report.reconstructions import render_reconstructions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="ZeRO tag, run dir, consolidated file or folder",
    )
    p.add_argument("--store", type=Path, required=True, help="the HDF5 feature store")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--split", choices=["train", "val", "test"], default="val")
    p.add_argument("--num-samples", type=int, default=5, help="samples to draw (default 5)")
    p.add_argument(
        "--config", type=Path, help="run config YAML (default: found beside the weights)"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking the tag's files against its manifest (checksums; on by default)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        print("plot_reconstructions: error: --num-samples and --batch-size must be >= 1",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        result = render_reconstructions(
            args.checkpoint, args.store, args.out, split=args.split,
            num_samples=args.num_samples, config=args.config, device=args.device,
            batch_size=args.batch_size, verify=not args.no_verify,
        )  # fmt: skip
    except GibletError as exc:
        print(f"plot_reconstructions: error: {exc}", file=sys.stderr)
        return 2
    m = result.metrics
    if m["store_match"]["note"]:
        print(f"WARNING: {m['store_match']['note']}")
    print(f"{m['split']} split, {m['n_trs']} TRs: per-voxel r mean {m['fmri_r_mean']:.4f}, "
          f"median {m['fmri_r_median']:.4f}; {len(result.figures)} figures, "
          f"{result.r_map.name}; open {result.index_html}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
