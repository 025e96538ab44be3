"""Memory per GPU for a run config, computed without allocating the model.

The model is built on the meta device (shapes only), so the 3.5B preset costs no memory here. Model
states (16-bit weights, gradients, fp32 master weights and Adam moments) come from DeepSpeed's own
ZeRO-2 / ZeRO-3 estimators: the count-taking functions that its ``*_all_cold`` helpers print from.
The ``*_all_live`` helpers are not used: they key parameters by ``data_ptr()``, which is 0 for every
meta tensor, so a meta model counts as one parameter tensor.

Activations are estimated from the model's layers at the configured micro-batch; the formula is in
:func:`activation_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from giblet_ds.config import ModelConfig, RunConfig
from giblet_ds.errors import ConfigError
from giblet_ds.model import GibletAutoencoder, format_counts, numel, parameter_counts
from giblet_ds.model.blocks import DenseBlock, DenseStack
from giblet_ds.model.counting import PER_TR_GROUPS

__all__ = [
    "ActivationEstimate",
    "MemoryEstimate",
    "ZeroSetup",
    "activation_bytes",
    "batch_bytes",
    "build_meta_model",
    "estimate",
    "format_estimate",
    "largest_layer",
]

GIB = 1024**3
ACT_BYTES = 2  # bf16 activations
FP32 = 4
INT64 = 8
# DeepSpeed's default head-room factor on its CPU figures (pinned buffers, loading copies).
CPU_BUFFER_FACTOR = 1.5


@dataclass(frozen=True)
class ZeroSetup:
    """One ZeRO stage and offload choice, with DeepSpeed's estimate of its model-state memory."""

    stage: int
    offload_optimizer: bool
    offload_param: bool
    gpu_bytes: int
    """Model states per GPU: 16-bit params, gradients, fp32 master params, Adam moments."""
    cpu_bytes: int
    """CPU memory per node (DeepSpeed's figure, including its 1.5x buffer factor)."""

    @property
    def label(self) -> str:
        offload = []
        if self.offload_optimizer:
            offload.append("optimizer")
        if self.offload_param:
            offload.append("params")
        suffix = f", offload {' + '.join(offload)} to CPU" if offload else ""
        return f"ZeRO-{self.stage}{suffix}"


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes saved for backward on one GPU at one micro-batch, in bf16 (see activation_bytes)."""

    micro_batch_size: int
    without_checkpointing: int
    with_checkpointing: int


@dataclass(frozen=True)
class MemoryEstimate:
    """What ``launch/train.py --dry-run`` and ``tools/estimate_memory.py`` print."""

    num_gpus: int
    """GPUs per node."""
    num_nodes: int
    seed_compat: bool
    param_counts: dict[str, int]
    """Per group (giblet_ds.model.PARAMETER_GROUPS), plus encoder, decoder and total."""
    largest_layer_name: str
    largest_layer_params: int
    """The largest single module's own parameters: ZeRO-3 gathers one such layer whole on a GPU."""
    activations: ActivationEstimate
    activation_checkpointing: bool
    """As configured (model.activation_checkpointing)."""
    zero: tuple[ZeroSetup, ...]

    @property
    def world_size(self) -> int:
        return self.num_gpus * self.num_nodes

    @property
    def total_params(self) -> int:
        return self.param_counts["total"]

    @property
    def configured_activation_bytes(self) -> int:
        """Activations at the configured checkpointing setting."""
        a = self.activations
        return a.with_checkpointing if self.activation_checkpointing else a.without_checkpointing


def build_meta_model(cfg: ModelConfig) -> GibletAutoencoder:
    """The model on the meta device: every tensor has a shape and no storage."""
    missing = cfg.missing_input_sizes()
    if missing:
        raise ConfigError(
            f"model input sizes {missing} are null; the memory estimate needs them: set them in "
            f"the model section (e.g. --set model.n_voxels=83138) or fill them from the store"
        )
    with torch.device("meta"):
        return GibletAutoencoder(cfg)


