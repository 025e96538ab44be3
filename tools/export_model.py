#!/usr/bin/env python
"""Export a trained model as a folder that needs nothing else: weights (safetensors), run config,
feature settings with the feature networks' weight hashes, mask NIfTI, fMRI statistics, held-out
evaluation and a README.md model card. Load it with giblet_ds.load_pretrained(DIR).

CHECKPOINT_OR_RUN: a run directory (its best tag), a ZeRO tag, or consolidated weights.
A store built with --no-pretrained needs --training-video (EnCodec's codebooks were fitted by
k-means on that movie; the export keeps them so new movies are coded the same way).

Exit codes: 0 written, 2 bad input (nothing written).

    tools/export_model.py demo_out/run_small --out demo_out/model \\
        --training-video demo_out/raw/stimuli_demo.m4v
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from giblet_ds.errors import GibletError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="run dir (best tag), ZeRO tag or weights file")
    p.add_argument("--out", type=Path, required=True, help="new output folder")
    p.add_argument("--store", type=Path, help="training store (default: the run's data.store)")
    p.add_argument("--training-video", type=Path, help="training movie (random-weight stores)")
    p.add_argument(
        "--evaluation",
        type=Path,
        help="tools/evaluate.py output folder (default: the run's evaluation-test)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the tag's checksums")
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from giblet_ds.pretrained import export_model

    try:
        out = export_model(
            args.checkpoint, args.out, store=args.store, training_video=args.training_video,
            evaluation=args.evaluation, verify=not args.no_verify,
        )  # fmt: skip
    except GibletError as exc:
        print(f"export_model: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} (model card: {out / 'README.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
