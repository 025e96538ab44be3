"""The per-run steps of a build: headers, TR, annotation sheet, decoding, text rows.

``pipeline.build_store`` calls these once per run, in the store's run order; a fault names the
run it belongs to (a many-run build) so the user knows which files to look at.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from giblet_ds.errors import StoreError
from giblet_ds.store.builder import align, audio, confounds, fmri, text, video
from giblet_ds.store.builder.inputs import RunInputs
from giblet_ds.store.builder.settings import DEFAULT_TR, BuildSettings
from giblet_ds.store.builder.writer import StoreWriter
from giblet_ds.store.layout import StoreLayout

__all__ = [
    "probe_run",
    "in_order",
    "resolve_run_tr",
    "read_sheet",
    "report_rows",
    "decode_run",
    "text_rows",
]


def _log(message: str) -> None:
    print(f"[build_store] {message}", file=sys.stderr, flush=True)


def probe_run(run: RunInputs) -> list[fmri.FmriInfo]:
    """Headers of one run's NIfTI files (4-D, one grid within the run)."""
    try:
        return fmri.probe_fmri(run.fmri)
    except StoreError as err:
        if run.run_id == "run-1":
            raise
        raise StoreError(f"run {run.run_id}", str(err)) from None


def in_order(
    run: RunInputs, infos: Sequence[fmri.FmriInfo], subjects: Sequence[str]
) -> list[fmri.FmriInfo]:
    """``infos`` reordered to ``subjects`` (runs may list their subjects in any order)."""
    by_id = dict(zip(run.subject_ids, infos, strict=True))
    return [by_id[sid] for sid in subjects]


def resolve_run_tr(
    given: float | None, runs: Sequence[RunInputs], infos: Sequence[Sequence[fmri.FmriInfo]]
) -> tuple[float, str, list[str]]:
    """The TR of the build: ``(tr, source, notes)``, decided in this order:

    1. ``given`` (--tr, the YAML): used; sidecars and headers that differ are noted.
    2. the BIDS sidecars' ``RepetitionTime`` (``--bids``; source ``"bids_sidecar"``): used when
       every sidecar that states one agrees and every NIfTI header that states a TR agrees with
       it (within rounding); a header that differs stops the build naming the file.
    3. the NIfTI headers (``fmri.resolve_tr`` per run; source ``"default"``): runs whose headers
       (or resolved TRs) differ name each other.

    Sidecars that differ between files stop the build even with ``given``: they describe
    different acquisitions, and one store holds one TR. Runs whose headers agree within the run
    but not between runs stop it too (without ``given``): the header difference is the likelier
    truth."""
    sidecar = _sidecar_tr(runs, infos, check_headers=given is None)
    if sidecar is not None and given is None:
        return sidecar, "bids_sidecar", []
    stated = {
        run.run_id: sorted({round(i.header_tr, 3) for i in run_infos if i.header_tr is not None})
        for run, run_infos in zip(runs, infos, strict=True)
    }
    single = {run_id: trs[0] for run_id, trs in stated.items() if len(trs) == 1}
    if given is None and len(set(single.values())) > 1:
        raise StoreError(
            "--tr", f"runs have different TRs: {single}; one store holds one TR (build one per TR)"
        )
    resolved = []
    for run, run_infos in zip(runs, infos, strict=True):
        try:
            resolved.append(fmri.resolve_tr(given, run_infos, DEFAULT_TR))
        except StoreError as err:
            if len(runs) == 1:
                raise
            raise StoreError(f"run {run.run_id}", str(err)) from None
    trs = {run.run_id: tr for run, (tr, _, _) in zip(runs, resolved, strict=True)}
    if len({round(tr, 6) for tr in trs.values()}) > 1:
        raise StoreError(
            "--tr", f"runs have different TRs: {trs}; one store holds one TR (build one per TR)"
        )
    notes = [note for _, _, run_notes in resolved for note in run_notes]
    if sidecar is not None and given is not None and not fmri.same_tr(sidecar, given):
        notes.insert(0, f"the BIDS sidecars say RepetitionTime {sidecar:g} s; using the given "
                        f"tr {given:g} s")  # fmt: skip
    return resolved[0][0], resolved[0][1], notes


