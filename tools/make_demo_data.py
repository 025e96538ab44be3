#!/usr/bin/env python
"""Make the demo's raw files (movie, annotations, 3 subjects of planted fMRI) in OUT_DIR.

Then build the demo store with the printed command. ``--bids``: also write OUT_DIR/bids, the same
material cut into 2 runs of unequal length as a BIDS dataset (task ``movie``). Exit 2 on a missing system package or bad
argument (ffmpeg, espeak-ng and opencv-doc come from `make setup`).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from giblet_ds.demo_data import DemoParams, make_demo_data
from giblet_ds.demo_data.bids import cut_into_runs, write_bids_dataset
from giblet_ds.errors import GibletError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out_dir", help="folder for the raw demo files")
    p.add_argument("--seconds", type=float, default=DemoParams.duration_s, help="movie length")
    p.add_argument("--subjects", type=int, default=DemoParams.n_subjects)
    p.add_argument("--noise", type=float, default=DemoParams.noise_sd, help="noise sd per subject")
    p.add_argument("--seed", type=int, default=DemoParams.seed)
    p.add_argument("--bids", action="store_true", help="also write a 2-run BIDS dataset")
    args = p.parse_args(argv)
    params = DemoParams(
        duration_s=args.seconds, n_subjects=args.subjects, noise_sd=args.noise, seed=args.seed
    )
    try:
        paths = make_demo_data(args.out_dir, params)
    except GibletError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    store = f"{args.out_dir.rstrip('/')}/store.h5"
    command = ["python", "tools/build_store.py", *paths.build_command(store)]
    print("build the demo store with:\n  " + shlex.join(command))
    if args.bids:
        bold = {f"{k + 1:02d}": path for k, path in enumerate(paths.fmri)}
        try:
            runs = cut_into_runs(
                paths.video, paths.annotations, bold, paths.root / "bids_parts",
                tr=params.tr, lag=params.lag,
            )  # fmt: skip
        except GibletError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        root = write_bids_dataset(paths.root / "bids", "movie", runs, repetition_time=params.tr)
        runs_store = f"{args.out_dir.rstrip('/')}/store_runs.h5"
        command = ["python", "tools/build_store.py", "--bids", str(root), "--task", "movie",
                   "--config", str(paths.settings_yaml), "--out", runs_store]  # fmt: skip
        print("build the 2-run store with:\n  " + shlex.join(command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
