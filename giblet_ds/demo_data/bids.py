"""Write raw runs as a BIDS dataset (``tools/make_demo_data.py --bids``, and the tests).

    dataset_description.json
    task-T_bold.json                            (RepetitionTime, inherited by every BOLD file)
    stimuli/NAME.m4v, stimuli/NAME.csv          (the sheet: same stem, beside the movie)
    sub-XX/func/sub-XX_task-T_run-N_bold.nii.gz
    sub-XX/func/sub-XX_task-T_run-N_events.tsv  (onset, duration, trial_type, stim_file)

The demo's one movie becomes ``n_runs`` runs by cutting it, its annotations and every subject's
BOLD at the same TR boundaries: run k's volume j is the movie's volume (first TR of k) + j, so
the lag pairing and the planted response carry over unchanged.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from giblet_ds.errors import GibletError
from giblet_ds.store.builder.sheet import END_COLUMN, START_COLUMN, header_key

__all__ = ["BidsRun", "write_bids_dataset", "cut_into_runs"]


@dataclass(frozen=True)
class BidsRun:
    """One run to write: its stimulus movie, optional sheet, and a BOLD NIfTI per subject label."""

    stimulus: Path
    sheet: Path | None
    bold: Mapping[str, Path]
    """Subject label (``01``) -> 4-D NIfTI."""
    seconds: float


def write_bids_dataset(
    root: str | Path, task: str, runs: Sequence[BidsRun], *, repetition_time: float | None = None
) -> Path:
    """Copy ``runs`` into a BIDS layout at ``root`` (run numbers 1..R in order).

    ``repetition_time`` (s): written to the top-level ``task-T_bold.json`` sidecar, which every
    BOLD file inherits (BIDS requires it; None: no sidecar, as in a dataset that lacks one)."""
    root = Path(root)
    (root / "stimuli").mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "giblet-ds demo", "BIDSVersion": "1.9.0"}, indent=1) + "\n"
    )
    if repetition_time is not None:
        (root / f"task-{task}_bold.json").write_text(
            json.dumps({"RepetitionTime": repetition_time, "TaskName": task}, indent=1) + "\n"
        )
    for number, run in enumerate(runs, start=1):
        stim = root / "stimuli" / run.stimulus.name
        if not stim.exists():
            shutil.copyfile(run.stimulus, stim)
        if run.sheet is not None and not stim.with_suffix(run.sheet.suffix).exists():
            shutil.copyfile(run.sheet, stim.with_suffix(run.sheet.suffix))
        for label, bold in run.bold.items():
            func = root / f"sub-{label}" / "func"
            func.mkdir(parents=True, exist_ok=True)
            stem = f"sub-{label}_task-{task}_run-{number}"
            shutil.copyfile(bold, func / f"{stem}_bold.nii.gz")
            (func / f"{stem}_events.tsv").write_text(
                "onset\tduration\ttrial_type\tstim_file\n"
                f"0.0\t{run.seconds:g}\tmovie\t{stim.name}\n"
            )
    return root


def cut_into_runs(
    video: Path,
    annotations: Path,
    bold: Mapping[str, Path],
    out: Path,
    *,
    tr: float,
    lag: int,
    n_runs: int = 2,
) -> list[BidsRun]:
    """One movie, its sheet and its BOLD cut into ``n_runs`` runs of whole TRs (the last run
    takes the remainder, so the runs differ in length); files written under ``out``."""
    import nibabel as nib

    out.mkdir(parents=True, exist_ok=True)
    from giblet_ds.store.builder.video import probe_video

    n_volumes = min(int(nib.load(str(p)).shape[3]) for p in bold.values())  # type: ignore[attr-defined]
    movie_trs = int(probe_video(video).duration_s / tr + 1e-9)
    total = min(n_volumes - lag, movie_trs)  # stimulus TRs every source covers
    if total < 2 * n_runs:
        raise GibletError(f"{n_volumes} volumes cannot be cut into {n_runs} runs")
    # run k covers TRs edges[k]..edges[k+1]; shorter runs first so the lengths are unequal
    base = total // (n_runs + 1)
    edges = [k * base for k in range(n_runs)] + [total]
    header = []
    rows: list[list[str]] = []
    if annotations.suffix == ".xlsx":
        import openpyxl

        sheet = openpyxl.load_workbook(annotations, read_only=True, data_only=True).active
        table = [
            ["" if v is None else str(v) for v in row] for row in sheet.iter_rows(values_only=True)
        ]
        header, rows = table[0], table[1:]
        # the times by their headers, as the builder reads them (the demo's first column is the
        # segment number, not a time)
        keys = [header_key(cell) for cell in header]
        absent = [n for n in (START_COLUMN, END_COLUMN) if header_key(n) not in keys]
        if absent:
            raise GibletError(f"{annotations}: no column {absent} to cut the sheet into runs by")
        times = [keys.index(header_key(name)) for name in (START_COLUMN, END_COLUMN)]
    runs = []
    for k in range(n_runs):
        start, stop = edges[k], edges[k + 1]
        seconds = (stop - start) * tr
        movie = out / f"{video.stem}_part{k + 1}.m4v"
        subprocess.run(
            ["ffmpeg", "-v", "error", "-y", "-ss", f"{start * tr:.3f}", "-i", str(video),
             "-t", f"{seconds:.3f}", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac",
             str(movie)],
            check=True,
        )  # fmt: skip
        sheet_path = None
        if header:
            sheet_path = movie.with_suffix(".csv")
            with open(sheet_path, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(header)
                for row in rows:
                    try:
                        begin, end = (float(row[i]) for i in times)
                    except (ValueError, IndexError):
                        if k == 0:  # a row without times: the builder names it (run 1's sheet)
                            writer.writerow(row)
                        continue
                    if start * tr <= begin < stop * tr:
                        shifted = list(row)
                        shifted[times[0]] = f"{begin - start * tr:.3f}"
                        shifted[times[1]] = f"{end - start * tr:.3f}"
                        writer.writerow(shifted)
        parts = {}
        for label, path in bold.items():
            img: Any = nib.load(str(path))
            # volumes of stimulus TRs start..stop plus the lag's volumes after the last one
            data = np.asarray(img.dataobj[..., start : min(stop + lag, img.shape[3])])
            part = out / f"sub-{label}_run-{k + 1}.nii.gz"
            cut = nib.Nifti1Image(data, img.affine, img.header)
            nib.save(cut, str(part))
            parts[label] = part
        runs.append(BidsRun(stimulus=movie, sheet=sheet_path, bold=parts, seconds=seconds))
    return runs
