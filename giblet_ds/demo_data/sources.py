"""The real footage the demo movie is cut from, and what happens when (the script of the movie).

Debian's ``opencv-doc`` ships short real clips (``make setup`` installs it): a Megamind trailer
excerpt with its soundtrack (a dinner scene), pedestrians on a campus path, a tree in the wind. The demo cycles through
them and a narrator (espeak-ng) describes the scenes; the schedule here is the ground truth the
annotations and the planted brain responses are made from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from giblet_ds.errors import GibletError

__all__ = [
    "CLIP_DIR",
    "Clip",
    "Segment",
    "Line",
    "CLIPS",
    "schedule",
    "narration",
    "check_sources",
]

CLIP_DIR = Path("/usr/share/doc/opencv-doc/examples/data")


@dataclass(frozen=True)
class Clip:
    """A stretch of one source file and how an annotator would describe it."""

    file: str
    start: float
    stop: float
    scene: str
    names: str
    location: str
    has_sound: bool = False
    people: bool = True


@dataclass(frozen=True)
class Segment:
    """A clip placed on the movie's timeline at ``onset`` seconds."""

    clip: Clip
    onset: float
    duration: float


@dataclass(frozen=True)
class Line:
    """One narrated sentence starting at ``onset`` seconds (its length is known once spoken)."""

    onset: float
    text: str
    location: str


CLIPS = (
    Clip(
        "Megamind.avi", 0.0, 11.2, "Two animated characters talk over dinner by candlelight",
        "Bernard; Roxanne", "Restaurant", has_sound=True,
    ),
    Clip("vtest.avi", 0.0, 40.0, "Pedestrians cross a paved path on a lawn, seen from above",
         "Pedestrians", "Campus"),
    Clip("tree.avi", 0.0, 29.5, "A leafy tree sways in the wind by a window", "", "Garden",
         people=False),
    Clip("Megamind_bugy.avi", 0.0, 9.0, "The dinner scene again, in a damaged copy of the clip",
         "Bernard; Roxanne", "Restaurant"),
    Clip("vtest.avi", 40.0, 79.0, "More people walk along the path in both directions",
         "Pedestrians", "Campus"),
)  # fmt: skip

_LINES = {
    "Restaurant": (
        "A man with glasses talks across the table.",
        "Candles glow between them.",
        "She listens and says nothing.",
    ),
    "Campus": (
        "A man in a dark coat walks to the right.",
        "Two people pass each other near the lamp post.",
        "Someone stops and looks around.",
        "A white van is parked by the building.",
    ),
    "Garden": (
        "The branches move slowly.",
        "Wind shakes the leaves.",
        "Nobody is in the garden.",
    ),
}


def check_sources() -> None:
    """Raise a GibletError naming what is missing (the clips come from ``make setup``)."""
    missing = sorted({c.file for c in CLIPS if not (CLIP_DIR / c.file).is_file()})
    if missing:
        raise GibletError(
            f"demo footage not found in {CLIP_DIR}: {missing}; install Debian's opencv-doc "
            "(make setup does)"
        )


def schedule(duration_s: float) -> list[Segment]:
    """Clips back to back, cycling through ``CLIPS``, until ``duration_s`` is filled."""
    segments: list[Segment] = []
    onset = 0.0
    k = 0
    while onset < duration_s - 1e-6:
        clip = CLIPS[k % len(CLIPS)]
        length = min(clip.stop - clip.start, duration_s - onset)
        segments.append(Segment(clip, onset, length))
        onset += length
        k += 1
    return segments


def narration(segments: list[Segment], every_s: float = 7.0, first_s: float = 2.0) -> list[Line]:
    """A sentence about the current scene every ``every_s`` seconds (none in the last 4 s)."""
    lines: list[Line] = []
    used: dict[str, int] = {}
    end = segments[-1].onset + segments[-1].duration
    t = first_s
    while t < end - 4.0:
        segment = next(s for s in segments if s.onset <= t < s.onset + s.duration)
        location = segment.clip.location
        options = _LINES[location]
        lines.append(Line(t, options[used.get(location, 0) % len(options)], location))
        used[location] = used.get(location, 0) + 1
        t += every_s
    return lines
