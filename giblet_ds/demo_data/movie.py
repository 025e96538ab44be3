"""Render the demo movie: footage cut with ffmpeg, soundtrack mixed in numpy, encoded to .m4v.

The soundtrack is the Megamind clip's own sound where it plays, espeak-ng narration on top, and a
little noise floor; it is returned as an array too, because the planted brain responses use its
loudness.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from giblet_ds.demo_data.sources import CLIP_DIR, Line, Segment
from giblet_ds.errors import GibletError, StoreError

__all__ = ["SOUND_RATE", "WIDTH", "HEIGHT", "FPS", "speak", "soundtrack", "render_movie"]

SOUND_RATE = 44_100
WIDTH, HEIGHT, FPS = 640, 360, 25  # the Sherlock movie's size and rate


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise GibletError(f"{name} not found on PATH; install it (make setup does)")
    return path


def speak(text: str, folder: Path) -> np.ndarray:
    """``text`` spoken by espeak-ng, as float32 mono at 44.1 kHz."""
    from scipy.signal import resample_poly

    out = folder / "line.wav"
    subprocess.run(
        [_tool("espeak-ng"), "-v", "en-us", "-s", "150", "-w", str(out), text],
        check=True,
        capture_output=True,
    )
    with wave.open(str(out)) as handle:
        rate = handle.getframerate()
        raw = np.frombuffer(handle.readframes(handle.getnframes()), dtype=np.int16)
    voice = raw.astype(np.float32) / 32768.0
    return resample_poly(voice, SOUND_RATE, rate).astype(np.float32)


def _clip_sound(file: str, start: float, duration: float) -> np.ndarray:
    """Mono 44.1 kHz sound of ``file`` from ``start`` for ``duration`` seconds (zeros if silent)."""
    from giblet_ds.store.builder.audio import decode_audio

    n = round(duration * SOUND_RATE)
    try:
        sound = decode_audio(CLIP_DIR / file, rate=SOUND_RATE)
    except StoreError:  # a clip without a sound track
        return np.zeros(n, np.float32)
    sound = sound[round(start * SOUND_RATE) :][:n]
    return np.pad(sound, (0, n - len(sound)))


def soundtrack(
    segments: list[Segment], lines: list[Line], rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[Line, float]]]:
    """The mixed mono soundtrack and each narration line with its spoken duration."""
    total = segments[-1].onset + segments[-1].duration
    track = (0.002 * rng.standard_normal(round(total * SOUND_RATE))).astype(np.float32)
    for segment in segments:
        if segment.clip.has_sound:
            at = round(segment.onset * SOUND_RATE)
            sound = _clip_sound(segment.clip.file, segment.clip.start, segment.duration)
            track[at : at + len(sound)] += 0.6 * sound[: len(track) - at]
    spoken = []
    with tempfile.TemporaryDirectory() as tmp:
        for line in lines:
            voice = speak(line.text, Path(tmp))
            at = round(line.onset * SOUND_RATE)
            voice = voice[: len(track) - at]
            track[at : at + len(voice)] += 0.8 * voice
            spoken.append((line, len(voice) / SOUND_RATE))
    track /= max(1.0, float(np.abs(track).max()) / 0.95)
    return track, spoken


def _write_wav(path: Path, track: np.ndarray) -> None:
    pcm = np.clip(np.rint(track * 32767), -32768, 32767).astype("<i2")
    stereo = np.repeat(pcm[:, None], 2, axis=1)  # the lab's movie is stereo; the build downmixes
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(2)
        handle.setsampwidth(2)
        handle.setframerate(SOUND_RATE)
        handle.writeframes(stereo.tobytes())


def render_movie(segments: list[Segment], track: np.ndarray, out: Path) -> Path:
    """Cut, letterbox to 640 x 360 at 25 fps and encode H.264 + AAC into ``out`` (.m4v)."""
    ffmpeg = _tool("ffmpeg")
    total = segments[-1].onset + segments[-1].duration
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "soundtrack.wav"
        _write_wav(wav, track)
        args = [ffmpeg, "-v", "error", "-y"]
        filters = []
        for k, segment in enumerate(segments):
            clip = segment.clip
            args += ["-ss", f"{clip.start:.3f}", "-t", f"{segment.duration:.3f}"]
            args += ["-i", str(CLIP_DIR / clip.file)]
            filters.append(
                f"[{k}:v]scale={WIDTH}:{HEIGHT}:force_original_aspect_ratio=decrease,"
                f"pad={WIDTH}:{HEIGHT}:(ow-iw)/2:(oh-ih)/2,setsar=1,fps={FPS},format=yuv420p,"
                f"trim=duration={segment.duration:.3f},setpts=PTS-STARTPTS[v{k}]"
            )
        chain = "".join(f"[v{k}]" for k in range(len(segments)))
        filters.append(f"{chain}concat=n={len(segments)}:v=1:a=0[v]")
        args += ["-i", str(wav), "-filter_complex", ";".join(filters)]
        args += ["-map", "[v]", "-map", f"{len(segments)}:a", "-t", f"{total:.3f}"]
        args += ["-c:v", "libx264", "-preset", "veryfast", "-crf", "26", "-threads", "2"]
        args += ["-c:a", "aac", "-b:a", "96k", "-movflags", "+faststart", str(out)]
        result = subprocess.run(args, capture_output=True, text=True)
        if result.returncode != 0:
            raise GibletError(f"ffmpeg could not render the demo movie: {result.stderr[-2000:]}")
    return out
