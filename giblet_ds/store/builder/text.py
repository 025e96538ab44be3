"""Text stage: read the annotation sheet, embed each annotation with an open_clip text tower,
and give every TR up to K annotations that overlap its window (forward-filling empty TRs).
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from giblet_ds.errors import StoreError

__all__ = [
    "START_COLUMN",
    "END_COLUMN",
    "TEXT_COLUMNS",
    "Annotation",
    "read_annotations",
    "load_text_encoder",
    "embed_texts",
    "annotations_per_tr",
]

START_COLUMN = "Start Time (s)"
END_COLUMN = "End Time (s)"
TEXT_COLUMNS = ("Scene Details - A Level", "Name - All", "Location")


@dataclass(frozen=True)
class Annotation:
    """One annotation row: its time span in seconds and the text that gets embedded."""

    start: float
    end: float
    text: str


def _key(header: object) -> str:
    # Lab sheets carry trailing spaces and doubled spaces in headers; compare normalized.
    return re.sub(r"\s+", " ", str(header if header is not None else "")).strip().lower()


def _rows(path: Path) -> list[list[Any]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return [list(row) for row in csv.reader(handle)]
    if suffix in (".xlsx", ".xlsm"):
        import openpyxl

        try:
            book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        except Exception as err:  # openpyxl raises zipfile/KeyError/InvalidFileException
            raise StoreError(
                path, f"cannot read the workbook: {err}", dataset="--annotations"
            ) from None
        try:
            sheet = book.worksheets[0]
            return [list(row) for row in sheet.iter_rows(values_only=True)]
        finally:
            book.close()
    raise StoreError(
        path, "unsupported annotation format", dataset="--annotations", expected=".xlsx or .csv",
        actual=suffix or "no suffix",
    )


def read_annotations(
    path: str | Path, text_columns: Sequence[str] = TEXT_COLUMNS
) -> tuple[list[Annotation], dict[str, int]]:
    """Annotations of ``path`` (.xlsx or .csv) sorted by start time, exact duplicate rows removed.

    Headers match ignoring case and repeated or trailing whitespace. Each annotation's text joins
    the non-empty ``text_columns`` with "; ". Rows without a start or end time (blank lines at the
    end of a sheet) are skipped. Returns the annotations and counts of rows read, duplicates
    dropped and blank rows skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(path, "annotation file not found", dataset="--annotations")
    rows = _rows(path)
    if not rows:
        raise StoreError(path, "annotation file is empty", dataset="--annotations")
    header = [_key(cell) for cell in rows[0]]
    wanted = [START_COLUMN, END_COLUMN, *text_columns]
    index = {}
    for name in wanted:
        if _key(name) not in header:
            raise StoreError(
                path,
                f"missing column {name!r}",
                dataset="--annotations",
                expected=wanted,
                actual=[str(cell).strip() for cell in rows[0] if cell is not None],
            )
        index[name] = header.index(_key(name))
    seen: set[tuple] = set()
    out: list[Annotation] = []
    counts = {"rows": 0, "duplicates": 0, "blank": 0}
    for line, row in enumerate(rows[1:], start=2):
        cells = [row[index[name]] if index[name] < len(row) else None for name in wanted]
        if cells[0] in (None, "") or cells[1] in (None, ""):
            counts["blank"] += 1
            continue
        counts["rows"] += 1
        try:
            start, end = float(cells[0]), float(cells[1])
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
        parts = [re.sub(r"\s+", " ", str(c)).strip() for c in cells[2:] if c not in (None, "")]
        text = "; ".join(p for p in parts if p)
        key = (start, end, text)
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        out.append(Annotation(start, end, text))
    if not out:
        raise StoreError(path, "no annotation rows with start and end times", dataset="--annotations")
    out.sort(key=lambda a: (a.start, a.end))
    return out, counts