def _sidecar_tr(
    runs: Sequence[RunInputs], infos: Sequence[Sequence[fmri.FmriInfo]], *, check_headers: bool
) -> float | None:
    """The ``RepetitionTime`` every BIDS sidecar that states one agrees on (None: none does).

    StoreError naming the BOLD file whose sidecar differs from the first one's, or (with
    ``check_headers``) whose NIfTI header states another TR than the sidecars."""
    stated: list[tuple[RunInputs, fmri.FmriInfo, float]] = []
    for run, run_infos in zip(runs, infos, strict=True):
        by_path = dict(zip(run.fmri, run.sidecar_trs, strict=False))
        stated += [(run, i, tr) for i in run_infos if (tr := by_path.get(i.path)) is not None]
    if not stated:
        return None
    first_run, first_info, tr = stated[0]
    for run, info, value in stated[1:]:
        if not fmri.same_tr(value, tr):
            raise StoreError(
                info.path,
                f"run {run.run_id}: its BIDS sidecar says RepetitionTime {value:g} s, the "
                f"sidecar of {first_info.path.name} (run {first_run.run_id}) {tr:g} s; one "
                "store holds one TR: build the runs of each TR into a store of their own "
                "(--runs runs.yaml lists them), or correct the RepetitionTime of the sidecar "
                "that is wrong",
                dataset="--bids",
            )
    if check_headers:
        for run, run_infos in zip(runs, infos, strict=True):
            for info in run_infos:
                if info.header_tr is not None and not fmri.same_tr(info.header_tr, tr):
                    raise StoreError(
                        info.path,
                        f"run {run.run_id}: the NIfTI header says TR {info.header_tr:g} s, the "
                        f"BIDS sidecars RepetitionTime {tr:g} s. Correct the one that is wrong "
                        "(the sidecar's RepetitionTime, or the header's pixdim[4] and time "
                        f"unit), or decide with --tr: --tr {tr:g} if the sidecar is right",
                        dataset="--bids",
                    )
    return tr


def load_confounds_early(
    runs: Sequence[RunInputs],
    infos: Sequence[Sequence[fmri.FmriInfo]],
    subjects: Sequence[str],
    settings: BuildSettings,
) -> list[list[np.ndarray]]:
    """Per run and subject (in ``subjects`` order), the confounds of every volume; loaded before
    any decoding so a run without fMRIPrep confounds stops the build at once. Empty: none used."""
    if settings.confounds is None:
        return []
    out = []
    for run, run_infos in zip(runs, infos, strict=True):
        files = dict(zip(run.subject_ids, run.confounds, strict=False))
        missing = [sid for sid in subjects if files.get(sid) is None]
        if missing:
            raise StoreError(
                f"run {run.run_id}", f"confounds are set but {', '.join(missing)} have no "
                "fMRIPrep confounds file; use --bids DIR --derivatives fmriprep",
                dataset="confounds",
            )  # fmt: skip
        out.append(
            [
                confounds.load_run_confounds(i.path, settings.confounds, i.n_volumes)
                for i in run_infos
            ]
        )
    return out


def read_sheet(run: RunInputs, settings: BuildSettings) -> tuple[list[Any], dict[str, Any]]:
    """The run's annotations and their counts (no sheet: none, every text slot empty)."""
    if run.annotations is None:
        _log(f"run {run.run_id}: no annotation sheet; its text slots are empty")
        return [], {"rows": 0, "duplicates": 0, "dropped": 0, "dropped_rows": []}
    annotations, counts = text.read_annotations(
        run.annotations, settings.text_columns, max_dropped_fraction=settings.max_dropped_fraction
    )
    report_rows(run.annotations, counts)
    return annotations, counts


def report_rows(path: Path, counts: Mapping[str, Any]) -> None:
    """Name every annotation row the build leaves out (nothing is dropped silently), and a CSV
    read in another encoding than UTF-8."""
    name = path.name
    if counts.get("encoding_note"):
        _log(f"note: {counts['encoding_note']}")
    if counts["duplicates"]:
        _log(f"{name}: {counts['duplicates']} exact duplicate rows dropped")
    if counts["dropped"]:
        rows = "; ".join(f"row {row}: {why}" for row, why in counts["dropped_rows"][:50])
        more = f"; and {counts['dropped'] - 50} more" if counts["dropped"] > 50 else ""
        _log(f"WARNING: {name}: {counts['dropped']} of {counts['rows']} rows dropped "
             f"({rows}{more})")  # fmt: skip