def largest_layer(model: nn.Module) -> tuple[str, int]:
    """The module with the most parameters of its own (not counting children), as DeepSpeed's
    ZeRO-3 estimator defines a layer."""
    best_name, best = "", 0
    for name, module in model.named_modules():
        n = sum(numel(p) for p in module.parameters(recurse=False))
        if n > best:
            best_name, best = name, n
    return best_name, best


def batch_bytes(cfg: ModelConfig) -> int:
    """Bytes of one sample as the loader delivers it (float32 video, text, fMRI; int64 codes).

    With ``context_trs`` = k the video, text and codes are k TRs each, plus the (k,) bool mask;
    with subject heads (``n_subjects`` = S > 0) the sample also holds S float32 volumes.
    """
    assert cfg.frames_per_tr and cfg.frame_height and cfg.frame_width and cfg.n_codebooks
    assert cfg.code_frames and cfg.text_slots and cfg.text_dim and cfg.n_voxels
    k = cfg.context_trs
    video = cfg.frames_per_tr * cfg.frame_height * cfg.frame_width * 3
    text = cfg.text_slots * cfg.text_dim
    stimulus = FP32 * (video + text) + INT64 * cfg.n_codebooks * cfg.code_frames
    mask = k if k > 1 else 0
    # data.target=subjects: every subject's volume beside the subject mean
    subjects = FP32 * cfg.n_subjects * cfg.n_voxels
    return k * stimulus + FP32 * cfg.n_voxels + subjects + mask


