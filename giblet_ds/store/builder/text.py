"""Text stage: read the annotation sheet, embed each annotation with an open_clip text tower,
and give every TR up to K annotations that overlap its window (forward-filling empty TRs).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from giblet_ds.errors import StoreError
from giblet_ds.store.builder.sheet import (
    END_COLUMN,
    START_COLUMN,
    TEXT_COLUMNS,
    Annotation,
    read_annotations,
)

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


def load_text_encoder(
    model_name: str,
    pretrained: bool,
    tag: str | None = None,
    device: str = "cpu",
    weights: str | Path | None = None,
) -> tuple[Callable[[list[str]], np.ndarray], int, str | None, dict[str, Any] | None]:
    """An open_clip text tower as ``encode(texts) -> (n, D) float32`` L2-normalized embeddings.

    Returns the encoder, D, the pretrained tag used and the record of the weight file (None
    without one); ``encode.network`` is the torch module that embeds. With ``pretrained=False``
    the same text network is built with random weights (fixed seed) and without the image tower.
    ``weights``: a file copied from a machine with internet or any state dict (a whole CLIP, or
    its text tower, e.g. fine-tuned); its text-tower weights are loaded into that network
    (checksum-verified where open_clip publishes one). Sets HF_HUB_OFFLINE=1 unless the caller
    set it, so nothing waits on a hub that cannot be reached.
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
    record = None
    if weights is not None:
        from open_clip.model import _build_text_tower

        from giblet_ds.store.builder import weights as wfiles

        path = Path(weights)
        published = wfiles.published_clip_sha256(model_name, path) if path.is_file() else None
        record = wfiles.weight_file_record(path, "--clip-weights", published)
        state = wfiles.clip_text_state(wfiles.load_state_dict(path, "--clip-weights"))
        quick_gelu = config.get("quick_gelu", False)
        if tag:  # a named tag's activation (OpenAI's weights use QuickGELU)
            quick_gelu = open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu", quick_gelu)
        file_tower = _build_text_tower(config["embed_dim"], text_cfg, quick_gelu=quick_gelu)
        wfiles.load_module_weights(file_tower, state, path, "--clip-weights")
        file_tower = file_tower.to(device).eval()
        tag = f"file:{path.name}"

        def forward(tokens: Any) -> Any:
            return file_tower(tokens)

        network = file_tower

    elif pretrained:
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
                "the hub, pass --clip-weights FILE (copied from a machine with internet), or "
                "build with --no-pretrained (random weights, recorded in the store)",
            ) from None
        model.eval()

        def forward(tokens: Any) -> Any:
            return model.encode_text(tokens)

        network = model

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

        network = tower

    def encode(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            features = forward(tokenizer(texts).to(device)).float()
            features = torch.nn.functional.normalize(features, dim=-1)
        return features.cpu().numpy().astype(np.float32)

    # The network itself, for whoever must prove which weights embedded the text (a prediction
    # hashes it against its model export: giblet_ds.pretrained.extractors).
    encode.network = network  # type: ignore[attr-defined]
    return encode, int(config["embed_dim"]), tag, record


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
    annotations: Sequence[Annotation],
    embeddings: np.ndarray,
    *,
    tr: float,
    n_trs: int,
    slots: int,
    report: dict[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per TR, the embeddings of up to ``slots`` annotations overlapping ``[i * tr, (i + 1) * tr)``,
    earliest start first; zero rows and a False mask where fewer. A TR that no annotation
    overlaps repeats the previous TR (forward fill); before the first annotation, all slots are
    empty. Returns ``(text (T, K, D) float32, mask (T, K) bool)``.

    ``report`` (filled when given) accounts for what the slots leave out: ``trs_over_slots``
    (TRs overlapped by more annotations than ``slots``) and ``never_in_a_slot`` (annotations
    starting inside the movie that no TR's slots hold).
    """
    dim = embeddings.shape[1]
    text = np.zeros((n_trs, slots, dim), dtype=np.float32)
    mask = np.zeros((n_trs, slots), dtype=bool)
    starts = np.array([a.start for a in annotations])
    ends = np.array([a.end for a in annotations])
    used = np.zeros(len(annotations), dtype=bool)
    over = 0
    for i in range(n_trs):
        lo, hi = i * tr, (i + 1) * tr
        # Spans overlap the window; zero-length annotations count where they start.
        overlap = (starts < hi) & ((ends > lo) | ((ends == starts) & (starts >= lo)))
        every = np.flatnonzero(overlap)
        over += len(every) > slots
        hits = every[:slots]
        used[hits] = True
        if len(hits):
            text[i, : len(hits)] = embeddings[hits]
            mask[i, : len(hits)] = True
        elif i > 0:
            text[i], mask[i] = text[i - 1], mask[i - 1]
    if report is not None:
        report["trs_over_slots"] = int(over)
        report["never_in_a_slot"] = int((~used & (starts < n_trs * tr)).sum())
    return text, mask
