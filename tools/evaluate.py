#!/usr/bin/env python
"""Evaluate a trained model on held-out TRs: model, ridge baseline, noise ceiling and oracle r.

CHECKPOINT_OR_RUN: a run directory (its best tag), a ZeRO tag, or consolidated weights; several
(RUN_A RUN_B ...): a seed ensemble, scored on the average of their predictions, each member's
r beside it, on the same TRs and voxels. A model with subject heads (data.target=subjects), or
--subjects, adds per subject: model r, a per-subject ridge, the subject's own noise ceiling and
SUBJECT_model_r / _ridge_r / _ceiling_r maps. Scores
the split's TRs per voxel and summarizes over the whole mask, the reliable voxels (inter-subject
correlation on the training TRs above data.reliable_isc_threshold, or --reliable-isc) and --roi.
Writes into --out: evaluation.json, model_r / ridge_r / ceiling_r / model_r_normalized (and
oracle_r on the demo) .nii.gz in the store's mask space, model_r.png, table.txt; prints the table.
The ridge baseline (himalaya) is cached beside the store per store hash (--ridge-cache).

Exit codes: 0 written, 2 unreadable checkpoint, store, ROI or ground truth.

    tools/evaluate.py demo_out/run_small --store demo_out/store.h5 --split test --out demo_out/eval
    tools/evaluate.py runs/seed0 runs/seed1 runs/seed2 --store demo_out/store.h5 --out eval_ens

--leave-one-run-out (a store of many runs): also fit the ridge baseline on all runs but one and
score it on the held-out run, for every run; writes leave_one_run_out.json and prints a table.

--folds RUN_1 ... RUN_R (leave-one-run-out of trained models): one run dir per held-out run, each
trained with data.split_runs holding out that run as its test (docs/store.md, "Leave-one-run-
out"). Each fold's best checkpoint is scored on its own held-out run beside a ridge fitted on that
fold's training runs; per fold and pooled over folds (mean of the folds' mean r; r over the
concatenated held-out series). Writes evaluation.json, table.txt and the pooled model_r /
ridge_r maps. Refused (exit 2, nothing written): folds of another store or mask, a fold without
data.split_runs, two folds holding out one run, a run no fold holds out.

    tools/evaluate.py runs/loro-run-1 runs/loro-run-2 runs/loro-run-3 --folds --store S --out E
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from giblet_ds.errors import GibletError

if TYPE_CHECKING:
    from giblet_ds.evaluation import EvaluationResult


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "checkpoint",
        type=Path,
        nargs="+",
        help="run dir (best tag), ZeRO tag or weights file; several: a seed ensemble",
    )
    p.add_argument("--store", type=Path, required=True, help="the HDF5 feature store")
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--roi", type=Path, help="ROI mask NIfTI on the store's grid (value > 0)")
    p.add_argument("--truth", type=Path, help="ground_truth.json (default: found beside the store)")
    p.add_argument("--reliable-isc", type=float, help="override data.reliable_isc_threshold")
    p.add_argument("--no-ridge", action="store_true", help="skip the ridge baseline")
    p.add_argument(
        "--leave-one-run-out", action="store_true",
        help="ridge fitted on all runs but one, scored on that run, for each run",
    )  # fmt: skip
    p.add_argument(
        "--folds", action="store_true",
        help="the run dirs are leave-one-run-out folds (data.split_runs): score and pool them",
    )  # fmt: skip
    p.add_argument(
        "--ridge-cache", type=Path, help="ridge cache folder (default: STORE_DIR/.giblet_cache)"
    )
    p.add_argument(
        "--shifts", type=int, default=100, help="circular shifts of the null (default 100)"
    )
    p.add_argument(
        "--config", type=Path, help="run config YAML (default: found beside the weights)"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument(
        "--subjects",
        action="store_true",
        help="score every subject (automatic for a model with subject heads)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking the tag's files against its manifest (checksums; on by default)",
    )
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.shifts < 1:
        print("evaluate: error: --shifts must be >= 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[evaluate] %(message)s", stream=sys.stderr)
    if args.folds:
        return _folds(args)
    from giblet_ds.evaluation import evaluate, format_table, write_evaluation

    try:
        result = evaluate(
            args.checkpoint, args.store, args.split, roi=args.roi, truth=args.truth,
            ridge=not args.no_ridge, ridge_cache=args.ridge_cache, reliable_isc=args.reliable_isc,
            n_shifts=args.shifts, device=args.device, config=args.config, verify=not args.no_verify,
            per_subject=True if args.subjects else None,
        )  # fmt: skip
        paths = write_evaluation(result, args.out)
        loro = _leave_one_run_out(args, result) if args.leave_one_run_out else None
    except GibletError as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    if loro is not None:
        print(loro)
    print(
        f"\nwrote {paths['json']} and maps, figure in {args.out} ({result.seconds['total']:.1f} s)"
    )
    return 0


def _folds(args: argparse.Namespace) -> int:
    """Score leave-one-run-out folds; write evaluation.json, table.txt and the pooled maps."""
    if args.leave_one_run_out or args.subjects or args.config or args.truth or args.split != "test":
        print("evaluate: error: --folds scores each fold's test split (its held-out run); it "
              "takes no --split, --config, --truth, --subjects or --leave-one-run-out",
              file=sys.stderr)  # fmt: skip
        return 2
    import json

    from giblet_ds.evaluation.leave_one_run_out import evaluate_folds, format_folds
    from giblet_ds.report.brain_maps import save_voxel_map
    from giblet_ds.store import load_mask

    try:
        data = evaluate_folds(
            args.checkpoint, args.store, roi=args.roi, ridge=not args.no_ridge,
            ridge_cache=args.ridge_cache, reliable_isc=args.reliable_isc, n_shifts=args.shifts,
            device=args.device, verify=not args.no_verify,
        )  # fmt: skip
    except GibletError as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    table = format_folds(data)
    maps = data.pop("maps")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evaluation.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "table.txt").write_text(table + "\n")
    mask, affine = load_mask(args.store)
    for name, values in maps.items():
        save_voxel_map(values, mask, affine, args.out / f"{name}.nii.gz")
    print(table)
    print(f"\nwrote {args.out / 'evaluation.json'}, table.txt and the pooled r maps")
    return 0


def _leave_one_run_out(args: argparse.Namespace, result: EvaluationResult) -> str:
    """Run the leave-one-run-out ridge on the evaluated run's target (the subject mean or its
    data.subject) and target smoothing, write its JSON (per-voxel r as lists), return a table."""
    import json

    from giblet_ds.evaluation.leave_one_run_out import leave_one_run_out
    from giblet_ds.store import open_store
    from giblet_ds.store.smoothing import mask_smoothing

    info = open_store(args.store)
    smoothing = mask_smoothing(info, result.target_smoothing_fwhm_mm)
    data = leave_one_run_out(info, subject=result.subject_index, smoothing=smoothing)
    fwhm = data["target_smoothing_fwhm_mm"]
    lines = [
        "leave-one-run-out ridge (fit on the other runs"
        + (f", targets smoothed at FWHM {fwhm:g} mm as the run's" if fwhm else "")
        + "):"
    ]
    for run_id, row in data["runs"].items():
        lines.append(f"  {run_id}: {row['n_trs']} TRs, mean r {row['ridge_r_mean']:.4f}")
        row["ridge_r"] = [round(float(x), 6) for x in row["ridge_r"]]
    lines.append(f"  mean over runs: {data['ridge_r_mean']:.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "leave_one_run_out.json").write_text(json.dumps(data, indent=1) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
