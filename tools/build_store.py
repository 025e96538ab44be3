#!/usr/bin/env python
"""Build the HDF5 feature store from the raw movie, annotations and per-subject fMRI.

Example (the Sherlock files as the lab keeps them):
    python tools/build_store.py --video data/stimuli_Sherlock.m4v \
        --annotations data/annotations.xlsx --fmri data/sherlock_nii/*.nii.gz --out store.h5

Settings come from --config YAML (keys: the fields of giblet_ds.store.builder.BuildSettings), then
flags. Re-running with the same inputs and settings is a no-op. Exit 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

# Offline machines must not wait on a model hub (open_clip consults it for some tokenizers).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from giblet_ds.errors import GibletError  # noqa: E402
from giblet_ds.store.builder.pipeline import build_from_paths  # noqa: E402
from giblet_ds.store.builder.settings import (  # noqa: E402
    MASK_RULES,
    BuildSettings,
    load_settings_yaml,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--video", required=True, help="the movie (any container PyAV decodes)")
    p.add_argument("--annotations", required=True, help="annotations .xlsx or .csv")
    p.add_argument("--fmri", required=True, nargs="+", help="one 4-D NIfTI per subject")
    p.add_argument("--out", required=True, help="the store to write (.h5)")
    p.add_argument("--mask", help="mask NIfTI on the fMRI grid (implies --mask-rule file)")
    p.add_argument("--config", help="YAML of build settings; flags override it")
    w = p.add_argument_group(
        "offline pretrained weights (files copied from a machine with internet)"
    )
    w.add_argument(
        "--encodec-weights",
        metavar="PATH",
        help="EnCodec 24 kHz weights: the package's encodec_24khz-d7cc33bc.th (checksum verified)\n"
        "or any state dict of that network (e.g. fine-tuned), or a folder holding the former",
    )
    w.add_argument(
        "--clip-weights",
        metavar="PATH",
        help="open_clip weights for --clip-model: a whole CLIP or its text tower's state dict\n"
        "(.bin/.pt/.pth/.safetensors; checksum verified where open_clip publishes one)",
    )
    s = p.add_argument_group("settings (default: the YAML, else BuildSettings defaults)")
    s.add_argument(
        "--tr",
        type=float,
        help="seconds per TR (default 1.5; needed when the NIfTI headers say another TR)",
    )
    s.add_argument("--lag", type=int, help="pair stimulus TR t with fMRI volume t + lag")
    s.add_argument("--frame-skip", type=int)
    s.add_argument("--frames-per-tr", type=int)
    s.add_argument("--frame-height", type=int)
    s.add_argument("--frame-width", type=int)
    s.add_argument("--encodec-bandwidth", type=float, choices=(1.5, 3.0, 6.0, 12.0, 24.0))
    s.add_argument("--clip-model", help="open_clip model name (default ViT-H-14)")
    s.add_argument("--clip-pretrained-tag")
    s.add_argument("--annotations-per-tr", type=int)
    s.add_argument("--mask-rule", choices=MASK_RULES)
    s.add_argument("--split-fractions", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"))
    s.add_argument("--split-gap", type=int, help="TRs between splits (>= lag + 10)")
    s.add_argument("--audio-segment-s", type=float)
    s.add_argument("--device", help="torch device for EnCodec and CLIP (cpu, cuda)")
    s.add_argument(
        "--max-dropped-fraction",
        type=float,
        metavar="F",
        help="build even when up to this fraction of annotation rows lack times (default 0.02)",
    )
    s.add_argument(
        "--no-pretrained",
        dest="pretrained",
        action="store_const",
        const=False,
        help="RANDOM EnCodec and CLIP weights (offline demos/tests; recorded in the store)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> BuildSettings:
    values: dict[str, Any] = load_settings_yaml(args.config) if args.config else {}
    for name in (
        "tr", "lag", "frame_skip", "frames_per_tr", "frame_height", "frame_width",
        "encodec_bandwidth", "clip_model", "clip_pretrained_tag", "annotations_per_tr",
        "mask_rule", "split_fractions", "split_gap", "audio_segment_s", "device", "pretrained",
        "max_dropped_fraction",
    ):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    if args.mask and "mask_rule" not in values:
        values["mask_rule"] = "file"
    return BuildSettings.from_mapping(values, source=args.config or "flags")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = build_from_paths(
            args.video,
            args.annotations,
            args.fmri,
            args.out,
            settings_from_args(args),
            mask=args.mask,
            progress=not args.quiet,
            encodec_weights=args.encodec_weights,
            clip_weights=args.clip_weights,
        )
    except GibletError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    print(f"{result.path} ({'built' if result.rebuilt else 'up to date'}; {stages})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
