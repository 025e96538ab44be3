"""The giblet autoencoder: stimuli -> bottleneck -> fMRI, and bottleneck -> stimuli."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch
from torch import nn

from giblet_ds.config import ModelConfig
from giblet_ds.model.blocks import CheckpointFn, DenseBlock, DenseStack
from giblet_ds.model.context import TemporalMixer
from giblet_ds.model.decoder import GibletDecoder
from giblet_ds.model.encoder import AudioCodebook, GibletEncoder
from giblet_ds.model.subject_layers import SubjectLayers

__all__ = ["GibletAutoencoder", "GibletOutput", "GatherFn"]

# Context manager factory that makes a list of parameters whole and writable, e.g.
# deepspeed.zero.GatheredParameters(params, modifier_rank=0) under ZeRO-3. The model never imports
# deepspeed: the training layer passes this in.
GatherFn = Callable[[list[nn.Parameter]], AbstractContextManager[object]]


class GibletOutput(NamedTuple):
    """Model predictions for a batch of B TRs. A NamedTuple, not a dataclass: ZeRO-3's hooks find
    tensors inside tuples, not inside arbitrary objects."""

    fmri: torch.Tensor
    """(B, n_voxels) predicted BOLD: of the subject mean (with subject heads, the average
    subject's output), or of data.subject."""
    video: torch.Tensor
    """(B, H*W*3) the last frame of the TR window."""
    audio: torch.Tensor
    """(B, n_q, C, codebook_size) logits; (B, n_q*C) code values in seed_compat."""
    text: torch.Tensor
    """(B, K*D) annotation embeddings."""
    bottleneck: torch.Tensor
    """(B, bottleneck) TR t's code: what the decoder reads (and, at k = 1, the fMRI head; at
    k > 1 the fMRI head reads the window's codes mixed over time)."""
    fmri_subjects: torch.Tensor | None = None
    """(B, n_subjects, n_voxels) each subject's own prediction (model.n_subjects > 0; in training
    some are the average subject's: subject dropout); None without subject heads."""


class GibletAutoencoder(nn.Module):
    """Construction declares shapes only; :meth:`init_weights` sets every value.

    The same constructor runs on the meta device (counting, memory estimates), on a real device, and
    under ``deepspeed.zero.Init`` (ZeRO-3 partitions each tensor as it is built).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = GibletEncoder(cfg)
        self.decoder = GibletDecoder(cfg)

    def forward(
        self,
        video: torch.Tensor,
        audio_codes: torch.Tensor,
        text: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> GibletOutput:
        """Inputs as :meth:`GibletEncoder.forward` takes them (a window axis when k > 1); the
        outputs are for TR t, the window's last TR, whatever k is."""
        bottleneck, fmri, subjects = self.encoder(video, audio_codes, text, context_mask)
        video_out, audio_out, text_out = self.decoder(bottleneck, self.encoder.audio.codebook)
        return GibletOutput(
            fmri=fmri,
            video=video_out,
            audio=audio_out,
            text=text_out,
            bottleneck=bottleneck,
            fmri_subjects=subjects,
        )

    def stacks(self) -> Iterator[DenseStack]:
        """Every stack of blocks (the activation-checkpointing units)."""
        return (m for m in self.modules() if isinstance(m, DenseStack))

    def set_activation_checkpointing(self, checkpoint_fn: CheckpointFn | None) -> None:
        """Recompute each block in backward with ``checkpoint_fn`` (None turns it off)."""
        for stack in self.stacks():
            stack.checkpoint_fn = checkpoint_fn

    @torch.no_grad()
    def init_weights(
        self,
        gather: GatherFn | None = None,
        output_means: Mapping[str, torch.Tensor] | None = None,
        mixer_start: torch.Tensor | None = None,
    ) -> None:
        """Set every parameter and buffer. Rules, per tensor:

        - hidden Linear weights (followed by ReLU): normal, std sqrt(2 / fan_in) (He);
        - the bottleneck Linear (no activation): normal, std sqrt(1 / fan_in);
        - output Linear weights (fMRI, video, audio, text heads): zero, so the first predictions
          are the output biases and the first audio logits are uniform (a random start adds noise
          whose variance can exceed the target's: a text term of 7.5 at step 0 in the demo);
          their biases 0;
        - seed_compat Linear biases: 0;
        - norm scales 1, norm shifts 0; BatchNorm running mean 0, running var 1, counter 0;
        - audio code embeddings: normal, std 1;
        - subject heads (n_subjects > 0): each slot's residual into-weights normal with std
          sqrt(1 / fan_in), its out-weights and biases zero (SubjectLayers.reset_parameters):
          every subject and the average subject start as the shared readout;
        - temporal mixer (context_trs > 1): ``mixer_start``, (k,) per window slot, for every
          code dimension (the trainer passes a canonical HRF: giblet_ds.train.hrf_start); without
          it TR t alone (effective weight 1 on the last TR, 0 on the others), the one-TR model;
        - with ``output_means`` (training means of the targets, keys ``fmri``, ``video``,
          ``text``): those output biases start at the mean, so every normalized MSE term starts
          near 1.0 (predicting the mean) instead of mean^2 / var above it.

        ``gather`` makes partitioned parameters whole for the write (ZeRO-3); one module's own
        parameters at a time, so peak memory is one tensor, never the model.
        """
        gather = gather or (lambda params: contextlib.nullcontext())
        for module in self.modules():
            params = list(module.parameters(recurse=False))
            if not params:
                continue
            with gather(params):
                self._init_module(module)
        heads = {
            "fmri": self.encoder.fmri_head,
            "video": self.decoder.video,
            "text": self.decoder.text,
        }
        for name, mean in (output_means or {}).items():
            out = heads[name].out
            assert out is not None and out.bias is not None
            with gather([out.bias]):
                out.bias.copy_(mean.reshape(out.bias.shape))
        mixer = self.encoder.temporal
        if mixer_start is not None and mixer is not None:
            with gather([mixer.weight]):
                mixer.set_kernel(mixer_start)

    def _init_module(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            if self._is_output_linear(module):
                nn.init.zeros_(module.weight)
            else:
                gain = 2.0 if self._is_activated(module) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(gain / module.in_features))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm | nn.BatchNorm1d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm1d):
                module.reset_running_stats()
        elif isinstance(module, AudioCodebook):
            nn.init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, TemporalMixer | SubjectLayers):
            module.reset_parameters()

    def _is_output_linear(self, linear: nn.Linear) -> bool:
        return any(stack.out is linear for stack in self.stacks())

    def _is_activated(self, linear: nn.Linear) -> bool:
        for module in self.modules():
            if isinstance(module, DenseBlock) and module.linear is linear:
                return isinstance(module.activation, nn.ReLU)
        return False
