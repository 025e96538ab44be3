"""``build_store``: raw movie, annotations and fMRI -> one validated HDF5 store.

Stages (each with a progress bar): hash inputs (a matching existing store makes the build a no-op),
decode video, encode audio, embed text, mask and z-score fMRI, write statistics, validate the
written file with ``open_store`` and only then rename it into place.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from giblet_ds.errors import ConfigError, StoreError
from giblet_ds.store import schema
from giblet_ds.store.builder import audio, fmri, text, video
from giblet_ds.store.builder import run_stages as stages
from giblet_ds.store.builder.confounds import check_fit_rows, regress_out
from giblet_ds.store.builder.hashing import build_sha256, file_sha256, settings_sha256
from giblet_ds.store.builder.inputs import BuildInputs, RunInputs, check_runs
from giblet_ds.store.builder.normalize import zscore_train
from giblet_ds.store.builder.run_stages import report_rows as _report_rows  # noqa: F401
from giblet_ds.store.builder.settings import BuildSettings
from giblet_ds.store.builder.splits import make_run_splits
from giblet_ds.store.builder.weights import ENCODEC_CHECKPOINT
from giblet_ds.store.builder.writer import StoreWriter, remove_stale_temps
from giblet_ds.store.layout import StoreLayout
from giblet_ds.store.reader import open_store
from giblet_ds.store.runs import RunTable

__all__ = ["BuildInputs", "BuildResult", "RunInputs", "build_store", "hash_inputs"]

RANDOM_WEIGHTS_WARNING = (
    "built with --no-pretrained: EnCodec and CLIP weights are RANDOM (fixed seed); audio codes and "
    "text embeddings carry no learned meaning. Use only for demos and tests."
)


@dataclass
class BuildResult:
    """What a build did: the store path, whether it was rebuilt, and seconds per stage."""

    path: Path
    rebuilt: bool
    n_trs: int
    build_hash: str
    seconds: dict[str, float] = field(default_factory=dict)
    movie_seconds: float = 0.0
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    """The process's peak resident memory so far (ru_maxrss) at the end of each stage."""


def _log(message: str) -> None:
    print(f"[build_store] {message}", file=sys.stderr, flush=True)


@contextmanager
def _bar(
    desc: str, total: float | None, unit: str, enabled: bool
) -> Iterator[Callable[[int], Any]]:
    bar = tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        file=sys.stderr,
        unit_scale=unit == "B",
        dynamic_ncols=True,
    )
    try:
        yield bar.update
    finally:
        bar.close()


def hash_inputs(
    inputs: BuildInputs, progress: bool = False, *, confounds: bool = False
) -> dict[str, Any]:
    """SHA-256, name and size of every input file (the basis of the no-op rebuild check).

    A one-run build names its files as before runs existed (``video``, ``fmri:ID``), so its
    hash is unchanged; a many-run build prefixes each run's files with the run id."""
    files: list[tuple[str, Path]] = []
    for run in inputs.run_list():
        prefix = "" if inputs.single else f"{run.run_id}:"
        files.append((f"{prefix}video", run.video))
        if run.annotations is not None:
            files.append((f"{prefix}annotations", run.annotations))
        files += [
            (f"{prefix}fmri:{sid}", p) for sid, p in zip(run.subject_ids, run.fmri, strict=True)
        ]
        if confounds:  # only when they are used: unused files do not change the store
            files += [
                (f"{prefix}confounds:{sid}", p)
                for sid, p in zip(run.subject_ids, run.confounds, strict=False)
                if p is not None
            ]
    if inputs.mask is not None:
        files.append(("mask", inputs.mask))
    # Weight files are inputs too: another file gives other features, so another build hash.
    if inputs.encodec_weights is not None:
        path = inputs.encodec_weights
        if path.is_dir():
            path = path / ENCODEC_CHECKPOINT
        files.append(("encodec-weights", path))
    if inputs.clip_weights is not None:
        files.append(("clip-weights", inputs.clip_weights))
    for role, path in files:
        if not path.is_file():
            parts = role.split(":")
            kind = parts[0] if inputs.single or len(parts) == 1 else parts[1]
            where = "" if inputs.single or len(parts) == 1 else f" (run {parts[0]})"
            raise StoreError(path, f"input file not found{where}", dataset=f"--{kind}")
    total = sum(p.stat().st_size for _, p in files)
    out: dict[str, Any] = {}
    with _bar("hash inputs", total, "B", progress) as update:
        for role, path in files:
            out[role] = {
                "name": path.name,
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
            }
            update(path.stat().st_size)
    return out


