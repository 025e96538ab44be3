"""Alignment: every modality cropped to the common number of whole TRs, never time-warped.

Stimulus TR ``t`` covers ``[t * tr, (t + 1) * tr)`` of the movie; it is paired with fMRI volume
``t + lag`` (the haemodynamic delay), so a store of T TRs uses volumes ``lag .. lag + T - 1``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from giblet_ds.errors import StoreError

__all__ = ["whole_trs", "common_trs", "crop_report"]

WARN_FRACTION = 0.1
"""A crop that drops more than this fraction of a source is reported as a WARNING, not a note."""


def whole_trs(duration_s: float, tr: float) -> int:
    """Number of complete TR windows in ``duration_s`` seconds (a partial last TR is dropped)."""
    return max(0, math.floor(duration_s / tr + 1e-9))


def common_trs(*, video: int, audio: int, fmri_volumes: int, lag: int) -> dict[str, int]:
    """TRs each source can fill and the common count ``n_trs`` (their minimum).

    fMRI can pair ``fmri_volumes - lag`` stimulus TRs. Raises when nothing is left.
    """
    counts = {"video": video, "audio": audio, "fmri": fmri_volumes - lag}
    n_trs = min(counts.values())
    if n_trs < 1:
        raise StoreError(
            "inputs",
            "no TR is covered by every modality after the lag",
            expected="at least 1 TR",
            actual=counts,
        )
    return {**counts, "n_trs": n_trs}


def crop_report(
    counts: Mapping[str, int], volumes: Mapping[str, int], *, lag: int, tr: float
) -> tuple[dict[str, Any], list[str]]:
    """What cropping to the common length drops from each source, and why; nothing is silent.

    ``counts`` is ``common_trs``'s result, ``volumes`` each subject's volume count (in order).
    Returns the record stored as the ``cropped`` attribute: ``limited_by`` (``video``, ``audio``
    or ``fmri:SUBJECT``: the shortest source) and, per source that loses anything at its end,
    ``available``, ``kept``, ``dropped`` ([first, stop) TRs of the movie, or volumes of the
    subject) and ``unit``; and the console lines: the TR summary naming the shortest subject,
    every subject's volume count, and one line per cropped source.
    """
    n = counts["n_trs"]
    shortest = min(volumes, key=lambda sid: volumes[sid])
    lengths = {
        "video": counts["video"],
        "audio": counts["audio"],
        f"fmri:{shortest}": counts["fmri"],
    }
    limited_by = min(lengths, key=lambda source: lengths[source])
    if limited_by == "video":
        why, by = f"the movie has {counts['video']} whole TRs of video", "the video"
    elif limited_by == "audio":
        why, by = f"the audio track holds {counts['audio']} whole TRs", "the audio"
    else:
        why = f"the fMRI of {shortest} has {volumes[shortest]} volumes ({n} TRs after lag {lag})"
        by = f"the fMRI of {shortest}"
    lines = [
        f"TRs available: video {counts['video']}, audio {counts['audio']}, fMRI {counts['fmri']} "
        f"({shortest}: {volumes[shortest]} volumes - lag {lag}); using the common {n} TRs "
        f"({n * tr:.1f} s), set by {by}",
        "fMRI volumes per subject: " + ", ".join(f"{sid} {k}" for sid, k in volumes.items()),
    ]
    record: dict[str, Any] = {"limited_by": limited_by}

    def level(dropped: int, available: int) -> str:
        return "WARNING" if dropped > WARN_FRACTION * available else "note"

    for source in ("video", "audio"):
        available = counts[source]
        if available > n:
            record[source] = {"available": available, "kept": n, "dropped": [n, available],
                              "unit": "TRs"}  # fmt: skip
            lines.append(
                f"{level(available - n, available)}: cropped {source}: TRs {n}..{available - 1} "
                f"({available - n} of {available}, {n * tr:.1f}..{available * tr:.1f} s) "
                f"dropped: {why}"
            )
    for sid, available in volumes.items():
        stop = lag + n
        if available > stop:
            record[f"fmri:{sid}"] = {"available": available, "kept": n, "dropped": [stop, available],
                                     "unit": "volumes"}  # fmt: skip
            lines.append(
                f"{level(available - stop, available)}: cropped fMRI {sid}: volumes "
                f"{stop}..{available - 1} ({available - stop} of {available}) dropped: {why}"
            )
    return record, lines
