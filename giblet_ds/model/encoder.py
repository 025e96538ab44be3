"""Stimulus encoders, the fusion trunk to the bottleneck, and the fMRI head."""

from __future__ import annotations

import functools

import torch
from torch import nn

from giblet_ds.config import ModelConfig
from giblet_ds.model.blocks import DenseStack
from giblet_ds.model.context import TemporalMixer
from giblet_ds.model.subject_layers import SubjectLayers

__all__ = ["AudioCodebook", "AudioEncoder", "GibletEncoder"]


class AudioCodebook(nn.Module):
    """One learned embedding table per EnCodec codebook, shape (n_q, codebook_size, dim).

    Used twice: to embed input codes, and to score decoder queries against every code value, so the
    audio output layer is n_q x frames x dim wide instead of n_q x frames x 1,024. Both uses go
    through ``forward`` so that ZeRO-3 gathers the table each time (its hooks fire on forward).
    """

    def __init__(self, n_codebooks: int, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_codebooks, codebook_size, dim))

    def forward(
        self, codes: torch.Tensor | None = None, queries: torch.Tensor | None = None
    ) -> torch.Tensor:
        """codes (B, n_q, C) int -> embeddings (B, n_q, C, dim); or
        queries (B, n_q, C, dim) -> logits (B, n_q, C, codebook_size)."""
        if codes is not None:
            n_q, size, _ = self.weight.shape
            offsets = torch.arange(n_q, device=codes.device).view(1, n_q, 1) * size
            flat = self.weight.reshape(n_q * size, -1)
            return nn.functional.embedding(codes + offsets, flat)
        if queries is not None:
            return torch.einsum("bqcd,qkd->bqck", queries, self.weight)
        raise ValueError("AudioCodebook needs codes or queries")