def load_text_encoder(
    model_name: str, pretrained: bool, tag: str | None = None, device: str = "cpu"
) -> tuple[Callable[[list[str]], np.ndarray], int, str | None]:
    """An open_clip text tower as ``encode(texts) -> (n, D) float32`` L2-normalized embeddings.

    Returns the encoder, D and the pretrained tag used. With ``pretrained=False`` the same text
    network is built with random weights (fixed seed) and without the image tower. Sets
    HF_HUB_OFFLINE=1 unless the caller set it, so nothing waits on a hub that cannot be reached.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip
    import torch

    config = open_clip.get_model_config(model_name)
    if config is None:
        raise StoreError(
            f"CLIP {model_name}",
            "unknown open_clip model",
            dataset="--clip-model",
            expected="a name from open_clip.list_models(), e.g. ViT-H-14 or ViT-S-32-alt",
            actual=model_name,
        )
    text_cfg = config.get("text_cfg", {})
    if "hf_model_name" in text_cfg:
        raise StoreError(
            f"CLIP {model_name}",
            "text towers from Hugging Face models are not supported (they need the hub)",
            dataset="--clip-model",
        )
    tokenizer = open_clip.get_tokenizer(model_name)
    if pretrained:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        tag = tag or (tags[0] if tags else None)
        if tag is None:
            raise StoreError(
                f"CLIP {model_name}",
                "has no pretrained weights in open_clip; build with --no-pretrained or pick a model "
                "that has some (open_clip.list_pretrained())",
            )
        try:
            model = open_clip.create_model(model_name, pretrained=tag, device=device)
        except Exception as err:  # hub/network/file errors come in many types
            raise StoreError(
                f"CLIP {model_name}/{tag}",
                f"could not load pretrained weights ({type(err).__name__}: {err}); connect to "
                "the hub, or build with --no-pretrained (random weights, recorded in the store)",
            ) from None
        model.eval()

        def forward(tokens: Any) -> Any:
            return model.encode_text(tokens)

    else:
        from open_clip.model import _build_text_tower

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            tower = _build_text_tower(
                config["embed_dim"], text_cfg, quick_gelu=config.get("quick_gelu", False)
            )
        tower = tower.to(device).eval()
        tag = None

        def forward(tokens: Any) -> Any:
            return tower(tokens)

    def encode(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            features = forward(tokenizer(texts).to(device)).float()
            features = torch.nn.functional.normalize(features, dim=-1)
        return features.cpu().numpy().astype(np.float32)

    return encode, int(config["embed_dim"]), tag


def embed_texts(
    texts: Sequence[str],
    encode: Callable[[list[str]], np.ndarray],
    *,
    batch_size: int = 32,
    progress: Callable[[int], object] | None = None,
) -> np.ndarray:
    """Embeddings (n, D) of ``texts``, each distinct text encoded once."""
    unique = sorted(set(texts))
    vectors: dict[str, np.ndarray] = {}
    for start in range(0, len(unique), batch_size):
        batch = unique[start : start + batch_size]
        for text, vector in zip(batch, encode(batch), strict=True):
            vectors[text] = vector
        if progress is not None:
            progress(len(batch))
    return np.stack([vectors[t] for t in texts])


def annotations_per_tr(
    annotations: Sequence[Annotation], embeddings: np.ndarray, *, tr: float, n_trs: int, slots: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per TR, the embeddings of up to ``slots`` annotations overlapping ``[i * tr, (i + 1) * tr)``,
    earliest start first; zero rows and a False mask where fewer. A TR that no annotation
    overlaps repeats the previous TR (forward fill); before the first annotation, all slots are
    empty. Returns ``(text (T, K, D) float32, mask (T, K) bool)``.
    """
    dim = embeddings.shape[1]
    text = np.zeros((n_trs, slots, dim), dtype=np.float32)
    mask = np.zeros((n_trs, slots), dtype=bool)
    starts = np.array([a.start for a in annotations])
    ends = np.array([a.end for a in annotations])
    for i in range(n_trs):
        lo, hi = i * tr, (i + 1) * tr
        # Spans overlap the window; zero-length annotations count where they start.
        overlap = (starts < hi) & ((ends > lo) | ((ends == starts) & (starts >= lo)))
        hits = np.flatnonzero(overlap)[:slots]
        if len(hits):
            text[i, : len(hits)] = embeddings[hits]
            mask[i, : len(hits)] = True
        elif i > 0:
            text[i], mask[i] = text[i - 1], mask[i - 1]
    return text, mask
