"""The demo's annotation sheet, in the lab's Sherlock format (.xlsx), written from the script."""

from __future__ import annotations

from pathlib import Path

from giblet_ds.demo_data.sources import Line, Segment

__all__ = ["HEADER", "annotation_rows", "write_xlsx"]

# Trailing spaces as in the lab's sheet: the build must tolerate them.
HEADER = (
    "Segment",
    "Start Time (s) ",
    "End Time (s)",
    "Scene Details - A Level ",
    "Name - All",
    "Location ",
)


def annotation_rows(
    segments: list[Segment], spoken: list[tuple[Line, float]]
) -> list[tuple[object, ...]]:
    """One row per scene and one per narrated line, by start time; then the first third of the
    rows repeated at the end, like rows 479-961 of the Sherlock sheet (the build drops them)."""
    rows: list[tuple[float, float, str, str, str]] = []
    for segment in segments:
        clip = segment.clip
        end = segment.onset + segment.duration
        rows.append((round(segment.onset, 2), round(end, 2), clip.scene, clip.names, clip.location))
    for line, length in spoken:
        start = round(line.onset, 2)
        rows.append((start, round(line.onset + length, 2), line.text, "Narrator", line.location))
    rows.sort(key=lambda row: (row[0], row[1]))
    numbered: list[tuple[object, ...]] = [(k + 1, *row) for k, row in enumerate(rows)]
    return numbered + numbered[: len(numbered) // 3]


def write_xlsx(path: Path, rows: list[tuple[object, ...]]) -> Path:
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "annotations"
    sheet.append(list(HEADER))
    for row in rows:
        sheet.append([None if value == "" else value for value in row])
    book.save(path)
    return path
