"""The model section of the run config: widths of the giblet autoencoder and its switches."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from giblet_ds.config.rules import positive_ints, require
from giblet_ds.errors import ConfigError

__all__ = ["MODEL_INPUT_KEYS", "ModelConfig"]

# Model input sizes that the feature store defines; `None` in a config means "take it from the store".
MODEL_INPUT_KEYS = (
    "frames_per_tr",
    "frame_height",
    "frame_width",
    "n_codebooks",
    "code_frames",
    "text_slots",
    "text_dim",
    "n_voxels",
)


@dataclass
class ModelConfig:
    """Widths of the giblet autoencoder (REFERENCE.md) and the architecture switches."""

    seed_compat: bool = False
    """Build the old system's exact layers (BatchNorm, raw float audio codes, biases before norms,
    sigmoid outputs). Only for counting and comparison: it repeats known faults."""
    frames_per_tr: int | None = None
    """Video frames per TR window (10 in the seed). None: take it from the store."""
    frame_height: int | None = None
    """Frame height in pixels (90). None: from the store."""
    frame_width: int | None = None
    """Frame width in pixels (160). None: from the store."""
    n_codebooks: int | None = None
    """EnCodec codebooks n_q (8 at 6 kbps). None: from the store."""
    code_frames: int | None = None
    """EnCodec code frames per TR (112 at 75 Hz and TR 1.5 s). None: from the store."""
    codebook_size: int = 1024
    """Values per EnCodec codebook."""
    text_slots: int | None = None
    """Annotation embeddings per TR (3). None: from the store."""
    text_dim: int | None = None
    """Width of one text embedding (1,024 for ViT-H-14). None: from the store."""
    n_voxels: int | None = None
    """fMRI voxels inside the store's mask (83,138 for 5 subjects). None: from the store."""
    video_hidden: list[int] = field(default_factory=lambda: [4096, 2048, 1024])
    """Video encoder widths; the last is the video feature size entering the trunk."""
    audio_embed_dim: int = 8
    """Per-codebook code embedding width (default architecture); the decoder scores codes against
    the same embeddings, so its output layer stays n_q x code_frames x audio_embed_dim wide."""
    audio_hidden: list[int] = field(default_factory=lambda: [512, 256])
    """Audio encoder widths."""
    text_hidden: list[int] = field(default_factory=lambda: [512, 256])
    """Text encoder widths."""
    trunk_hidden: list[int] = field(default_factory=lambda: [1536, 4096, 8000])
    """Fusion trunk widths between the concatenated features and the bottleneck."""
    bottleneck: int = 2048
    """Bottleneck width (normalized, no activation)."""
    fmri_hidden: list[int] = field(default_factory=lambda: [16384])
    """fMRI head hidden widths from the bottleneck; a linear layer to n_voxels follows."""
    decoder_hidden: list[int] = field(default_factory=lambda: [8000, 4096, 2048, 1536])
    """Shared decoder widths from the bottleneck."""
    video_decoder_hidden: list[int] = field(default_factory=lambda: [2048, 4096])
    """Video decoder head widths; a linear layer to one frame (H x W x 3) follows."""
    audio_decoder_hidden: list[int] = field(default_factory=lambda: [2048, 2048])
    """Audio decoder head widths."""
    text_decoder_hidden: list[int] = field(default_factory=lambda: [1024, 1024])
    """Text decoder head widths; a linear layer to text_slots x text_dim follows."""
    dropout: float = 0.1
    """Dropout after every hidden activation."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (saves memory, costs ~1/3 compute)."""
    context_trs: int = 12
    """TRs the encoder sees per sample (k): k store rows holding TR t (where the window ends:
    model.context_end), each turned into its own bottleneck code by the same encoders and trunk;
    the fMRI head reads the codes mixed over time, the decoder TR t's code (docs/design.md,
    "Temporal context"). 1: one TR, the model as it was. A BOLD volume sums ~8-10 TRs of
    stimulus (the HRF) and its undershoot reaches ~16 s; 12 (18 s at TR 1.5 s) scored 0.411
    against 0.402 for 8 on the demo (BENCHMARKS.md, "Codes, then the HRF")."""
    context_end: str = "volume"
    """Where the window ends. "stimulus": at TR t (rows t-k+1..t, lag..lag+k-1 TRs before the
    paired volume t + lag). "volume": at the paired volume's own stimulus row t + lag (rows
    t-k+1+L..t+L with L = min(lag, k-1)), so the window also holds the 0..lag-1 TR delays of the
    HRF's rise; TR t stays in the window. Default "volume": test r 0.473 against 0.465 at k = 8
    on the 600 s demo, first design (docs/design.md and BENCHMARKS.md, "Temporal context")."""
    context_init: str = "hrf"
    """Where the temporal mixer starts (k > 1). "hrf": nilearn's canonical (Glover) HRF at each
    window slot's delay behind the paired volume, scaled to sum to 1 (giblet_ds.train.hrf_start);
    "current_tr": TR t alone, the one-TR model. Training adapts either."""
    n_subjects: int = 0
    """Subject-specific fMRI outputs (data.target=subjects): one per store subject, plus the
    average subject (giblet_ds/model/subject_layers.py). 0: one fMRI output, the subject mean
    (or data.subject); with data.target=subjects, 0 is filled from the store's subject count."""
    subject_rank: int = 8
    """Rank of each subject's residual on the shared fMRI readout (n_subjects > 0): per subject
    rank x (fMRI head width + n_voxels) weights and n_voxels biases (docs/design.md, "Subject
    heads")."""
    subject_dropout: float = 0.1
    """Probability, per training sample and subject, that the average subject's output stands in
    for the subject's own (TRIBE's subject dropout): what trains the average subject, which
    predicts the subject mean and starts a new subject. Untuned."""

    def __post_init__(self) -> None:
        for key in MODEL_INPUT_KEYS:
            value = getattr(self, key)
            require(
                value is None or (isinstance(value, int) and value > 0),
                f"model.{key}",
                value,
                "must be a positive integer or null (null: take it from the store)",
            )
        for key in (
            "video_hidden",
            "audio_hidden",
            "text_hidden",
            "trunk_hidden",
            "decoder_hidden",
            "video_decoder_hidden",
            "audio_decoder_hidden",
            "text_decoder_hidden",
        ):
            positive_ints(f"model.{key}", getattr(self, key))
        require(
            isinstance(self.fmri_hidden, list) and all(v > 0 for v in self.fmri_hidden),
            "model.fmri_hidden",
            self.fmri_hidden,
            "must be a list of positive integers (may be empty)",
        )
        require(self.bottleneck > 0, "model.bottleneck", self.bottleneck, "must be > 0")
        require(self.codebook_size > 1, "model.codebook_size", self.codebook_size, "must be > 1")
        require(
            self.audio_embed_dim > 0, "model.audio_embed_dim", self.audio_embed_dim, "must be > 0"
        )
        require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must be in [0, 1)")
        require(
            not (self.seed_compat and self.activation_checkpointing),
            "model.activation_checkpointing",
            self.activation_checkpointing,
            "cannot be true with model.seed_compat (BatchNorm running statistics would be "
            "updated twice per step, a fault of the old system)",
            "set one of them to false",
        )
        require(
            isinstance(self.context_trs, int) and self.context_trs >= 1,
            "model.context_trs",
            self.context_trs,
            "must be an integer >= 1",
        )
        require(
            self.context_end in ("stimulus", "volume"),
            "model.context_end",
            self.context_end,
            'must be "stimulus" or "volume"',
        )
        require(
            self.context_init in ("hrf", "current_tr"),
            "model.context_init",
            self.context_init,
            'must be "hrf" or "current_tr"',
        )
        require(
            not (self.seed_compat and self.context_trs != 1),
            "model.context_trs",
            self.context_trs,
            "must be 1 with model.seed_compat (the old system saw one TR per sample)",
            "set model.context_trs=1 or model.seed_compat=false",
        )

        require(
            isinstance(self.n_subjects, int) and self.n_subjects >= 0,
            "model.n_subjects",
            self.n_subjects,
            "must be an integer >= 0 (0: no subject heads)",
        )
        require(
            isinstance(self.subject_rank, int) and self.subject_rank >= 1,
            "model.subject_rank",
            self.subject_rank,
            "must be an integer >= 1",
        )
        require(
            0.0 < self.subject_dropout < 1.0,
            "model.subject_dropout",
            self.subject_dropout,
            "must be in (0, 1): at 0 the average subject, which predicts the subject mean, "
            "never trains",
        )
        require(
            not (self.seed_compat and self.n_subjects),
            "model.n_subjects",
            self.n_subjects,
            "must be 0 with model.seed_compat (the old system predicted the subject mean)",
            "set model.n_subjects=0 or model.seed_compat=false",
        )

    def missing_input_sizes(self) -> list[str]:
        """Input sizes still None (to be filled from the store)."""
        return [key for key in MODEL_INPUT_KEYS if getattr(self, key) is None]

    def with_input_sizes(self, sizes: Mapping[str, int]) -> ModelConfig:
        """A copy with the store's input sizes filled in where this config left them None.

        Sizes the config sets explicitly are kept; :func:`cross_check` reports any disagreement.
        """
        unknown = set(sizes) - set(MODEL_INPUT_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown model input sizes {sorted(unknown)}; valid: {MODEL_INPUT_KEYS}"
            )
        filled: dict[str, Any] = {k: v for k, v in sizes.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **filled)
