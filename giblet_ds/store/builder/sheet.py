"""Annotation sheets (.xlsx or .csv) -> annotation rows, with every skipped row accounted for.

Lab sheets are messy in ways a naive reader gets silently wrong:
- the sheet's declared used range (``<dimension ref="A1:F10">``) can be smaller than its data;
  openpyxl's read-only mode trusts it and stops early, so the range is reset and every row read;
- a workbook written by a script can hold formulas with no saved results; read as values they
  are empty, so such cells are an error naming the rows (a spreadsheet program computes and saves
  them; so does exporting CSV);
- rows without a start or end time are dropped, each one named, counted in the store's
  attributes, and a build that drops more than ``max_dropped_fraction`` of its rows stops;
- a CSV saved by Excel on Windows is Windows-1252 ("Watson’s" holds byte 0x92), not UTF-8: it is
  read as such, and the encoding is recorded so the build can say so.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from giblet_ds.errors import StoreError

__all__ = [
    "START_COLUMN",
    "END_COLUMN",
    "TEXT_COLUMNS",
    "MAX_DROPPED_FRACTION",
    "Annotation",
    "read_annotations",
    "format_rows",
    "header_key",
]

START_COLUMN = "Start Time (s)"
END_COLUMN = "End Time (s)"
TEXT_COLUMNS = ("Scene Details - A Level", "Name - All", "Location")
MAX_DROPPED_FRACTION = 0.02
"""Default: a build stops when more than 2% of the sheet's data rows would be dropped."""


@dataclass(frozen=True)
class Annotation:
    """One annotation row: its time span in seconds and the text that gets embedded."""

    start: float
    end: float
    text: str


def header_key(header: object) -> str:
    """A column header as the builder matches it: whitespace runs collapsed, stripped, lower case
    (lab sheets carry trailing and doubled spaces in headers)."""
    return re.sub(r"\s+", " ", str(header if header is not None else "")).strip().lower()


def _empty(cell: object) -> bool:
    return cell is None or (isinstance(cell, str) and not cell.strip())


def format_rows(rows: Sequence[int], limit: int = 20) -> str:
    """Sheet row numbers as ``"4, 6-9, 12"`` (runs joined), at most ``limit`` runs."""
    runs: list[list[int]] = []
    for row in sorted(rows):
        if runs and row == runs[-1][1] + 1:
            runs[-1][1] = row
        else:
            runs.append([row, row])
    text = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit]]
    more = f" and {len(runs) - limit} more runs" if len(runs) > limit else ""
    return ", ".join(text) + more


def _xlsx_rows(path: Path) -> tuple[list[list[Any]], list[list[Any]]]:
    """Cell values and cell formulas of the first sheet, every row whatever the declared range."""
    import openpyxl

    tables = []
    for data_only in (True, False):
        try:
            book = openpyxl.load_workbook(path, read_only=True, data_only=data_only)
        except Exception as err:  # openpyxl raises zipfile/KeyError/InvalidFileException
            raise StoreError(
                path, f"cannot read the workbook: {err}", dataset="--annotations"
            ) from None
        try:
            sheet = book.worksheets[0]
            # Read-only mode stops at the declared <dimension>; files written by some tools
            # declare less than they hold (openpyxl docs: "reset_dimensions" when in doubt).
            sheet.reset_dimensions()
            tables.append([list(row) for row in sheet.iter_rows(values_only=True)])
        finally:
            book.close()
    return tables[0], tables[1]


def _is_formula(cell: object) -> bool:
    if isinstance(cell, str):
        return cell.startswith("=")
    return type(cell).__name__ in ("ArrayFormula", "DataTableFormula")


def _decode_csv(path: Path) -> tuple[str, str, str]:
    """The text of a CSV file, its encoding and a note when that is not UTF-8.

    UTF-8 with or without a byte-order mark first; else Windows-1252 (cp1252), which Excel on
    Windows writes for "CSV (Comma delimited)". Returns ``(text, encoding, note)``; raises
    ``StoreError`` naming the line when the bytes fit neither.
    """
    data = path.read_bytes()
    encoding = "utf-8-sig" if data.startswith(b"\xef\xbb\xbf") else "utf-8"
    try:
        return data.decode(encoding), encoding, ""
    except UnicodeDecodeError as err:
        first_bad = err.start
    line = data.count(b"\n", 0, first_bad) + 1
    byte = f"0x{data[first_bad]:02x}"
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError as err:
        start = data.rfind(b"\n", 0, err.start) + 1
        bad_line = data.count(b"\n", 0, err.start) + 1
        raise StoreError(
            path,
            f"line {bad_line} is neither UTF-8 nor Windows-1252 "
            f"(byte 0x{data[err.start]:02x} at column {err.start - start + 1}). Save the sheet "
            'as "CSV UTF-8" (Excel: File > Save As > CSV UTF-8), or give the .xlsx',
            dataset="--annotations",
        ) from None
    # Show the first cell that changed, so a wrong guess (another code page) is easy to spot.
    row = next(csv.reader([text.splitlines()[line - 1]]), [])
    cell = next((c for c in row if any(ord(ch) > 127 for ch in c)), "")
    note = (
        f"{path.name} is not UTF-8 (byte {byte} on line {line}); read as Windows-1252 (cp1252), "
        f'the encoding Excel on Windows saves CSV in: check its text (e.g. "{cell.strip()}"), '
        'or save it as "CSV UTF-8"'
    )
    return text, "cp1252", note


