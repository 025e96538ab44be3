"""Video stage: decode with PyAV at the file's real frame rate, sample frames per TR, area-resize.

TR ``i`` covers the window ``[i * tr, (i + 1) * tr)``. Its F frames are the frames on screen at
``i * tr + j * frame_skip / fps`` for ``j = 0 .. F - 1`` (the last frame starting at or before that
time): every ``frame_skip``-th frame of the window, chosen by timestamp, so 23.976 and 25 fps files
are both sampled in real time, never time-warped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from giblet_ds.errors import StoreError

__all__ = ["VideoInfo", "probe_video", "frames_per_tr", "decode_video", "stream_video"]

_TIMESTAMP_TOLERANCE_S = 1e-3


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about the video stream (duration is refined by decoding)."""

    fps: float
    width: int
    height: int
    duration_s: float
    has_audio: bool


def _open(path: Path):
    import av

    if not path.is_file():
        raise StoreError(path, "video file not found", dataset="--video")
    try:
        return av.open(str(path))
    except av.error.FFmpegError as err:
        raise StoreError(path, f"cannot be opened as a video: {err}", dataset="--video") from None


def probe_video(path: str | Path) -> VideoInfo:
    """Frame rate, size and duration of the first video stream of ``path``."""
    path = Path(path)
    with _open(path) as container:
        if not container.streams.video:
            raise StoreError(path, "has no video stream", dataset="--video")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or float(rate) <= 0:
            raise StoreError(path, "video stream has no frame rate", dataset="--video")
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        else:
            duration = float("nan")
        return VideoInfo(
            fps=float(rate),
            width=int(stream.codec_context.width),
            height=int(stream.codec_context.height),
            duration_s=duration,
            has_audio=bool(container.streams.audio),
        )


def frames_per_tr(tr: float, fps: float, frame_skip: int) -> int:
    """Frames sampled per TR: every ``frame_skip``-th frame of a window of ``tr * fps`` frames
    (25 fps, TR 1.5 s, skip 4: 37.5 frames -> 10)."""
    return max(1, math.ceil(tr * fps / frame_skip - 1e-9))


def decode_video(
    path: str | Path,
    *,
    tr: float,
    frame_skip: int,
    n_frames: int,
    height: int,
    width: int,
    progress: Callable[[int], object] | None = None,
) -> tuple[np.ndarray, float]:
    """Decode ``path`` and return ``(frames, fps)``: uint8 (T, n_frames, height, width, 3) for every
    whole TR the video covers, and the stream's real frame rate (``stream_video`` into memory)."""
    blocks: list[np.ndarray] = []
    n_trs, fps = stream_video(
        path, lambda start, block: blocks.append(block), tr=tr, frame_skip=frame_skip,
        n_frames=n_frames, height=height, width=width, progress=progress,
    )  # fmt: skip
    if not blocks:
        return np.zeros((0, n_frames, height, width, 3), np.uint8), fps
    return np.concatenate(blocks)[:n_trs], fps


def stream_video(
    path: str | Path,
    sink: Callable[[int, np.ndarray], object],
    *,
    tr: float,
    frame_skip: int,
    n_frames: int,
    height: int,
    width: int,
    progress: Callable[[int], object] | None = None,
    block_trs: int = 32,
    sample_step_s: float | None = None,
) -> tuple[int, float]:
    """Decode ``path``, handing TR windows to ``sink(first_tr, frames)`` as they complete
    (uint8 (n, n_frames, height, width, 3), at most ``block_trs`` TRs per call, in order), so a
    whole movie never sits in memory. Returns ``(n_trs, fps)``: the whole TRs the video covers
    (``sink`` may have received one more, which the caller crops) and the real frame rate.

    Frames are resized with swscale's area filter straight from the decoded frame (no full-size RGB
    copy). ``progress(n)`` is called with the number of frames decoded since the last call.
    ``sample_step_s``: seconds between the sampled frames of a TR (default ``frame_skip / fps``);
    prediction passes the training movie's step so a movie at another frame rate is sampled at
    the same times within each TR (giblet_ds.pretrained.features).
    """
    import av

    path = Path(path)
    fps = probe_video(path).fps
    step = frame_skip / fps if sample_step_s is None else sample_step_s
    # Container timestamps are rounded to their time base (1 ms in Matroska): a frame that starts
    # exactly at a sample time may carry a timestamp up to a hair later.
    tolerance = min(_TIMESTAMP_TOLERANCE_S, 0.25 / fps)
    pending = np.zeros((block_trs, n_frames, height, width, 3), dtype=np.uint8)
    state: dict = {"sample": 0, "frame": None, "rgb": None, "sent": 0}

    def sample_time(k: int) -> float:
        return (k // n_frames) * tr + (k % n_frames) * step

    def flush() -> None:
        done = state["sample"] // n_frames - state["sent"]
        if done:
            sink(state["sent"], pending[:done].copy())
            state["sent"] += done

    def fill_with_current() -> None:
        # Resize lazily: only frames that are actually sampled pay for swscale.
        if state["rgb"] is None:
            small = state["frame"].reformat(
                width=width, height=height, format="rgb24", interpolation="AREA"
            )
            state["rgb"] = small.to_ndarray()
        k = state["sample"]
        pending[(k // n_frames) - state["sent"], k % n_frames] = state["rgb"]
        state["sample"] += 1
        if (
            state["sample"] % n_frames == 0
            and state["sample"] // n_frames - state["sent"] == block_trs
        ):
            flush()

    last_time = -math.inf
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for count, frame in enumerate(container.decode(stream), start=1):
                if frame.time is None:
                    continue
                time = float(frame.time)
                # Every sample time before this frame shows the frame on screen until now.
                while (
                    state["frame"] is not None and sample_time(state["sample"]) + tolerance < time
                ):
                    fill_with_current()
                state["frame"], state["rgb"] = frame, None
                last_time = max(last_time, time)
                if progress is not None and count % 100 == 0:
                    progress(100)
        except av.error.FFmpegError as err:
            raise StoreError(path, f"video decoding failed: {err}", dataset="--video") from None
        if state["frame"] is None:
            raise StoreError(path, "no decodable video frames", dataset="--video")
        # The last frame stays on screen for one frame duration; only whole TRs are kept.
        n_trs = math.floor((last_time + 1.0 / fps) / tr + 1e-9)
        while state["sample"] < n_trs * n_frames:
            fill_with_current()
        flush()
    return n_trs, fps