def activation_bytes(model: GibletAutoencoder, micro_batch_size: int) -> ActivationEstimate:
    """Bytes of tensors saved for backward, per GPU, at ``micro_batch_size`` samples, in bf16.

    Per sample, A = 2 bytes per bf16 element (B = micro-batch):

    - every DenseBlock i -> o (Linear, norm, ReLU, dropout) saves the Linear's input (A*i), the
      norm's input (A*o) and, for LayerNorm, its mean and rstd (2 fp32 = 8 bytes), the ReLU
      output (A*o, if activated) and the dropout mask (1 byte * o, bool, if dropout > 0);
      without dropout the ReLU output is the next Linear's input, counted once;
    - every output Linear of a stack saves its input (A*in), unless it is that ReLU output;
    - the loss saves the fp32 copy of each MSE prediction (4 bytes per element: fMRI voxels, one
      video frame H*W*3, text K*D; the targets are views of the batch); the default audio path
      saves the embedding indices (8 * n_q*C), the scoring queries (A * n_q*C*d) and the fp32
      log-softmax of the logits (4 * n_q*C*codebook_size); seed_compat saves its sigmoid outputs
      (A per video and audio output element) and the fp32 prediction and target of the code MSE
      (8 * n_q*C);
    - the batch itself (the loss keeps views of it): float32 video (4*F*H*W*3), int64 codes
      (8*n_q*C), float32 text (4*K*D), float32 fMRI (4*V);
    - with ``context_trs`` = k > 1: the per-TR encoders (video, audio, text stacks) run on k rows
      per sample, so everything they save, the code embedding indices and the batch's stimulus
      keys count k times (plus the k-byte window mask); so does the trunk, which makes one
      bottleneck code per TR; the temporal mixer saves its masked input (A*k*D, D the bottleneck
      width) and the mask cast to the activation dtype (A*k);
    - with subject heads (S = n_subjects > 0, rank r): the residual's low-rank codes (A*(S+1)*r,
      saved by the product onto the voxels; its other input, the head's last hidden layer, is
      the output Linear's input, counted there), the subject-dropout mask (S bytes), the loss's
      fp32 difference of the S subject predictions (4*S*V, saved by the square) and the batch's
      S volumes (4*S*V, in the batch).

    With activation checkpointing every DenseBlock keeps only its input (A*i); in backward one
    block at a time is recomputed, so the largest block's saved set other than its input (which
    is already kept) is added once.

    Totals are B times the per-sample sums. Not counted: the transient gradients of activations
    during backward (about one layer's activations), the CUDA context and allocator slack
    (typically 0.5-1.5 GB per GPU). A tensor read by several stacks (the bottleneck by the fMRI
    head and the decoder trunk, the decoder trunk's output by the three heads) is counted by each,
    so on a GPU this is a slight upper bound on what autograd keeps. CPU kernels differ (bf16
    LayerNorm statistics, a bf16 dropout mask), so there the figure is approximate.
    """
    cfg = model.config
    assert cfg.frames_per_tr and cfg.frame_height and cfg.frame_width and cfg.n_codebooks
    assert cfg.code_frames and cfg.text_slots and cfg.text_dim and cfg.n_voxels
    k = cfg.context_trs
    per_tr_stacks = {  # the modules that run once per TR of the window, as FLOPs count them
        id(m)
        for group in PER_TR_GROUPS
        for m in model.get_submodule(group).modules()
        if isinstance(m, DenseStack)
    }
    block_inputs = 0  # what checkpointing keeps per block
    block_full = 0  # what a block keeps without checkpointing
    recompute = 0  # the most one block adds while it is recomputed (its input is already kept)
    heads_plain = heads_checkpointed = 0  # inputs of the stacks' output Linears
    outside = 0  # loss and batch: the same with or without checkpointing
    for stack in (m for m in model.modules() if isinstance(m, DenseStack)):
        rows = k if id(stack) in per_tr_stacks else 1  # rows per sample through this stack
        output_kept = False  # the previous block's output is already saved (as its ReLU output)
        for block in stack.blocks:
            assert isinstance(block, DenseBlock)
            i, o = block.linear.in_features, block.linear.out_features
            relu = isinstance(block.activation, nn.ReLU)
            dropout = isinstance(block.dropout, nn.Dropout)
            own = ACT_BYTES * o  # the norm's input
            if isinstance(block.norm, nn.LayerNorm):
                own += 2 * FP32
            if relu:
                own += ACT_BYTES * o
            if dropout:
                own += o
            block_full += rows * (own + (0 if output_kept else ACT_BYTES * i))
            block_inputs += rows * ACT_BYTES * i
            recompute = max(recompute, rows * own)
            # Without dropout the ReLU output is the next Linear's input: one tensor, not two.
            output_kept = relu and not dropout
        if stack.out is not None:
            # Checkpointed blocks save nothing inside, so the output Linear's input always counts.
            heads_checkpointed += ACT_BYTES * stack.out.in_features
            if not output_kept:
                heads_plain += ACT_BYTES * stack.out.in_features

    frame = cfg.frame_height * cfg.frame_width * 3
    text = cfg.text_slots * cfg.text_dim
    codes = cfg.n_codebooks * cfg.code_frames
    outside += FP32 * (cfg.n_voxels + frame + text)  # fp32 predictions of the MSE terms
    if cfg.seed_compat:
        outside += ACT_BYTES * (frame + codes) + 2 * FP32 * codes
    else:
        outside += INT64 * codes * k + ACT_BYTES * codes * cfg.audio_embed_dim
        outside += FP32 * codes * cfg.codebook_size
    if model.encoder.temporal is not None:
        width = int(model.encoder.temporal.weight.shape[1])  # the bottleneck
        outside += ACT_BYTES * k * (width + 1)
    if model.encoder.subjects is not None:
        slots, rank = cfg.n_subjects + 1, cfg.subject_rank
        outside += ACT_BYTES * slots * rank + cfg.n_subjects + FP32 * cfg.n_subjects * cfg.n_voxels
    outside += batch_bytes(cfg)

    return ActivationEstimate(
        micro_batch_size=micro_batch_size,
        without_checkpointing=micro_batch_size * (block_full + heads_plain + outside),
        with_checkpointing=micro_batch_size
        * (block_inputs + recompute + heads_checkpointed + outside),
    )