def _rows(path: Path) -> tuple[list[list[Any]], list[list[Any]] | None, dict[str, str]]:
    """The sheet's rows, for workbooks its formulas (None for CSV), and for CSV its encoding
    (``{"encoding": ..., "encoding_note": ...}``)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        text, encoding, note = _decode_csv(path)
        rows = [list(row) for row in csv.reader(io.StringIO(text, newline=""))]
        return rows, None, {"encoding": encoding, "encoding_note": note}
    if suffix in (".xlsx", ".xlsm"):
        return (*_xlsx_rows(path), {})
    raise StoreError(
        path,
        "unsupported annotation format",
        dataset="--annotations",
        expected=".xlsx or .csv",
        actual=suffix or "no suffix",
    )


def _uncached_formulas(values: list[list[Any]], formulas: list[list[Any]], columns: list[int]):
    """Sheet row numbers whose used cells hold a formula without a saved result."""
    rows = []
    for number, (vals, forms) in enumerate(zip(values, formulas, strict=False), start=1):
        for col in columns:
            form = forms[col] if col < len(forms) else None
            value = vals[col] if col < len(vals) else None
            if value is None and _is_formula(form):
                rows.append(number)
                break
    return rows


def read_annotations(
    path: str | Path,
    text_columns: Sequence[str] = TEXT_COLUMNS,
    *,
    max_dropped_fraction: float = MAX_DROPPED_FRACTION,
) -> tuple[list[Annotation], dict[str, Any]]:
    """Annotations of ``path`` (.xlsx or .csv) sorted by start time, exact duplicate rows removed.

    Headers match ignoring case and repeated or trailing whitespace. Each annotation's text joins
    the non-empty ``text_columns`` with "; ". Returns the annotations and an account of the rows:
    ``rows`` (data rows with any content), ``duplicates`` (exact repeats, dropped: no information
    is lost), ``empty`` (lines with no content), ``dropped`` and ``dropped_rows`` (``[row, reason]``
    pairs, sheet row numbers: rows with content but no start or end time); for CSV also
    ``encoding`` (``utf-8``, ``utf-8-sig`` or ``cp1252``) and ``encoding_note`` (what to tell the
    user when it is not UTF-8, else empty).

    Raises ``StoreError`` for a CSV in neither encoding and formulas without saved values
    (naming the line or rows), for non-numeric or reversed times, and when more than
    ``max_dropped_fraction`` of the rows would be dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(path, "annotation file not found", dataset="--annotations")
    rows, formulas, encoding = _rows(path)
    if not rows:
        raise StoreError(path, "annotation file is empty", dataset="--annotations")
    header = [header_key(cell) for cell in rows[0]]
    wanted = [START_COLUMN, END_COLUMN, *text_columns]
    index = {}
    for name in wanted:
        if header_key(name) not in header:
            raise StoreError(
                path,
                f"missing column {name!r}",
                dataset="--annotations",
                expected=wanted,
                actual=[str(cell).strip() for cell in rows[0] if cell is not None],
            )
        index[name] = header.index(header_key(name))
    if formulas is not None:
        uncached = _uncached_formulas(rows, formulas, [index[name] for name in wanted])
        if uncached:
            raise StoreError(
                path,
                f"the workbook holds formulas without saved values in rows "
                f"{format_rows(uncached)} ({len(uncached)} rows): read as values they are empty. "
                "Open and save it in a spreadsheet program (which computes and stores the "
                "results), or export the sheet as CSV",
                dataset="--annotations",
            )
    seen: set[tuple] = set()
    out: list[Annotation] = []
    counts: dict[str, Any] = {"rows": 0, "duplicates": 0, "empty": 0, "dropped": 0, **encoding}
    dropped: list[list[Any]] = []
    for line, row in enumerate(rows[1:], start=2):
        cells = [row[index[name]] if index[name] < len(row) else None for name in wanted]
        if all(_empty(c) for c in row):
            counts["empty"] += 1
            continue
        counts["rows"] += 1
        missing = [n for n, c in zip(("start", "end"), cells[:2], strict=True) if _empty(c)]
        if missing:
            dropped.append([line, f"no {' or '.join(missing)} time"])
            continue
        try:
            start, end = float(cells[0]), float(cells[1])  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise StoreError(
                path,
                f"row {line}: start and end times must be numbers",
                dataset="--annotations",
                actual=cells[:2],
            ) from None
        if not (math.isfinite(start) and math.isfinite(end)) or end < start:
            raise StoreError(
                path,
                f"row {line}: end time before start time",
                dataset="--annotations",
                actual=(start, end),
            )
        parts = [re.sub(r"\s+", " ", str(c)).strip() for c in cells[2:] if not _empty(c)]
        text = "; ".join(p for p in parts if p)
        key = (start, end, text)
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        out.append(Annotation(start, end, text))
    counts["dropped"] = len(dropped)
    counts["dropped_rows"] = dropped
    if counts["rows"] and len(dropped) > max_dropped_fraction * counts["rows"]:
        raise StoreError(
            path,
            f"{len(dropped)} of {counts['rows']} rows have no start or end time and would be "
            f"dropped (rows {format_rows([r for r, _ in dropped])}), more than "
            f"{max_dropped_fraction:.0%}. Fix the sheet, or build anyway with "
            "--max-dropped-fraction F (the dropped rows are recorded in the store)",
            dataset="--annotations",
        )
    if not out:
        raise StoreError(
            path, "no annotation rows with start and end times", dataset="--annotations"
        )
    out.sort(key=lambda a: (a.start, a.end))
    return out, counts
