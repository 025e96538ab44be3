"""A new movie (and its annotations) -> the model's per-TR inputs, by the store builder's code.

Every step is a call of the function the store build uses (``giblet_ds.store.builder``): frames
by timestamp with swscale's area filter, audio on the container clock, EnCodec in segments with
1 s of left context, codes cut per TR, annotations read and embedded as the build reads them, K
per TR with forward fill. Two things differ, on purpose, and are said: frames are sampled at the
*training* movie's step within each TR (``frame_skip / training fps``), so a 30 fps movie is seen
at the same instants as a 25 fps one; and without annotations every text slot is empty.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from giblet_ds.errors import StoreError
from giblet_ds.pretrained.extractors import Extractors
from giblet_ds.pretrained.settings import FeatureSettings
from giblet_ds.store.builder import align, audio, text, video

__all__ = ["StimulusFeatures", "compute_features"]


@dataclass
class StimulusFeatures:
    """The per-TR inputs of one movie, as the store holds them (docs/store.md)."""

    video: np.ndarray
    """uint8 (T, F, H, W, 3)."""
    audio_codes: np.ndarray
    """int16 (T, n_q, C)."""
    text: np.ndarray
    """float32 (T, K, D); zeros where no annotation."""
    text_mask: np.ndarray
    """bool (T, K)."""
    tr: float
    fps: float
    """The new movie's real frame rate."""
    frame_size: tuple[int, int]
    """The new movie's (width, height) before resizing."""
    trs_available: dict[str, int]
    annotations: str
    """Where the text came from, or why the slots are empty."""
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def n_trs(self) -> int:
        return int(self.video.shape[0])


def compute_features(
    movie: str | Path,
    settings: FeatureSettings,
    extractors: Extractors,
    *,
    annotations: str | Path | None = None,
) -> StimulusFeatures:
    """The model's inputs for ``movie``: whole TRs covered by both its video and audio streams.

    Raises StoreError (from the builder) for a file that is not a movie, has no video or audio
    stream, or annotations it cannot read. Memory: the frames of the whole movie (T x F x H x W x
    3 bytes: 0.43 MB per TR at 10 x 90 x 160) plus its 24 kHz audio.
    """
    movie = Path(movie)
    build = settings.builder(extractors.device)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 3)
        clock = now

    probe = video.probe_video(movie)  # a file without a video stream stops here
    blocks: list[np.ndarray] = []
    video_trs, fps = video.stream_video(
        movie,
        lambda first, block: blocks.append(block),
        tr=settings.tr,
        frame_skip=build.frame_skip,
        n_frames=settings.frames_per_tr,
        height=build.frame_height,
        width=build.frame_width,
        sample_step_s=settings.sample_step_s,
    )
    frames = np.concatenate(blocks)[:video_trs]
    lap("video")
    wave = audio.decode_audio(movie)
    lap("audio_decode")
    counts = {
        "video": int(frames.shape[0]),
        "audio": align.whole_trs(len(wave) / audio.SAMPLE_RATE, settings.tr),
    }
    n_trs = min(counts.values())
    if n_trs < 1:
        raise StoreError(
            movie, "shorter than one TR in its video or audio stream", dataset="--video",
            expected=f"at least {settings.tr} s", actual=counts,
        )  # fmt: skip
    codes = audio.encode_audio(
        wave, extractors.encodec, segment_s=build.audio_segment_s, device=build.device
    )
    codes_tr = audio.codes_per_tr(codes, settings.tr, n_trs)
    del wave, codes
    lap("audio")
    slots = build.annotations_per_tr
    if annotations is None:
        text_array = np.zeros((n_trs, slots, settings.text_dim), np.float32)
        text_mask = np.zeros((n_trs, slots), bool)
        source = "none given: every text slot is empty (as before a movie's first annotation)"
    else:
        if extractors.encode_text is None:
            raise ValueError("annotations given but the extractors were built without CLIP")
        rows, counts_text = text.read_annotations(
            Path(annotations), build.text_columns, max_dropped_fraction=build.max_dropped_fraction
        )
        embeddings = (
            text.embed_texts([a.text for a in rows], extractors.encode_text)
            if rows
            else np.zeros((0, settings.text_dim), np.float32)
        )
        text_array, text_mask = text.annotations_per_tr(
            rows, embeddings, tr=settings.tr, n_trs=n_trs, slots=slots
        )
        source = (
            f"{Path(annotations).name}: {len(rows)} annotations ({counts_text['dropped']} rows "
            f"dropped, {counts_text['duplicates']} duplicates)"
        )
    lap("text")
    return StimulusFeatures(
        video=frames[:n_trs],
        audio_codes=codes_tr,
        text=text_array,
        text_mask=text_mask,
        tr=settings.tr,
        fps=fps,
        frame_size=(probe.width, probe.height),
        trs_available={**counts, "n_trs": n_trs},
        annotations=source,
        seconds=seconds,
    )