class AudioEncoder(nn.Module):
    """EnCodec codes -> features.

    Default: codes are categories, embedded per codebook and summed over codebooks per frame (as
    EnCodec-token language models do), then flattened over frames. ``seed_compat``: the old
    system's raw code numbers as floats (n_q x frames inputs).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.n_codebooks is not None and cfg.code_frames is not None
        self.seed_compat = cfg.seed_compat
        self.codebook: AudioCodebook | None = None
        if cfg.seed_compat:
            in_features = cfg.n_codebooks * cfg.code_frames
        else:
            self.codebook = AudioCodebook(cfg.n_codebooks, cfg.codebook_size, cfg.audio_embed_dim)
            in_features = cfg.code_frames * cfg.audio_embed_dim
        self.mlp = DenseStack(
            in_features, cfg.audio_hidden, seed_compat=cfg.seed_compat, dropout=cfg.dropout
        )

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if self.codebook is None:
            # raw code numbers as floats, in the weights' dtype (bf16 engines included)
            dtype = next(self.mlp.parameters()).dtype
            return self.mlp(codes.flatten(1).to(dtype))
        return self.mlp(self.codebook(codes=codes).sum(dim=1).flatten(1))


class GibletEncoder(nn.Module):
    """Video, audio and text encoders -> concatenation -> trunk -> bottleneck -> fMRI head
    (k > 1: one bottleneck code per TR of the window, mixed over time for the fMRI head)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        missing = cfg.missing_input_sizes()
        if missing:
            raise ValueError(f"model input sizes {missing} are unset; fill them from the store")
        assert cfg.frames_per_tr and cfg.frame_height and cfg.frame_width
        assert cfg.text_slots and cfg.text_dim and cfg.n_voxels
        stack = functools.partial(DenseStack, seed_compat=cfg.seed_compat, dropout=cfg.dropout)
        video_in = cfg.frames_per_tr * cfg.frame_height * cfg.frame_width * 3
        self.video = stack(video_in, cfg.video_hidden)
        self.audio = AudioEncoder(cfg)
        self.text = stack(cfg.text_slots * cfg.text_dim, cfg.text_hidden)
        fused = cfg.video_hidden[-1] + cfg.audio_hidden[-1] + cfg.text_hidden[-1]
        # The bottleneck is normalized but not activated: it is the code the decoder and the fMRI
        # head read, and a ReLU there would zero half of it.
        self.trunk = stack(fused, [*cfg.trunk_hidden, cfg.bottleneck], last_activation=False)
        # k > 1: the encoders and the trunk turn each TR of the window into its own code with the
        # same weights; the mixer folds the k codes into the one the fMRI head reads, while the
        # decoder reconstructs TR t from TR t's code (docs/design.md, "Temporal context"). k = 1
        # builds no mixer, so the model (parameters, names, arithmetic) is the one-TR model.
        self.context_trs = cfg.context_trs
        self.temporal: TemporalMixer | None = (
            TemporalMixer(cfg.context_trs, cfg.bottleneck) if cfg.context_trs > 1 else None
        )
        self.fmri_head = stack(cfg.bottleneck, cfg.fmri_hidden, out_features=cfg.n_voxels)
        # n_subjects > 0: each subject's own output on the shared readout, plus the average
        # subject (giblet_ds/model/subject_layers.py); 0 builds nothing, the model as it was.
        self.subjects: SubjectLayers | None = None
        if cfg.n_subjects > 0:
            assert self.fmri_head.out is not None
            self.subjects = SubjectLayers(
                cfg.n_subjects,
                self.fmri_head.out.in_features,  # the head's last hidden width (or bottleneck)
                cfg.n_voxels,
                cfg.subject_rank,
                cfg.subject_dropout,
            )

    def forward(
        self,
        video: torch.Tensor,
        audio_codes: torch.Tensor,
        text: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns (bottleneck of TR t (B, bottleneck), fMRI prediction (B, n_voxels), per-subject
        fMRI (B, n_subjects, n_voxels) or None without subject heads). With subject heads the
        fMRI prediction is the average subject's (the subject mean's predictor).

        k = 1: video (B, F, H, W, 3), audio_codes (B, n_q, C), text (B, K, D). k > 1: each with
        a window axis after the batch, (B, k, ...), in the dataset's slot order (TR t last), and
        ``context_mask`` (B, k) bool marking real TRs (None: all real); the fMRI prediction reads
        the mix of the k codes, the returned bottleneck is TR t's own. Raises ValueError on a
        window of another length.
        """
        if self.temporal is None:
            return self._encode_one_tr(video, audio_codes, text)
        batch, k = video.shape[0], self.context_trs
        for name, tensor in (("video", video), ("audio_codes", audio_codes), ("text", text)):
            if tensor.dim() < 2 or tensor.shape[1] != k:
                raise ValueError(
                    f"{name} must be (B, {k}, ...) for model.context_trs={k} (the dataset's "
                    f"window), got shape {tuple(tensor.shape)}"
                )
        per_tr = self.per_tr_features(
            video.flatten(0, 1), audio_codes.flatten(0, 1), text.flatten(0, 1)
        )
        codes = self.trunk(per_tr).view(batch, k, -1)  # (B, k, bottleneck): one code per TR
        return (codes[:, -1], *self.fmri(self.temporal(codes, context_mask)))

    def fmri(self, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fMRI head on the (mixed) code (B, bottleneck) -> (B, V) and, with subject heads,
        the average subject (B, V) and every subject (B, S, V) instead."""
        if self.subjects is None:
            return self.fmri_head(code), None
        hidden = self.fmri_head.hidden(code)
        assert self.fmri_head.out is not None
        return self.subjects(hidden, self.fmri_head.out(hidden))

    def per_tr_features(
        self, video: torch.Tensor, audio_codes: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        """The three encoders on single TRs, concatenated: (N, F, H, W, 3), (N, n_q, C),
        (N, K, D) -> (N, fused) (fused = the encoders' last widths summed; 1,536 at 3.5B): what
        the trunk reads per TR, and what probes of the learned features read
        (bench/bench_context_seeds.py)."""
        return torch.cat(
            [self.video(video.flatten(1)), self.audio(audio_codes), self.text(text.flatten(1))],
            dim=1,
        )

    def _encode_one_tr(
        self, video: torch.Tensor, audio_codes: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        bottleneck = self.trunk(self.per_tr_features(video, audio_codes, text))
        return (bottleneck, *self.fmri(bottleneck))