def decode_run(
    run: RunInputs,
    probe: video.VideoInfo,
    volumes: Mapping[str, int],
    writer: StoreWriter,
    settings: BuildSettings,
    planned: Callable[[int, int], StoreLayout],
    progress: Callable[..., Any],
    *,
    keep_wave: bool,
) -> dict[str, Any]:
    """Decode one run's audio (for its length) and stream its video into ``writer`` after the
    rows already there, then crop it to the run's common length (every modality and the
    shortest subject). Returns ``counts``, ``cropped``, ``fps``, ``audio_report`` and, with
    ``keep_wave``, the decoded ``wave`` (a one-run build encodes it without decoding twice)."""
    tr = float(settings.tr or DEFAULT_TR)
    report: dict[str, int] = {}
    wave = audio.decode_audio(run.video, report=report)
    if report["bad_packets"]:
        _log(f"WARNING: run {run.run_id}: {report['bad_packets']} damaged audio packets "
             "replaced by silence")  # fmt: skip
    if report["format_changes"]:
        _log(f"note: the audio changed format {report['format_changes']} time(s) mid-file "
             "(channel layout or sample rate); followed")  # fmt: skip
    audio_trs = align.whole_trs(len(wave) / audio.SAMPLE_RATE, tr)
    offset = writer.video_rows
    estimate = int(probe.duration_s * probe.fps) if np.isfinite(probe.duration_s) else None
    # Before any frame of this run is written: the store so far plus this run (no fMRI yet).
    video_guess = align.whole_trs(probe.duration_s, tr) if estimate else audio_trs
    guess = min(video_guess, audio_trs, min(volumes.values()) - settings.lag)
    writer.check_space(planned(offset + max(guess, 0), 0), lower_bound=True)
    with progress(f"decode video {run.run_id}", estimate, "frame") as update:
        video_trs, fps = video.stream_video(
            run.video,
            lambda start, frames: writer.write_video(offset + start, frames),
            tr=tr,
            frame_skip=settings.frame_skip,
            n_frames=writer.frame_shape[0],
            height=settings.frame_height,
            width=settings.frame_width,
            progress=update,
        )
    try:
        counts = align.common_trs(
            video=video_trs,
            audio=audio_trs,
            fmri_volumes=min(volumes.values()),
            lag=settings.lag,
        )
    except StoreError as err:
        raise StoreError(f"run {run.run_id}", str(err)) from None
    writer.crop_video(offset + counts["n_trs"])
    cropped, crop_lines = align.crop_report(counts, volumes, lag=settings.lag, tr=tr)
    for line in crop_lines:
        _log(line if run.run_id == "run-1" else f"run {run.run_id}: {line}")
    out = {"counts": counts, "cropped": cropped, "fps": fps, "audio_report": report}
    if keep_wave:
        out["wave"] = wave
    return out


def text_rows(
    annotations: Sequence[Any],
    embeddings: np.ndarray,
    counts: dict[str, Any],
    tr: float,
    n_trs: int,
    settings: BuildSettings,
) -> tuple[np.ndarray, np.ndarray]:
    """One run's text slots per TR; what the slots leave out is counted and noted."""
    slot_report: dict[str, int] = {}
    text_array, text_mask = text.annotations_per_tr(
        annotations, embeddings, tr=tr, n_trs=n_trs, slots=settings.annotations_per_tr,
        report=slot_report,
    )  # fmt: skip
    counts.update(slot_report)
    if slot_report["never_in_a_slot"]:
        _log(f"note: {slot_report['never_in_a_slot']} annotations are in no TR's "
             f"{settings.annotations_per_tr} text slots ({slot_report['trs_over_slots']} TRs "
             "overlap more annotations than slots; earliest first are kept; raise "
             "--annotations-per-tr to keep them)")  # fmt: skip
    counts["after_movie_end"] = sum(a.start >= n_trs * tr for a in annotations)
    if counts["after_movie_end"]:
        _log(f"note: {counts['after_movie_end']} annotations start after the last "
             f"TR ({n_trs * tr:.1f} s) and are not used")  # fmt: skip
    return text_array, text_mask
