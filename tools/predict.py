#!/usr/bin/env python
"""Predict brain responses to a new movie with an exported model (tools/export_model.py).

    tools/predict.py MODEL_DIR --video NEW.mp4 [--annotations FILE] --out PRED.nii.gz \\
        [--subject ID] [--codes CODES.csv|.npy] [--units z|raw]
    tools/predict.py MODEL_DIR --video A.mp4 --contrast B.mp4 --out DIR

Features are computed by the store builder's own code with the export's settings; frames are
sampled at the training movie's times within each TR, whatever the new movie's frame rate or
size. PRED.nii.gz holds one volume per whole TR of the movie: volume i is the BOLD at
(i + lag) x TR s (the lag is applied; the header's toffset and PRED.json say so). Without
--annotations every text slot is empty (PRED.json says so). --contrast writes the mean
predicted response to each movie, their difference (A - B) and a figure into DIR.

Refused (exit 2, nothing written): feature weights that differ from the export's (unless
--allow-other-weights, recorded in the output), a model folder missing or altering a file, a
movie without a video stream, a non-finite prediction, an unknown --subject (the valid ones
are listed).

--subject: with a model trained with subject heads (data.target=subjects), a subject's name (as
the export lists them) or index predicts through that subject's own head, and --units raw uses
that subject's raw training mean and std; without --subject, the average subject (the subject
mean). A model trained without subject heads predicts only its training target.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from giblet_ds.errors import GibletError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", type=Path, help="exported model folder")
    p.add_argument("--video", type=Path, required=True, help="the movie to predict")
    p.add_argument("--annotations", type=Path, help="annotation sheet (.xlsx/.csv) of --video")
    p.add_argument("--contrast", type=Path, help="second movie B: write A, B and A - B into --out")
    p.add_argument("--contrast-annotations", type=Path, help="annotation sheet of --contrast")
    p.add_argument(
        "--out", type=Path, required=True, help="PRED.nii.gz (or a folder with --contrast)"
    )
    p.add_argument("--codes", type=Path, help="also write per-TR bottleneck codes (.csv or .npy)")
    p.add_argument(
        "--subject",
        help="a subject's name or index: its own subject head (default: the average subject)",
    )
    p.add_argument(
        "--units",
        choices=["z", "raw"],
        default="z",
        help="z-scored (default) or the subjects' raw units",
    )
    p.add_argument(
        "--encodec-weights", type=Path, help="EnCodec weight file of a pretrained export"
    )
    p.add_argument("--clip-weights", type=Path, help="CLIP weight file of a pretrained export")
    p.add_argument(
        "--allow-other-weights",
        action="store_true",
        help="go on when feature weights differ from the export's (recorded)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.contrast is None and (args.contrast_annotations is not None):
        print("predict: error: --contrast-annotations goes with --contrast", file=sys.stderr)
        return 2
    if args.contrast is not None and args.codes is not None:
        print("predict: error: --codes is for one movie, not with --contrast", file=sys.stderr)
        return 2
    from giblet_ds.pretrained import load_pretrained
    from giblet_ds.pretrained.predict import (
        check_subject,
        extractors_for,
        predict_movie,
        write_contrast,
        write_prediction,
    )

    try:
        model = load_pretrained(args.model, device=args.device, dtype=args.dtype)
        subject = check_subject(model, args.subject)
        with_text = args.annotations is not None or args.contrast_annotations is not None
        extractors = extractors_for(
            model, with_text=with_text, encodec_weights=args.encodec_weights,
            clip_weights=args.clip_weights, allow_other_weights=args.allow_other_weights,
            device=args.device,
        )  # fmt: skip
        a = predict_movie(
            model, args.video, extractors, annotations=args.annotations, subject=subject
        )
        if args.contrast is None:
            paths = write_prediction(model, a, args.out, units=args.units, codes=args.codes)
        else:
            b = predict_movie(
                model,
                args.contrast,
                extractors,
                annotations=args.contrast_annotations,
                subject=subject,
            )
            paths = write_contrast(model, a, b, args.out, units=args.units)
    except GibletError as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return 2
    if not all(model.features.pretrained.values()):
        print("predict: WARNING: this model's audio and text features come from RANDOM-WEIGHT "
              "EnCodec and CLIP networks (see its README.md)", file=sys.stderr)  # fmt: skip
    for result in [a] if args.contrast is None else [a, b]:
        rec = result.record
        print(f"{result.movie.name}: {rec['n_trs']} TRs of {rec['tr_s']} s predicted for "
              f"{subject.label} ({args.units} units); {rec['timing']}")  # fmt: skip
        print(f"  text: {rec['annotations']}")
        print(f"  feature weights: {rec['feature_weights']}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
