#!/usr/bin/env python
"""Build the HDF5 feature store from the raw movie, annotations and per-subject fMRI.

Example (the Sherlock files as the lab keeps them):
    python tools/build_store.py --video data/stimuli_Sherlock.m4v \
        --annotations data/annotations.xlsx --fmri data/sherlock_nii/*.nii.gz --out store.h5
Many runs: --bids DIR --task TASK [--space SPACE] [--derivatives fmriprep], or --runs runs.yaml
(docs/store.md, "Many runs").

Settings come from --config YAML (keys: the fields of giblet_ds.store.builder.BuildSettings), then
flags. Re-running with the same inputs and settings is a no-op. Exit 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

# Offline machines must not wait on a model hub (open_clip consults it for some tokenizers).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from giblet_ds.errors import GibletError  # noqa: E402
from giblet_ds.store.builder.bids_layout import find_bids_runs  # noqa: E402
from giblet_ds.store.builder.pipeline import BuildInputs, build_from_paths, build_store  # noqa: E402
from giblet_ds.store.builder.run_list import read_runs_yaml  # noqa: E402
from giblet_ds.store.builder.settings import (  # noqa: E402
    MASK_RULES,
    BuildSettings,
    load_settings_yaml,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    one = p.add_argument_group("one run (a movie, its annotations, one NIfTI per subject)")
    one.add_argument("--video", help="the movie (any container PyAV decodes)")
    one.add_argument("--annotations", help="annotations .xlsx or .csv")
    one.add_argument("--fmri", nargs="+", help="one 4-D NIfTI per subject")
    many = p.add_argument_group("many runs")
    many.add_argument("--bids", metavar="DIR", help="a BIDS dataset (runs found with pybids)")
    many.add_argument("--task", help="the BIDS task whose runs to build (with --bids)")
    many.add_argument("--space", help="fMRIPrep output space, e.g. MNI152NLin2009cAsym")
    many.add_argument(
        "--derivatives", metavar="NAME", help="use DIR/derivatives/NAME's desc-preproc BOLD"
    )
    many.add_argument("--runs", metavar="YAML", help="runs listed by hand (docs/store.md)")
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
        help="seconds per TR (default: with --bids the sidecars' RepetitionTime, else 1.5;\n"
        "needed when the NIfTI headers say another TR); overrides both",
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
    s.add_argument(
        "--split-by", choices=("time", "run"), help="cut every run in time, or hold out whole runs"
    )
    s.add_argument("--split-seed", type=int, help="seed of the run assignment (--split-by run)")
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
        "mask_rule", "split_fractions", "split_gap", "split_by", "split_seed", "audio_segment_s",
        "device", "pretrained",
        "max_dropped_fraction",
    ):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    if args.mask and "mask_rule" not in values:
        values["mask_rule"] = "file"
    return BuildSettings.from_mapping(values, source=args.config or "flags")


def _inputs_given(args: argparse.Namespace) -> str | None:
    """What is wrong with the combination of input flags (None: nothing)."""
    single = [f for f in ("video", "annotations", "fmri") if getattr(args, f)]
    sources = bool(single) + bool(args.bids) + bool(args.runs)
    if sources != 1:
        return "give one of: --video/--annotations/--fmri, --bids DIR --task TASK, --runs YAML"
    if single and len(single) != 3:
        return "a one-run build needs --video, --annotations and --fmri"
    if args.bids and not args.task:
        return "--bids needs --task"
    if (args.task or args.space or args.derivatives) and not args.bids:
        return "--task, --space and --derivatives go with --bids"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = _inputs_given(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        if args.bids or args.runs:
            runs = (
                find_bids_runs(args.bids, args.task, space=args.space, derivatives=args.derivatives)
                if args.bids
                else read_runs_yaml(args.runs)
            )
            inputs = BuildInputs(
                runs=runs, mask=Path(args.mask) if args.mask else None,
                encodec_weights=Path(args.encodec_weights) if args.encodec_weights else None,
                clip_weights=Path(args.clip_weights) if args.clip_weights else None,
            )  # fmt: skip
            result = build_store(
                inputs, args.out, settings_from_args(args), progress=not args.quiet
            )
        else:
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