def build_store(
    inputs: BuildInputs,
    out: str | Path,
    settings: BuildSettings | None = None,
    *,
    progress: bool = True,
    encodec_weights: str | Path | None = None,
) -> BuildResult:
    """Build (or confirm up to date) the store ``out`` from ``inputs`` with ``settings``.

    Runs are concatenated in order (one run: the store of before runs existed, with a one-row
    ``/runs`` table). ``encodec_weights`` is the older spelling of ``inputs.encodec_weights``.
    Memory stays near one subject's masked series of one run plus the subject sum (2 x T x V
    float32) whatever the number of subjects: video is written to the file as it is decoded,
    fMRI is read a block of volumes at a time, and each model is released once its stage is done.
    """
    settings = settings or BuildSettings()
    if encodec_weights is not None and inputs.encodec_weights is None:
        inputs = dataclasses.replace(inputs, encodec_weights=Path(encodec_weights))
    out = Path(out)
    seconds: dict[str, float] = {}
    peaks: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 3)
        peaks[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        clock = now
        _log(
            f"stage {name}: {seconds[name]:.1f} s (peak memory so far {peaks[name] / 1024:.2f} GB)"
        )

    if (inputs.mask is not None) != (settings.mask_rule == "file"):
        raise StoreError(
            "--mask",
            "a mask file goes with mask_rule 'file' and only with it",
            expected="--mask PATH with --mask-rule file, or neither",
            actual=f"mask {inputs.mask}, mask_rule {settings.mask_rule!r}",
        )
    offline = [f for f in (inputs.encodec_weights, inputs.clip_weights) if f is not None]
    if offline and not settings.pretrained:
        raise StoreError(
            "--no-pretrained",
            "weight files and --no-pretrained exclude each other",
            expected="--encodec-weights/--clip-weights, or --no-pretrained",
            actual=[str(f) for f in offline],
        )
    runs = inputs.run_list()
    if settings.split_by == "run" and len(runs) < 2:
        raise StoreError("split_by", "split_by: run needs at least 2 runs", actual=len(runs))
    # Headers first (cheap): subjects, grid and TR of every run decide whether the build may go
    # on, and the resolved TR is what the settings hash records.
    run_infos = [stages.probe_run(run) for run in runs]
    subjects = check_runs(runs, run_infos)
    run_infos = [
        stages.in_order(run, infos, subjects) for run, infos in zip(runs, run_infos, strict=True)
    ]
    tr, tr_source, tr_notes = stages.resolve_run_tr(settings.tr, runs, run_infos)
    settings = dataclasses.replace(settings, tr=tr)
    for note in tr_notes:
        _log(f"note: {note}")
    volumes = [
        {sid: info.n_volumes for sid, info in zip(subjects, infos, strict=True)}
        for infos in run_infos
    ]
    nuisance = stages.load_confounds_early(runs, run_infos, subjects, settings)
    input_hashes = hash_inputs(inputs, progress, confounds=settings.confounds is not None)
    settings_hash = settings_sha256(settings.hashed())
    # A one-run build hashes with schema 1: the store it writes holds what a schema 1 store
    # held (plus the one-row /runs table a schema 1 file is read with), so it is not rebuilt.
    hash_schema = 1 if inputs.single else schema.SCHEMA_VERSION
    build_hash = build_sha256(settings_hash, input_hashes, hash_schema)
    lap("hash")
    if out.exists():
        try:
            existing = open_store(out)
        except StoreError as err:
            _log(f"existing {out} is not a valid store ({err}); rebuilding")
        else:
            if existing.build_hash == build_hash:
                _log(f"{out} is up to date (build hash {build_hash[:12]}); nothing to do")
                return BuildResult(out, False, existing.n_trs, build_hash, seconds)
            _log(f"{out} was built from other inputs or settings; rebuilding")
    for stale in remove_stale_temps(out):
        _log(f"removed stale temporary file {stale}")
    if not settings.pretrained:
        _log("WARNING: " + RANDOM_WEIGHTS_WARNING)

    # -- models first: a missing pretrained checkpoint fails before minutes of decoding ----------
    model, encodec_file = audio.load_encodec(
        settings.encodec_bandwidth, settings.pretrained, inputs.encodec_weights
    )
    encode_text, _, clip_tag, clip_file = text.load_text_encoder(
        settings.clip_model,
        settings.pretrained,
        settings.clip_pretrained_tag,
        settings.device,
        weights=inputs.clip_weights,
    )
    weight_files = {"encodec": encodec_file, "clip": clip_file}
    for role, record in weight_files.items():
        if record is not None:
            _log(f"{role} weights from {record['name']} (sha256 {record['sha256'][:12]}, "
                 f"checksum {record['checksum']})")  # fmt: skip
    lap("load_models")

    # -- cheap checks of every input before the long stages ---------------------------------------
    probes = [video.probe_video(run.video) for run in runs]
    n_frames = settings.frames_per_tr or video.frames_per_tr(tr, probes[0].fps, settings.frame_skip)
    sheets = [stages.read_sheet(run, settings) for run in runs]

    # Text first: the CLIP tower (1.4 GB for ViT-H-14) is released before audio and fMRI work.
    texts = [a.text for annotations, _ in sheets for a in annotations]
    with _bar("embed text", len(set(texts)), "text", progress) as update:
        if texts:
            embeddings = text.embed_texts(texts, encode_text, progress=update)
        else:  # no run has annotations: every text slot is empty, D from the tower
            embeddings = np.zeros((0, encode_text([""]).shape[1]), dtype=np.float32)
    del encode_text
    lap("text")

    def planned(n_trs: int, n_voxels: int) -> StoreLayout:
        """The store's layout before the codes exist: n_q from the bandwidth (75 frames/s of
        10-bit codes per codebook), C = floor(tr * 75); enough for a free-space check."""
        return StoreLayout(
            n_trs=n_trs, n_frames=n_frames, height=settings.frame_height,
            width=settings.frame_width, n_q=max(1, round(settings.encodec_bandwidth / 0.75)),
            code_frames=int(tr * 75), text_slots=settings.annotations_per_tr,
            text_dim=int(embeddings.shape[1]), subjects=subjects, n_voxels=n_voxels,
            mask_shape=run_infos[0][0].shape, n_runs=len(runs),
        )  # fmt: skip

    # Video streams into the file as it decodes (a whole Sherlock movie is 0.85 GB of frames),
    # run after run; each run is cropped to its common length before the next one starts.
    frame_shape = (n_frames, settings.frame_height, settings.frame_width)

    def bar(desc: str, total: float | None, unit: str) -> Any:
        return _bar(desc, total, unit, progress)

    with StoreWriter(out, frame_shape=frame_shape) as writer:
        decoded = []
        for index, run in enumerate(runs):
            decoded.append(
                stages.decode_run(
                    run, probes[index], volumes[index], writer, settings, planned, bar,
                    keep_wave=len(runs) == 1,
                )
            )  # fmt: skip
        lap("video")
        lengths = [(run.run_id, d["counts"]["n_trs"]) for run, d in zip(runs, decoded, strict=True)]
        try:
            splits, zscore_rows, assignment = make_run_splits(
                lengths, settings.split_fractions, settings.gap, split_by=settings.split_by,
                split_runs=settings.split_runs, seed=settings.split_seed,
            )  # fmt: skip
        except ConfigError as err:
            raise StoreError("split", str(err)) from None
        table = RunTable(
            ids=tuple(run.run_id for run in runs),
            stimuli=tuple(run.stimulus_name for run in runs),
            first=np.concatenate([[0], np.cumsum([n for _, n in lengths])[:-1]]).astype(np.int64),
            n_trs=np.array([n for _, n in lengths], dtype=np.int64),
            subjects=np.ones((len(runs), len(subjects)), dtype=bool),
        )
        n_trs = int(table.n_trs.sum())
        lag = settings.lag
        for index, per_subject in enumerate(nuisance):  # before the long stages, not after
            check_fit_rows(per_subject[0].shape[1], len(zscore_rows[index]),
                           f"run {runs[index].run_id}")  # fmt: skip
        # Volumes each run's statistics (and the mask's variance test) use: a leading stretch.
        z_stop = [lag + int(rows[-1]) + 1 for rows in zscore_rows]

        # -- fMRI mask on the z-scoring volumes of every run (every subject before any subject
        # is written); before the audio encoding, so a store that cannot fit stops early.
        with _bar("fmri mask", len(runs) * len(subjects), "scan", progress) as update:
            mask = np.ones(run_infos[0][0].shape, dtype=bool)
            for index, infos in enumerate(run_infos):
                mask &= fmri.compute_mask(
                    infos, start=lag, stop=lag + int(table.n_trs[index]), train_stop=z_stop[index],
                    rule=settings.mask_rule, mask_file=inputs.mask, progress=update,
                )  # fmt: skip
            if not mask.any():
                raise StoreError(runs[0].fmri[0], "the mask is empty: no voxel is valid in "
                                 "every subject and run", dataset="--fmri")  # fmt: skip
        writer.check_space(planned(n_trs, int(mask.sum())))
        lap("fmri_mask")

        annotation_counts: list[dict[str, Any]] = []
        audio_reports: list[dict[str, int]] = []
        first_text = 0
        for index, run in enumerate(runs):
            wave = decoded[index].pop("wave", None)
            report: dict[str, int] = {}
            if wave is None:
                wave = audio.decode_audio(run.video, report=report)
            else:
                report = decoded[index]["audio_report"]
            audio_reports.append(report)
            if index == 0 and not settings.pretrained:
                audio.init_random_codebooks(model, wave)  # one codebook for every run
            n_segments = int(np.ceil(len(wave) / (settings.audio_segment_s * audio.SAMPLE_RATE)))
            with _bar(f"encode audio {run.run_id}", n_segments, "segment", progress) as update:
                codes = audio.encode_audio(
                    wave, model, segment_s=settings.audio_segment_s, device=settings.device,
                    progress=update,
                )  # fmt: skip
            # n_q comes from the codes' shape, never from a bandwidth table (REFERENCE.md).
            n_run = int(table.n_trs[index])
            codes_tr = audio.codes_per_tr(codes, tr, n_run)
            del wave, codes
            annotations, counts = sheets[index]
            run_embeddings = embeddings[first_text : first_text + len(annotations)]
            first_text += len(annotations)
            text_array, text_mask = stages.text_rows(
                annotations, run_embeddings, counts, tr, n_run, settings
            )
            annotation_counts.append(counts)
            if index == 0:
                layout = StoreLayout(
                    n_trs=n_trs,
                    n_frames=n_frames,
                    height=settings.frame_height,
                    width=settings.frame_width,
                    n_q=int(codes_tr.shape[1]),
                    code_frames=int(codes_tr.shape[2]),
                    text_slots=settings.annotations_per_tr,
                    text_dim=int(text_array.shape[2]),
                    subjects=subjects,
                    n_voxels=int(mask.sum()),
                    mask_shape=run_infos[0][0].shape,
                    n_runs=len(runs),
                )
                writer.define(
                    layout, mask=mask, affine=run_infos[0][0].affine, splits=splits, runs=table
                )
            first_row = int(table.first[index])
            writer.write_audio_codes(codes_tr, start=first_row)
            writer.write_text(text_array, text_mask, start=first_row)
        del model
        lap("audio")

        with _bar("fmri z-score", len(subjects) * len(runs), "scan", progress) as update:
            for s_index in range(len(subjects)):
                for index, infos in enumerate(run_infos):
                    n_run = int(table.n_trs[index])
                    series = fmri.masked_series(infos[s_index], mask, start=lag, stop=lag + n_run)
                    if nuisance:  # before z-scoring, fitted on the z-scoring rows
                        rows = nuisance[index][s_index][lag : lag + n_run]
                        where = f"run {runs[index].run_id}, {subjects[s_index]}"
                        regress_out(series, rows, zscore_rows[index], where)
                    zscored, mean, std = zscore_train(series, zscore_rows[index], inplace=True)
                    writer.write_subject(s_index, zscored, mean, std, run=index)
                    del series, zscored
                    update(1)
        lap("fmri")

        pretrained_note = "pretrained" if settings.pretrained else (
            "random weights; codebooks by k-means on the first 30 s of this movie"
        )  # fmt: skip

        def per_run(values: list[Any]) -> Any:
            """A one-run store records the value itself (as before runs), many runs by run id."""
            return values[0] if len(runs) == 1 else {
                run.run_id: value for run, value in zip(runs, values, strict=True)
            }  # fmt: skip

        attrs: dict[str, Any] = {
            "tr": float(tr),
            "tr_source": tr_source,
            "fps": float(decoded[0]["fps"]),
            "frame_skip": int(settings.frame_skip),
            "frames_per_tr": int(n_frames),
            "lag": int(lag),
            "split_gap": int(settings.gap),
            "split_fractions": list(settings.split_fractions),
            "split_by": settings.split_by,
            "split_runs": assignment,
            "encodec_model": audio.ENCODEC_MODEL,
            "encodec_bandwidth": float(settings.encodec_bandwidth),
            "encodec_pretrained": bool(settings.pretrained),
            "encodec_codebooks": pretrained_note,
            "clip_model": settings.clip_model,
            "clip_pretrained": bool(settings.pretrained),
            "clip_pretrained_tag": clip_tag or "",
            "weight_files": {k: v for k, v in weight_files.items() if v is not None},
            "text_normalized": True,
            "text_columns": list(settings.text_columns),
            "annotation_counts": per_run(annotation_counts),
            "trs_available": per_run([d["counts"] for d in decoded]),
            "cropped": per_run([d["cropped"] for d in decoded]),
            "fps_per_run": per_run([float(d["fps"]) for d in decoded]),
            "audio_bad_packets": sum(r["bad_packets"] for r in audio_reports),
            "audio_format_changes": sum(r["format_changes"] for r in audio_reports),
            "fmri_volumes": [lag, lag + int(table.n_trs[0])] if len(runs) == 1 else {
                run.run_id: [lag, lag + int(n)] for run, n in zip(runs, table.n_trs, strict=True)
            },
            "fmri_volume_counts": per_run(volumes),
            "fmri_header_trs": per_run([
                {sid: info.header_tr for sid, info in zip(subjects, infos, strict=True)}
                for infos in run_infos
            ]),
            "fmri_zscore_volumes": per_run([[lag, stop] for stop in z_stop]),
            "mask_rule": settings.mask_rule,
            "mask_volumes": per_run([[lag, stop] for stop in z_stop])
            if settings.mask_rule == "intersection" else [],
            "input_hashes": input_hashes,
            "settings": settings.hashed(),
            "settings_hash": settings_hash,
            "build_hash": build_hash,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "warning": "" if settings.pretrained else RANDOM_WEIGHTS_WARNING,
        }  # fmt: skip
        if any(run.sidecar_trs for run in runs):  # --bids: what each file's sidecar stated
            attrs["bids_sidecar_trs"] = per_run([
                {sid: dict(zip(run.subject_ids, run.sidecar_trs, strict=False)).get(sid)
                 for sid in subjects}
                for run in runs
            ])  # fmt: skip
        # The gate every reader uses must accept what we wrote, before it replaces anything.
        writer.finish(attrs, validate=open_store)
    lap("stats_and_write")
    _log(f"wrote {out}: {n_trs} TRs in {len(runs)} run(s), {layout.n_voxels} voxels, "
         f"{len(layout.subjects)} subjects")  # fmt: skip
    return BuildResult(
        out, True, n_trs, build_hash, seconds, movie_seconds=n_trs * tr, peak_rss_mb=peaks
    )


def build_from_paths(
    video_path: str | Path,
    annotations_path: str | Path,
    fmri_paths: Sequence[str | Path],
    out: str | Path,
    settings: BuildSettings | None = None,
    *,
    mask: str | Path | None = None,
    progress: bool = True,
    encodec_weights: str | Path | None = None,
    clip_weights: str | Path | None = None,
) -> BuildResult:
    """``build_store`` with plain paths (what the command-line tool calls)."""
    inputs = BuildInputs(
        video=Path(video_path),
        annotations=Path(annotations_path),
        fmri=tuple(Path(p) for p in fmri_paths),
        mask=Path(mask) if mask is not None else None,
        encodec_weights=Path(encodec_weights) if encodec_weights is not None else None,
        clip_weights=Path(clip_weights) if clip_weights is not None else None,
    )
    return build_store(inputs, out, settings, progress=progress)
