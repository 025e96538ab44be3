"""Decoder: bottleneck -> shared widths -> one video frame, the audio codes, the text vector."""

from __future__ import annotations

import functools

import torch
from torch import nn

from giblet_ds.config import ModelConfig
from giblet_ds.model.blocks import DenseStack
from giblet_ds.model.encoder import AudioCodebook

__all__ = ["GibletDecoder"]


class GibletDecoder(nn.Module):
    """Reconstructs the stimuli from the bottleneck.

    Video: the last frame of the TR window (H x W x 3), linear output (sigmoid in seed_compat).
    Audio: per codebook and frame a query scored against the code embeddings (logits over the
    codebook); seed_compat: sigmoid x (codebook_size - 1) floats as the old system did.
    Text: the K x D annotation embeddings, linear output.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.frame_height and cfg.frame_width and cfg.n_codebooks and cfg.code_frames
        assert cfg.text_slots and cfg.text_dim
        stack = functools.partial(DenseStack, seed_compat=cfg.seed_compat, dropout=cfg.dropout)
        self.seed_compat = cfg.seed_compat
        self.codebook_size = cfg.codebook_size
        self.audio_shape = (cfg.n_codebooks, cfg.code_frames, cfg.audio_embed_dim)
        self.trunk = stack(cfg.bottleneck, cfg.decoder_hidden)
        width = cfg.decoder_hidden[-1]
        frame = cfg.frame_height * cfg.frame_width * 3
        self.video = stack(width, cfg.video_decoder_hidden, out_features=frame)
        audio_out = cfg.n_codebooks * cfg.code_frames
        if not cfg.seed_compat:
            audio_out *= cfg.audio_embed_dim
        self.audio = stack(width, cfg.audio_decoder_hidden, out_features=audio_out)
        self.text = stack(
            width, cfg.text_decoder_hidden, out_features=cfg.text_slots * cfg.text_dim
        )

    def forward(
        self, bottleneck: torch.Tensor, codebook: AudioCodebook | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (video (B, H*W*3), audio (B, n_q, C, codebook_size) logits or (B, n_q*C)
        values in seed_compat, text (B, K*D))."""
        hidden = self.trunk(bottleneck)
        video = self.video(hidden)
        audio = self.audio(hidden)
        if self.seed_compat:
            video = torch.sigmoid(video)
            audio = torch.sigmoid(audio) * (self.codebook_size - 1)
        else:
            assert codebook is not None
            audio = codebook(queries=audio.view(-1, *self.audio_shape))
        return video, audio, self.text(hidden)
