"""tools/make_demo_data.py --bids: the demo's movie, sheet and BOLD cut into runs that build."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np

from giblet_ds.demo_data.bids import cut_into_runs
from giblet_ds.demo_data.sheet import write_xlsx
from giblet_ds.store.builder.sheet import read_annotations

TR, LAG = 0.5, 1


def _movie(path: Path, seconds: float) -> Path:
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=32x18:rate=10",
         "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000", "-t", str(seconds),
         "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(path)],
        check=True,
    )  # fmt: skip
    return path


def test_the_sheet_is_cut_by_its_time_columns_not_its_first_columns(tmp_path: Path) -> None:
    """The demo sheet's first column is the segment number: the cut reads Start and End by their
    headers (it took the segment number for the start time: run 1 got every row, unshifted, and
    run 2 none, so the printed build command failed)."""
    movie = _movie(tmp_path / "movie.m4v", 6.0)  # 12 TRs: runs of 4 and 8 TRs (2 s and 4 s)
    rows = [(k + 1, start, start + 0.4, f"scene {k}", "Narrator", "room")
            for k, start in enumerate([0.1, 0.9, 1.7, 2.2, 3.1, 4.6, 5.5])]  # fmt: skip
    sheet = write_xlsx(tmp_path / "annotations.xlsx", rows)
    volume = np.zeros((2, 2, 2, 12 + LAG), np.float32)
    bold = tmp_path / "sub.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(bold))

    runs = cut_into_runs(movie, sheet, {"01": bold}, tmp_path / "parts", tr=TR, lag=LAG)

    assert [run.seconds for run in runs] == [2.0, 4.0]
    first, _ = read_annotations(runs[0].sheet)
    second, _ = read_annotations(runs[1].sheet)
    assert [(a.start, a.end) for a in first] == [(0.1, 0.5), (0.9, 1.3), (1.7, 2.1)]
    # run 2 starts at 2.0 s of the movie: its rows' times are shifted by 2.0 s
    assert [(round(a.start, 3), round(a.end, 3)) for a in second] == [
        (0.2, 0.6), (1.1, 1.5), (2.6, 3.0), (3.5, 3.9)
    ]  # fmt: skip
    assert second[0].text.startswith("scene 3")
    assert [nib.load(str(p)).shape[3] for run in runs for p in run.bold.values()] == [5, 9]
