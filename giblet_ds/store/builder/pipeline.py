"""``build_store``: raw movie, annotations and fMRI -> one validated HDF5 store.

Stages (each with a progress bar): hash inputs (a matching existing store makes the build a no-op),
decode video, encode audio, embed text, mask and z-score fMRI, write statistics, rename into place.
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

from giblet_ds.errors import StoreError
from giblet_ds.store import schema
from giblet_ds.store.builder import align, audio, fmri, text, video
from giblet_ds.store.builder.hashing import build_sha256, file_sha256, settings_sha256
from giblet_ds.store.builder.normalize import zscore_train
from giblet_ds.store.builder.settings import DEFAULT_TR, BuildSettings
from giblet_ds.store.builder.splits import make_splits
from giblet_ds.store.builder.weights import ENCODEC_CHECKPOINT
from giblet_ds.store.builder.writer import StoreWriter, remove_stale_temps
from giblet_ds.store.layout import StoreLayout
from giblet_ds.store.reader import open_store

__all__ = ["BuildInputs", "BuildResult", "build_store", "hash_inputs"]

RANDOM_WEIGHTS_WARNING = (
    "built with --no-pretrained: EnCodec and CLIP weights are RANDOM (fixed seed); audio codes and "
    "text embeddings carry no learned meaning. Use only for demos and tests."
)


@dataclass(frozen=True)
class BuildInputs:
    """The raw files of one build."""

    video: Path
    annotations: Path
    fmri: tuple[Path, ...]
    mask: Path | None = None
    encodec_weights: Path | None = None
    """A weight file (or a folder holding the package's checkpoint): pretrained EnCodec offline."""
    clip_weights: Path | None = None
    """A weight file for the CLIP text tower (a whole CLIP or its text tower's state dict)."""

    def __post_init__(self) -> None:
        if not self.fmri:
            raise StoreError("--fmri", "at least one fMRI file is needed")
        ids = [fmri.subject_id(p) for p in self.fmri]
        if len(set(ids)) != len(ids):
            raise StoreError("--fmri", "subject ids (file names) must be unique", actual=ids)


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


def hash_inputs(inputs: BuildInputs, progress: bool = False) -> dict[str, Any]:
    """SHA-256, name and size of every input file (the basis of the no-op rebuild check)."""
    files: list[tuple[str, Path]] = [("video", inputs.video), ("annotations", inputs.annotations)]
    files += [(f"fmri:{fmri.subject_id(p)}", p) for p in inputs.fmri]
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
            raise StoreError(path, "input file not found", dataset=f"--{role.split(':')[0]}")
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

    ``encodec_weights`` is the older spelling of ``inputs.encodec_weights``. Memory stays near
    one subject's masked series plus the subject sum (2 x T x V float32) whatever the number of
    subjects: video is written to the file as it is decoded, fMRI is read a block of volumes at
    a time, and each model is released once its stage is done.
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
    # Headers first (cheap): the TR they state decides whether the build may go on, and the
    # resolved TR is what the settings hash records.
    fmri_infos = fmri.probe_fmri(inputs.fmri)
    tr, tr_source, tr_notes = fmri.resolve_tr(settings.tr, fmri_infos, DEFAULT_TR)
    settings = dataclasses.replace(settings, tr=tr)
    for note in tr_notes:
        _log(f"note: {note}")
    subjects = tuple(fmri.subject_id(info.path) for info in fmri_infos)
    volumes = {sid: info.n_volumes for sid, info in zip(subjects, fmri_infos, strict=True)}
    input_hashes = hash_inputs(inputs, progress)
    settings_hash = settings_sha256(settings.hashed())
    build_hash = build_sha256(settings_hash, input_hashes, schema.SCHEMA_VERSION)
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
    probe = video.probe_video(inputs.video)
    n_frames = settings.frames_per_tr or video.frames_per_tr(tr, probe.fps, settings.frame_skip)
    annotations, annotation_counts = text.read_annotations(
        inputs.annotations,
        settings.text_columns,
        max_dropped_fraction=settings.max_dropped_fraction,
    )
    _report_rows(inputs.annotations, annotation_counts)

    # Text first: the CLIP tower (1.4 GB for ViT-H-14) is released before audio and fMRI work.
    texts = [a.text for a in annotations]
    with _bar("embed text", len(set(texts)), "text", progress) as update:
        embeddings = text.embed_texts(texts, encode_text, progress=update)
    del encode_text
    lap("text")

    audio_report: dict[str, int] = {}
    wave = audio.decode_audio(inputs.video, report=audio_report)
    if audio_report["bad_packets"]:
        _log(f"WARNING: {audio_report['bad_packets']} damaged audio packets replaced by silence")
    if audio_report["format_changes"]:
        _log(f"note: the audio changed format {audio_report['format_changes']} time(s) mid-file "
             "(channel layout or sample rate); followed")  # fmt: skip
    lap("audio_decode")
    audio_trs = align.whole_trs(len(wave) / audio.SAMPLE_RATE, tr)

    def planned(n_trs: int, n_voxels: int) -> StoreLayout:
        """The store's layout before the codes exist: n_q from the bandwidth (75 frames/s of
        10-bit codes per codebook), C = floor(tr * 75); enough for a free-space check."""
        return StoreLayout(
            n_trs=n_trs, n_frames=n_frames, height=settings.frame_height,
            width=settings.frame_width, n_q=max(1, round(settings.encodec_bandwidth / 0.75)),
            code_frames=int(tr * 75), text_slots=settings.annotations_per_tr,
            text_dim=int(embeddings.shape[1]), subjects=subjects, n_voxels=n_voxels,
            mask_shape=fmri_infos[0].shape,
        )  # fmt: skip

    # Video streams into the file as it decodes (a whole Sherlock movie is 0.85 GB of frames).
    frame_shape = (n_frames, settings.frame_height, settings.frame_width)
    with StoreWriter(out, frame_shape=frame_shape) as writer:
        estimate = int(probe.duration_s * probe.fps) if np.isfinite(probe.duration_s) else None
        # Before any frame is written: the store without its fMRI (the mask is not known yet).
        video_guess = align.whole_trs(probe.duration_s, tr) if estimate else audio_trs
        guess = min(video_guess, audio_trs, min(volumes.values()) - settings.lag)
        writer.check_space(planned(max(guess, 0), 0), lower_bound=True)
        with _bar("decode video", estimate, "frame", progress) as update:
            video_trs, fps = video.stream_video(
                inputs.video,
                writer.write_video,
                tr=tr,
                frame_skip=settings.frame_skip,
                n_frames=n_frames,
                height=settings.frame_height,
                width=settings.frame_width,
                progress=update,
            )
        lap("video")
        counts = align.common_trs(
            video=video_trs,
            audio=audio_trs,
            fmri_volumes=min(volumes.values()),
            lag=settings.lag,
        )
        n_trs = counts["n_trs"]
        cropped, crop_lines = align.crop_report(counts, volumes, lag=settings.lag, tr=tr)
        for line in crop_lines:
            _log(line)
        splits = make_splits(n_trs, settings.split_fractions, settings.gap)
        first, stop = settings.lag, settings.lag + n_trs  # fMRI volumes paired with stimulus TRs
        train_stop = first + int(splits["train"][-1]) + 1

        # -- fMRI mask on the training volumes (every subject before any subject is written);
        # before the audio encoding, so a store that cannot fit stops before the longest stage.
        with _bar("fmri mask", len(fmri_infos), "subject", progress) as update:
            mask = fmri.compute_mask(
                fmri_infos, start=first, stop=stop, train_stop=train_stop,
                rule=settings.mask_rule, mask_file=inputs.mask, progress=update,
            )  # fmt: skip
        writer.check_space(planned(n_trs, int(mask.sum())))
        lap("fmri_mask")

        if not settings.pretrained:
            audio.init_random_codebooks(model, wave)
        n_segments = int(np.ceil(len(wave) / (settings.audio_segment_s * audio.SAMPLE_RATE)))
        with _bar("encode audio", n_segments, "segment", progress) as update:
            codes = audio.encode_audio(
                wave, model, segment_s=settings.audio_segment_s, device=settings.device,
                progress=update,
            )  # fmt: skip
        # n_q comes from the codes' shape, never from a bandwidth table (REFERENCE.md).
        codes_tr = audio.codes_per_tr(codes, tr, n_trs)
        del model, wave, codes
        lap("audio")

        slot_report: dict[str, int] = {}
        text_array, text_mask = text.annotations_per_tr(
            annotations, embeddings, tr=tr, n_trs=n_trs, slots=settings.annotations_per_tr,
            report=slot_report,
        )  # fmt: skip
        annotation_counts.update(slot_report)
        if slot_report["never_in_a_slot"]:
            _log(f"note: {slot_report['never_in_a_slot']} annotations are in no TR's "
                 f"{settings.annotations_per_tr} text slots ({slot_report['trs_over_slots']} TRs "
                 "overlap more annotations than slots; earliest first are kept; raise "
                 "--annotations-per-tr to keep them)")  # fmt: skip
        annotation_counts["after_movie_end"] = sum(a.start >= n_trs * tr for a in annotations)
        if annotation_counts["after_movie_end"]:
            _log(f"note: {annotation_counts['after_movie_end']} annotations start after the last "
                 f"TR ({n_trs * tr:.1f} s) and are not used")  # fmt: skip

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
            mask_shape=fmri_infos[0].shape,
        )
        writer.define(layout, mask=mask, affine=fmri_infos[0].affine, splits=splits)
        writer.write_audio_codes(codes_tr)
        writer.write_text(text_array, text_mask)

        with _bar("fmri z-score", len(fmri_infos), "subject", progress) as update:
            for index, info in enumerate(fmri_infos):
                series = fmri.masked_series(info, mask, start=first, stop=stop)
                zscored, mean, std = zscore_train(series, splits["train"], inplace=True)
                writer.write_subject(index, zscored, mean, std)
                del series, zscored
                update(1)
        lap("fmri")

        pretrained_note = "pretrained" if settings.pretrained else (
            "random weights; codebooks by k-means on the first 30 s of this movie"
        )  # fmt: skip
        attrs: dict[str, Any] = {
            "tr": float(tr),
            "tr_source": tr_source,
            "fps": float(fps),
            "frame_skip": int(settings.frame_skip),
            "frames_per_tr": int(n_frames),
            "lag": int(settings.lag),
            "split_gap": int(settings.gap),
            "split_fractions": list(settings.split_fractions),
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
            "annotation_counts": annotation_counts,
            "trs_available": counts,
            "cropped": cropped,
            "audio_bad_packets": audio_report["bad_packets"],
            "audio_format_changes": audio_report["format_changes"],
            "fmri_volumes": [first, stop],
            "fmri_volume_counts": volumes,
            "fmri_header_trs": {
                sid: info.header_tr for sid, info in zip(subjects, fmri_infos, strict=True)
            },
            "mask_rule": settings.mask_rule,
            "mask_volumes": [first, train_stop] if settings.mask_rule == "intersection" else [],
            "input_hashes": input_hashes,
            "settings": settings.hashed(),
            "settings_hash": settings_hash,
            "build_hash": build_hash,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "warning": "" if settings.pretrained else RANDOM_WEIGHTS_WARNING,
        }
        writer.finish(attrs)
    lap("stats_and_write")
    open_store(out)  # the gate every reader uses must accept what we wrote
    _log(f"wrote {out}: {n_trs} TRs, {layout.n_voxels} voxels, {len(layout.subjects)} subjects")
    return BuildResult(
        out, True, n_trs, build_hash, seconds, movie_seconds=n_trs * tr, peak_rss_mb=peaks
    )


def _report_rows(path: Path, counts: dict[str, Any]) -> None:
    """Name every annotation row the build leaves out (nothing is dropped silently), and a CSV
    read in another encoding than UTF-8."""
    if counts.get("encoding_note"):
        _log(f"note: {counts['encoding_note']}")
    if counts["duplicates"]:
        _log(f"{path.name}: {counts['duplicates']} exact duplicate rows dropped")
    if counts["dropped"]:
        rows = "; ".join(f"row {row}: {why}" for row, why in counts["dropped_rows"][:50])
        more = f"; and {counts['dropped'] - 50} more" if counts["dropped"] > 50 else ""
        _log(f"WARNING: {path.name}: {counts['dropped']} of {counts['rows']} rows dropped "
             f"({rows}{more})")  # fmt: skip


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