def _zero_setups(total: int, largest: int, num_gpus: int, num_nodes: int) -> tuple[ZeroSetup, ...]:
    # Imported here: the estimate is the only reason this module touches deepspeed, and the model
    # layers must stay importable without it.
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    setups = []
    for offload in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total_params=total,
            num_gpus_per_node=num_gpus,
            num_nodes=num_nodes,
            cpu_offload=offload,
            additional_buffer_factor=CPU_BUFFER_FACTOR,
        )
        setups.append(ZeroSetup(2, offload, False, int(gpu), int(cpu)))
    # Parameter offload needs optimizer offload (DeepSpeed lists no params-only setup).
    for offload_optimizer, offload_param in ((False, False), (True, False), (True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params=total,
            largest_layer_params=largest,
            num_gpus_per_node=num_gpus,
            num_nodes=num_nodes,
            cpu_offload=offload_optimizer,
            cpu_offload_params=offload_param,
            zero_init=True,  # the trainer builds ZeRO-3 models under deepspeed.zero.Init
            additional_buffer_factor=CPU_BUFFER_FACTOR,
        )
        setups.append(ZeroSetup(3, offload_optimizer, offload_param, int(gpu), int(cpu)))
    return tuple(setups)


def estimate(cfg: RunConfig, num_gpus: int = 8, num_nodes: int = 1) -> MemoryEstimate:
    """Parameters per group and memory per GPU for ``num_gpus`` GPUs per node on ``num_nodes``."""
    if num_gpus < 1:
        raise ConfigError(f"num_gpus (per node) must be >= 1, got {num_gpus}")
    if num_nodes < 1:
        raise ConfigError(f"num_nodes must be >= 1, got {num_nodes}")
    model = build_meta_model(cfg.model)
    counts = parameter_counts(model)
    name, largest = largest_layer(model)
    return MemoryEstimate(
        num_gpus=num_gpus,
        num_nodes=num_nodes,
        seed_compat=cfg.model.seed_compat,
        param_counts=counts,
        largest_layer_name=name,
        largest_layer_params=largest,
        activations=activation_bytes(model, cfg.optim.micro_batch_size),
        activation_checkpointing=cfg.model.activation_checkpointing,
        zero=_zero_setups(counts["total"], largest, num_gpus, num_nodes),
    )


def _size(n: int) -> str:
    """GiB with two decimals; MiB below 1 GiB, where two decimals of GiB would read 0.00."""
    return f"{n / GIB:,.2f} GiB" if n >= GIB else f"{n / 1024**2:,.1f} MiB"


def format_estimate(est: MemoryEstimate) -> str:
    """A readable table of :class:`MemoryEstimate`."""
    arch = "seed_compat architecture" if est.seed_compat else "default architecture"
    gpus = f"{est.num_gpus} GPU{'s' if est.num_gpus > 1 else ''} per node"
    nodes = f"{est.num_nodes} node{'s' if est.num_nodes > 1 else ''}"
    act = est.activations
    configured = "with" if est.activation_checkpointing else "without"
    lines = [
        f"giblet model, {arch}: {est.total_params:,} parameters",
        *("  " + line for line in format_counts(est.param_counts).splitlines()),
        "",
        f"largest layer: {est.largest_layer_name}, {est.largest_layer_params:,} parameters",
        f"  (ZeRO-3 gathers it whole: {_size(4 * est.largest_layer_params)} of 16-bit weights "
        "and gradients per GPU)",
        "",
        f"activations per GPU at micro-batch {act.micro_batch_size} "
        "(bf16 tensors saved for backward):",
        f"  without activation checkpointing  {_size(act.without_checkpointing):>12}",
        f"  with activation checkpointing     {_size(act.with_checkpointing):>12}",
        f"  configured: {configured} (model.activation_checkpointing="
        f"{str(est.activation_checkpointing).lower()})",
        "",
        f"memory on {nodes} x {gpus} = {est.world_size} GPUs",
        "  model states per GPU: DeepSpeed's estimators; + activations: as configured;",
        f"  CPU per node: DeepSpeed's figure with its {CPU_BUFFER_FACTOR}x buffer factor",
        f"  {'setup':<42} {'model states':>12} {'+ activations':>14} {'CPU per node':>14}",
    ]
    for z in est.zero:
        total = z.gpu_bytes + est.configured_activation_bytes
        lines.append(
            f"  {z.label:<42} {_size(z.gpu_bytes):>12} {_size(total):>14} {_size(z.cpu_bytes):>14}"
        )
    return "\n".join(lines)
