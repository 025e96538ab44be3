"""The feature settings a model was trained with, read from its store and kept in its export.

A prediction must turn a new movie into exactly the features the model learned from: the same
TR, frames per TR sampled at the same times within each TR, the same frame size, the same EnCodec
bandwidth and weights, the same CLIP text tower, the same annotation columns and slots.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from giblet_ds.store import StoreInfo
from giblet_ds.store.builder.settings import BuildSettings

__all__ = ["FeatureSettings"]


@dataclass(frozen=True)
class FeatureSettings:
    """What ``features.json`` of an export holds (plain JSON values)."""

    build_settings: dict[str, Any]
    """The store's content settings (``BuildSettings.hashed()``): TR, lag, frame_skip, frame
    size, EnCodec bandwidth, CLIP model and tag, annotations per TR, text columns, ..."""
    training_fps: float
    """The training movie's real frame rate: frames were sampled ``frame_skip / training_fps`` s
    apart within each TR."""
    frames_per_tr: int
    """F, frames per TR in the store (fixed by the model's input)."""
    n_codebooks: int
    code_frames: int
    text_dim: int
    clip_tag: str
    """The open_clip tag the store's text tower used ('' for random weights, 'file:NAME')."""
    pretrained: dict[str, bool]
    """Per extractor (``encodec``, ``clip``): whether its weights were pretrained."""
    weight_files: dict[str, Any]
    """The store's record of offline weight files (name, bytes, sha256, checksum) per extractor."""
    extractors: dict[str, Any] = field(default_factory=dict)
    """Per extractor: ``weights_sha256`` of the network as the builder built it (None where the
    export could not know it) and how it was made (``source``)."""
    store_build_hash: str = ""
    warning: str = ""
    """The store's warning (non-empty for random-weight features)."""

    @property
    def tr(self) -> float:
        return float(self.build_settings["tr"])

    @property
    def lag(self) -> int:
        return int(self.build_settings["lag"])

    @property
    def sample_step_s(self) -> float:
        """Seconds between the sampled frames of a TR (the training movie's)."""
        return int(self.build_settings["frame_skip"]) / self.training_fps

    def builder(self, device: str = "cpu") -> BuildSettings:
        """The store builder's settings object (validated again on construction)."""
        return BuildSettings.from_mapping(
            {**self.build_settings, "frames_per_tr": self.frames_per_tr, "device": device},
            source="features.json build_settings",
        )

    @classmethod
    def from_store(cls, info: StoreInfo) -> FeatureSettings:
        attrs = info.attrs
        return cls(
            build_settings=dict(attrs["settings"]),
            training_fps=float(info.fps),
            frames_per_tr=int(info.n_frames),
            n_codebooks=int(info.n_q),
            code_frames=int(info.code_frames),
            text_dim=int(info.text_dim),
            clip_tag=str(attrs.get("clip_pretrained_tag", "")),
            pretrained=dict(info.pretrained),
            weight_files=dict(attrs.get("weight_files", {})),
            store_build_hash=info.build_hash,
            warning=str(attrs.get("warning", "")),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSettings:
        return cls(**data)
