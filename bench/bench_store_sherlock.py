#!/usr/bin/env python
"""Sherlock-scale store build (not a test): time per stage and peak RSS from generated raw files.

    nice -n 19 python bench/bench_store_sherlock.py WORK_DIR [--minutes 49.4] [--subjects 5]
        [--runs 1] [--generate-only] [--keep]

Makes, under WORK_DIR (put it on a disk with ~15 GB free; /tmp here), files the size of the lab's:
- ``movie.m4v``: ffmpeg's ``testsrc2`` at 640 x 360, 25 fps, H.264, with an AAC tone track whose
  pitch steps every second (so EnCodec codes vary), ``--minutes`` long (49.4 min = 1,976 TRs);
- ``annotations.xlsx``: ~1,000 rows in the lab's columns, rows 479-961 repeating earlier rows;
- ``sub-N.nii.gz``: ``--subjects`` float32 4-D NIfTI of (61, 73, 61, TRs + 6) on the 3 mm grid,
  an ellipsoid "brain" of ~83,000 voxels (baseline + noise), zeros outside; streamed to gzip
  one volume at a time so the generator itself stays small.

``--runs N`` (N > 1) cuts that length into N runs of whole TRs (the last takes the remainder):
``movie_run-K.m4v``, ``annotations_run-K.xlsx`` (its share of the rows), ``sub-N_run-K.nii.gz``
(the run's TRs + 6 volumes) and a ``runs.yaml`` listing them (docs/store.md, "Many runs").

Then runs the build with the default settings and random weights (nothing is downloaded) in a
child process (one run: ``build_from_paths``; many: ``tools/build_store.py --runs runs.yaml``,
its own argument handling) and reads its stage times and the running peak RSS recorded at the
end of each stage (``ru_maxrss``; the build's own process only). Prints one JSON line, with
``build_s_per_movie_minute`` (wall seconds of the child per minute of movie stored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

TR = 1.5
GRID = (61, 73, 61)
RADII = (27.0, 33.0, 22.3)  # ellipsoid voxel count ~83,000, like the 5-subject Sherlock mask
EXTRA_VOLUMES = 6  # fMRI runs a little longer than the movie, as in the real data


def _machine() -> str:
    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return f"{cpu}, {os.cpu_count()} cores, {int(mem) / 2**20:.0f} GB RAM"


def make_movie(path: Path, seconds: float) -> None:
    # A tone whose pitch steps every second: EnCodec sees changing sound, ffmpeg makes it fast.
    tone = "sin(2*PI*(220+110*mod(floor(t)\\,7))*t)*0.3"
    subprocess.run(
        [
            "ffmpeg", "-v", "error", "-y",
            "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25",
            "-f", "lavfi", "-i", f"aevalsrc={tone}|{tone}:s=44100:c=stereo",
            "-t", f"{seconds:.3f}", "-c:v", "libx264", "-preset", "ultrafast", "-crf", "28",
            "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "128k", str(path),
        ],
        check=True,
    )  # fmt: skip


def make_annotations(path: Path, seconds: float, rows: int = 1000) -> None:
    """``rows`` rows in the lab's columns over ``seconds``; rows 47.8%..96.1% of the sheet
    repeat earlier ones (rows 479-961 of the lab's 1,000)."""
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(
        ["Start Time (s) ", "End Time (s) ", "Scene Details - A Level ", "Name - All", "Location"]
    )
    # rows 479-961 (1-based, header is row 1) of 1,000 repeat; the same share of fewer rows
    first_repeat, last_repeat = round(0.478 * rows), round(0.961 * rows)
    unique = rows - 1 - (last_repeat - first_repeat)
    span = seconds / unique
    body = [
        [round(k * span, 2), round((k + 1) * span, 2), f"scene {k}: someone walks into room {k % 37}",
         ["Sherlock", "John", "Molly", None][k % 4], f"place {k % 11}"]
        for k in range(unique)
    ]  # fmt: skip
    order = [*range(first_repeat), *range(last_repeat - first_repeat), *range(first_repeat, unique)]
    for k in order:
        sheet.append(body[k])
    book.save(path)


def brain_mask() -> np.ndarray:
    ijk = np.indices(GRID, dtype=np.float32)
    centre = [(n - 1) / 2 for n in GRID]
    r2 = sum(((ijk[d] - centre[d]) / RADII[d]) ** 2 for d in range(3))
    return r2 <= 1.0


def make_subject(path: Path, n_volumes: int, seed: int, mask: np.ndarray) -> None:
    """A float32 NIfTI written header first, then one volume at a time into gzip (level 1)."""
    import nibabel as nib

    affine = np.array(
        [[-3.0, 0, 0, 90], [0, 3.0, 0, -126], [0, 0, 3.0, -72], [0, 0, 0, 1]], dtype=np.float64
    )
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((*GRID, n_volumes))
    header.set_zooms((3.0, 3.0, 3.0, TR))
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    header["vox_offset"] = 352
    rng = np.random.default_rng(seed)
    baseline = np.where(mask, rng.uniform(400, 900, GRID), 0).astype(np.float32)
    n_in = int(mask.sum())
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(header.binaryblock)
        handle.write(b"\0" * (352 - len(header.binaryblock)))  # no extensions
        volume = baseline.copy()
        for _ in range(n_volumes):
            volume[mask] = baseline[mask] + rng.standard_normal(n_in, dtype=np.float32) * 8.0
            handle.write(volume.tobytes(order="F"))  # NIfTI is x-fastest


def generate(folder: Path, minutes: float, subjects: int, runs: int = 1) -> dict[str, Any]:
    """The raw files (kept between calls: a file already there is not made again). ``runs`` > 1:
    the length cut into that many runs of whole TRs, listed in ``runs.yaml``."""
    folder.mkdir(parents=True, exist_ok=True)
    seconds = minutes * 60
    n_trs = int(seconds // TR)
    clock = time.perf_counter()
    mask = brain_mask()
    if runs == 1:
        movie = folder / "movie.m4v"
        if not movie.exists():
            make_movie(movie, seconds)
        make_annotations(folder / "annotations.xlsx", seconds)
        fmri = []
        for s in range(1, subjects + 1):
            path = folder / f"sub-{s}.nii.gz"
            if not path.exists():
                make_subject(path, n_trs + EXTRA_VOLUMES, seed=s, mask=mask)
            fmri.append(path)
        return {
            "movie": str(movie),
            "annotations": str(folder / "annotations.xlsx"),
            "fmri": [str(p) for p in fmri],
            "n_trs": n_trs,
            "mask_voxels": int(mask.sum()),
            "generate_s": round(time.perf_counter() - clock, 1),
            "input_gb": round(sum(Path(p).stat().st_size for p in [movie, *fmri]) / 1e9, 2),
        }
    if n_trs < 2 * runs:
        raise SystemExit(f"{minutes:g} minutes ({n_trs} TRs) is too short for {runs} runs")
    run_trs = [n_trs // runs] * (runs - 1) + [n_trs - (n_trs // runs) * (runs - 1)]
    entries, files = [], []
    for k, trs in enumerate(run_trs, start=1):
        movie = folder / f"movie_run-{k}.m4v"
        if not movie.exists():
            make_movie(movie, trs * TR)
        sheet = folder / f"annotations_run-{k}.xlsx"
        make_annotations(sheet, trs * TR, rows=max(20, round(1000 * trs / n_trs)))
        fmri = {}
        for s in range(1, subjects + 1):
            path = folder / f"sub-{s}_run-{k}.nii.gz"
            if not path.exists():  # run 1 of a subject: the one-run file's seed
                make_subject(path, trs + EXTRA_VOLUMES, seed=s + 1000 * (k - 1), mask=mask)
            fmri[f"sub-{s}"] = path.name
        files += [movie, *(folder / name for name in fmri.values())]
        entries.append(
            {"id": f"run-{k}", "video": movie.name, "annotations": sheet.name, "fmri": fmri}
        )
    runs_yaml = folder / "runs.yaml"
    runs_yaml.write_text(json.dumps({"runs": entries}, indent=1) + "\n")  # JSON is YAML
    return {
        "movie": str(folder / "movie_run-1.m4v"),
        "runs_yaml": str(runs_yaml),
        "n_trs": n_trs,
        "run_trs": run_trs,
        "mask_voxels": int(mask.sum()),
        "generate_s": round(time.perf_counter() - clock, 1),
        "input_gb": round(sum(p.stat().st_size for p in files) / 1e9, 2),
    }


_STUB_ENCODEC = (
    "import numpy as np\n"
    "from giblet_ds.store.builder import audio\n"
    "audio.encode_audio = lambda wave, model, **k: np.zeros((8, -(-len(wave) // 320)), np.int16)\n"
)

_ENCODEC_ONLY = """
import json, resource, sys, time
from giblet_ds.store.builder import audio
model, _ = audio.load_encodec(6.0, False)
wave = audio.decode_audio(sys.argv[1])[: int(float(sys.argv[2]) * 60 * audio.SAMPLE_RATE)]
audio.init_random_codebooks(model, wave)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
codes = audio.encode_audio(wave, model)
print(json.dumps({"encode_s": round(time.perf_counter() - start, 1), "audio_minutes": len(wave) / 1.44e6,
    "rss_before_mb": round(base), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    "codebooks": int(codes.shape[0])}))
"""


def run_encodec_fraction(movie: str, minutes: float) -> dict[str, Any]:
    """EnCodec (6 kbps, the default batch) on the movie's first ``minutes`` of audio, alone in a
    child process: the stage the full-size run stubs when ``--encodec-minutes`` is given."""
    proc = subprocess.run(
        [sys.executable, "-c", _ENCODEC_ONLY, movie, str(minutes)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"EnCodec measurement failed with exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


_BUILD_ONE_RUN = """
import json, sys
from giblet_ds.store.builder.pipeline import build_from_paths
from giblet_ds.store.builder.settings import BuildSettings
f = json.loads(sys.argv[1])
r = build_from_paths(f['movie'], f['annotations'], f['fmri'], sys.argv[2],
    BuildSettings(pretrained=False, clip_model=sys.argv[3]), progress=False)
print(json.dumps({'seconds': r.seconds, 'peak_rss_mb': r.peak_rss_mb,
    'n_trs': r.n_trs, 'movie_seconds': r.movie_seconds}))
"""

# tools/build_store.py itself (its flags, read_runs_yaml, BuildInputs); its build_store call
# is wrapped only to keep the BuildResult the tool prints a summary of.
_BUILD_RUNS = """
import importlib.util, json, sys
from giblet_ds.store.builder import pipeline
spec = importlib.util.spec_from_file_location("build_store_cli", "tools/build_store.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)
kept = []
cli.build_store = lambda *a, **k: kept.append(pipeline.build_store(*a, **k)) or kept[-1]
f = json.loads(sys.argv[1])
code = cli.main(["--runs", f["runs_yaml"], "--out", sys.argv[2], "--no-pretrained",
                 "--clip-model", sys.argv[3], "--quiet"])
if code != 0 or not kept:
    sys.exit(code or 1)
r = kept[0]
print(json.dumps({'seconds': r.seconds, 'peak_rss_mb': r.peak_rss_mb,
    'n_trs': r.n_trs, 'movie_seconds': r.movie_seconds}))
"""


def run_build(
    files: dict[str, Any], out: Path, stub_encodec: bool = False, clip_model: str = "ViT-H-14"
) -> dict[str, Any]:
    """The build in a child process, so its peak RSS is the build's alone. ``stub_encodec``
    replaces EnCodec's encoder by zero codes of the right shape (measured apart instead).
    ``files`` with ``runs_yaml``: built by ``tools/build_store.py --runs``."""
    out.unlink(missing_ok=True)
    repo = Path(__file__).resolve().parents[1]
    code = (_STUB_ENCODEC if stub_encodec else "") + (
        _BUILD_RUNS if "runs_yaml" in files else _BUILD_ONE_RUN
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(files), str(out), clip_model],
        cwd=repo, env=env, capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"build failed with exit {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    minutes = result["movie_seconds"] / 60
    return {
        **result,
        "build_s": round(wall, 1),
        "build_s_per_movie_minute": round(wall / minutes, 1),
        "peak_rss_gb": round(max(result["peak_rss_mb"].values()) / 1024, 2),
        "store_gb": round(out.stat().st_size / 1e9, 2),
        "log": [line for line in proc.stderr.splitlines() if "stage " in line or "TRs" in line],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("work_dir", type=Path)
    p.add_argument("--minutes", type=float, default=49.4)
    p.add_argument("--subjects", type=int, default=5)
    p.add_argument(
        "--runs", type=int, default=1, help="cut the movie length into this many runs (runs.yaml)"
    )
    p.add_argument("--generate-only", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the generated files and the store")
    p.add_argument("--clip-model", default="ViT-H-14", help="text tower (default: the real one)")
    p.add_argument(
        "--encodec-minutes",
        type=float,
        help="stub EnCodec in the full build and time it apart on this many minutes of the audio",
    )
    args = p.parse_args()
    if args.runs < 1:
        p.error(f"--runs must be >= 1, got {args.runs}")
    free = shutil.disk_usage(args.work_dir.parent if not args.work_dir.exists() else args.work_dir)
    files = generate(args.work_dir, args.minutes, args.subjects, args.runs)
    record: dict[str, Any] = {
        "bench": "store_sherlock",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "minutes": args.minutes,
        "subjects": args.subjects,
        "runs": args.runs,
        "disk_free_gb_before": round(free.free / 1e9, 1),
        **{k: v for k, v in files.items() if k not in ("fmri", "runs_yaml")},
    }
    if not args.generate_only:
        runs = f"_{args.runs}runs" if args.runs > 1 else ""
        out = args.work_dir / f"store_{args.subjects}subj_{args.minutes:g}min{runs}.h5"
        if args.encodec_minutes:
            record["encodec_fraction"] = run_encodec_fraction(files["movie"], args.encodec_minutes)
        record["clip_model"] = args.clip_model
        record.update(
            run_build(
                files, out, stub_encodec=bool(args.encodec_minutes), clip_model=args.clip_model
            )
        )
        record["stubbed_encodec"] = bool(args.encodec_minutes)
        if not args.keep:
            out.unlink(missing_ok=True)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
