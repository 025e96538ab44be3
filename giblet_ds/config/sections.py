"""The run config's sections: one dataclass per concern, every field documented right under it.

Single-field checks live in ``__post_init__`` and name the dotted key, the bad value and the fix.
Checks that need several sections live in :mod:`giblet_ds.config.checks`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from giblet_ds.errors import ConfigError

__all__ = [
    "MODEL_INPUT_KEYS",
    "CheckpointConfig",
    "DataConfig",
    "EarlyStoppingConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
]

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


def _require(ok: bool, key: str, value: object, rule: str, fix: str = "") -> None:
    if not ok:
        message = f"{key} {rule}, got {value!r}"
        raise ConfigError(message + (f"; {fix}" if fix else ""))


def _positive_ints(key: str, values: Sequence[int]) -> None:
    _require(
        len(values) > 0 and all(isinstance(v, int) and v > 0 for v in values),
        key,
        list(values),
        "must be a non-empty list of positive integers",
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
    context_trs: int = 8
    """TRs the encoder sees per sample (k): store rows t-k+1..t, each embedded by the same
    modality encoders, then mixed over time before the bottleneck (docs/design.md, "Temporal
    context"). 1: one TR, the model as it was. A BOLD volume sums ~8-10 TRs of stimulus (HRF)."""

    def __post_init__(self) -> None:
        for key in MODEL_INPUT_KEYS:
            value = getattr(self, key)
            _require(
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
            _positive_ints(f"model.{key}", getattr(self, key))
        _require(
            isinstance(self.fmri_hidden, list) and all(v > 0 for v in self.fmri_hidden),
            "model.fmri_hidden",
            self.fmri_hidden,
            "must be a list of positive integers (may be empty)",
        )
        _require(self.bottleneck > 0, "model.bottleneck", self.bottleneck, "must be > 0")
        _require(self.codebook_size > 1, "model.codebook_size", self.codebook_size, "must be > 1")
        _require(
            self.audio_embed_dim > 0, "model.audio_embed_dim", self.audio_embed_dim, "must be > 0"
        )
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must be in [0, 1)")
        _require(
            not (self.seed_compat and self.activation_checkpointing),
            "model.activation_checkpointing",
            self.activation_checkpointing,
            "cannot be true with model.seed_compat (BatchNorm running statistics would be "
            "updated twice per step, a fault of the old system)",
            "set one of them to false",
        )
        _require(
            isinstance(self.context_trs, int) and self.context_trs >= 1,
            "model.context_trs",
            self.context_trs,
            "must be an integer >= 1",
        )
        _require(
            not (self.seed_compat and self.context_trs != 1),
            "model.context_trs",
            self.context_trs,
            "must be 1 with model.seed_compat (the old system saw one TR per sample)",
            "set model.context_trs=1 or model.seed_compat=false",
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


@dataclass
class DataConfig:
    """Where the features come from."""

    store: str = ""
    """Path of the HDF5 feature store built by tools/build_store.py (required to train)."""
    subject: int | None = None
    """Train on one subject's fMRI (index into the store's subjects); null: the cross-subject mean."""
    num_workers: int = 0
    """DataLoader worker processes per rank (each opens the store itself)."""
    reliable_isc_threshold: float = 0.1
    """Reliable voxels: mean pairwise inter-subject r on the training TRs above this. Validation
    (fmri_r_reliable, early stopping) and tools/evaluate.py score the model on them."""

    def __post_init__(self) -> None:
        _require(
            self.subject is None or self.subject >= 0,
            "data.subject",
            self.subject,
            "must be >= 0 or null",
        )
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")
        _require(
            -1.0 <= self.reliable_isc_threshold < 1.0,
            "data.reliable_isc_threshold",
            self.reliable_isc_threshold,
            "must be in [-1, 1) (a correlation)",
        )


@dataclass
class OptimConfig:
    """AdamW and the batch geometry."""

    lr: float = 1e-3
    """Peak learning rate (reached at the end of warmup)."""
    weight_decay: float = 1e-5
    """AdamW decoupled weight decay (not applied to norms, biases and embeddings)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping; 0 disables it."""
    micro_batch_size: int = 2
    """Samples per rank per forward pass."""
    grad_accum_steps: int = 1
    """Micro batches accumulated per optimizer step."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all ranks; if set, must equal micro x accum x world size."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _require(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            "optim.betas",
            self.betas,
            "must be two numbers in [0, 1)",
        )
        _require(self.eps > 0, "optim.eps", self.eps, "must be > 0")
        _require(
            self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0 (0 disables)"
        )
        _require(
            self.micro_batch_size > 0,
            "optim.micro_batch_size",
            self.micro_batch_size,
            "must be > 0",
        )
        _require(
            self.grad_accum_steps > 0,
            "optim.grad_accum_steps",
            self.grad_accum_steps,
            "must be > 0",
        )
        _require(
            self.global_batch_size is None or self.global_batch_size > 0,
            "optim.global_batch_size",
            self.global_batch_size,
            "must be > 0 or null",
        )

    @property
    def samples_per_rank_step(self) -> int:
        """Samples one rank consumes per optimizer step: micro batch x accumulation."""
        return self.micro_batch_size * self.grad_accum_steps

    def global_batch(self, world_size: int) -> int:
        """Samples per optimizer step over all ranks."""
        return self.samples_per_rank_step * world_size


@dataclass
class ScheduleConfig:
    """Learning rate per optimizer step: linear warmup, then cosine decay."""

    warmup_steps: int = 100
    """Optimizer steps of linear warmup from warmup_start_lr to optim.lr."""
    warmup_start_lr: float = 1e-5
    """Learning rate at step 0."""
    min_lr: float = 1e-6
    """Learning rate at the last step (end of the cosine)."""

    def __post_init__(self) -> None:
        _require(self.warmup_steps >= 0, "schedule.warmup_steps", self.warmup_steps, "must be >= 0")
        _require(
            self.warmup_start_lr >= 0,
            "schedule.warmup_start_lr",
            self.warmup_start_lr,
            "must be >= 0",
        )
        _require(self.min_lr >= 0, "schedule.min_lr", self.min_lr, "must be >= 0")


@dataclass
class LossConfig:
    """Weights of the modality-normalized loss terms (each term reads 1.0 for predicting the mean)."""

    fmri: float = 1.0
    """Weight of the fMRI term (MSE / training variance)."""
    video: float = 1.0
    """Weight of the video reconstruction term (MSE / training variance)."""
    audio: float = 1.0
    """Weight of the audio term (cross-entropy / log(codebook_size))."""
    text: float = 1.0
    """Weight of the text reconstruction term (MSE / training variance)."""

    def __post_init__(self) -> None:
        for key in ("fmri", "video", "audio", "text"):
            _require(getattr(self, key) >= 0, f"loss.{key}", getattr(self, key), "must be >= 0")
        _require(
            any(getattr(self, k) > 0 for k in ("fmri", "video", "audio", "text")),
            "loss",
            self,
            "needs at least one weight > 0",
        )

    def weights(self) -> dict[str, float]:
        return {"fmri": self.fmri, "video": self.video, "audio": self.audio, "text": self.text}


@dataclass
class EarlyStoppingConfig:
    """Stop when the validation metric stops improving; every rank takes the same decision."""

    metric: str = "fmri_r_reliable"
    """Validation metric: fmri_r_reliable (mean r on the reliable voxels, see
    data.reliable_isc_threshold), fmri_r_normalized (that r over their ceiling), fmri_r_mean,
    fmri_r_median, loss, or loss_<term>."""
    mode: str = "max"
    """max: larger is better; min: smaller is better."""
    patience: int = 20
    """Validations without improvement before stopping; 0 disables early stopping."""
    min_delta: float = 1e-4
    """Smallest change that counts as an improvement."""

    def __post_init__(self) -> None:
        valid = {"fmri_r_reliable", "fmri_r_normalized", "fmri_r_mean", "fmri_r_median", "loss"} | {
            f"loss_{t}" for t in ("fmri", "video", "audio", "text")
        }
        _require(
            self.metric in valid,
            "train.early_stopping.metric",
            self.metric,
            f"must be one of {sorted(valid)}",
        )
        _require(
            self.mode in ("max", "min"),
            "train.early_stopping.mode",
            self.mode,
            "must be max or min",
        )
        _require(self.patience >= 0, "train.early_stopping.patience", self.patience, "must be >= 0")
        _require(
            self.min_delta >= 0, "train.early_stopping.min_delta", self.min_delta, "must be >= 0"
        )


@dataclass
class TrainConfig:
    """Length of the run, validation cadence, and failure handling."""

    max_steps: int = 0
    """Optimizer steps to train; 0: use epochs."""
    epochs: int = 50
    """Passes over the training split (used when max_steps is 0)."""
    val_every_steps: int = 0
    """Validate every N optimizer steps; 0: at the end of every epoch."""
    seed: int = 1234
    """Seed of every random generator (python, numpy, torch), offset by rank where needed."""
    max_consecutive_skips: int = 5
    """Stop the run after this many optimizer steps in a row with a non-finite loss or gradient."""
    evaluate_split: str = "test"
    """When training ends (finished or early-stopped), evaluate ``best`` on this held-out split
    (test | val; none: skip) as tools/evaluate.py does: model, ridge baseline and ceiling on the
    same TRs and voxels, written to RUN_DIR/evaluation-<split>/ (rank 0)."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """Early stopping on a validation metric."""

    def __post_init__(self) -> None:
        _require(self.max_steps >= 0, "train.max_steps", self.max_steps, "must be >= 0")
        _require(self.epochs > 0, "train.epochs", self.epochs, "must be > 0")
        _require(
            self.val_every_steps >= 0, "train.val_every_steps", self.val_every_steps, "must be >= 0"
        )
        _require(
            self.max_consecutive_skips > 0,
            "train.max_consecutive_skips",
            self.max_consecutive_skips,
            "must be > 0",
        )
        _require(
            self.evaluate_split in ("test", "val", "none"),
            "train.evaluate_split",
            self.evaluate_split,
            "must be test, val or none",
        )


@dataclass
class CheckpointConfig:
    """Where and how often the run saves DeepSpeed checkpoints."""

    run_dir: str = "runs/giblet"
    """Run directory: config.resolved.yaml, metrics.jsonl, train.log, checkpoints/."""
    save_every_steps: int = 0
    """Save a step-NNNNNNNN tag every N optimizer steps; 0: at the end of every epoch."""
    keep_last: int = 3
    """Step tags kept (older ones are deleted; `best` is kept apart)."""
    resume: str = "auto"
    """auto: newest complete tag under run_dir/checkpoints (none: start fresh); none; or a path."""

    def __post_init__(self) -> None:
        _require(bool(self.run_dir), "checkpoint.run_dir", self.run_dir, "must be a directory path")
        _require(
            self.save_every_steps >= 0,
            "checkpoint.save_every_steps",
            self.save_every_steps,
            "must be >= 0",
        )
        _require(self.keep_last > 0, "checkpoint.keep_last", self.keep_last, "must be > 0")
        _require(
            bool(self.resume), "checkpoint.resume", self.resume, "must be auto, none or a path"
        )


@dataclass
class LoggingConfig:
    """Console, metrics.jsonl and wandb."""

    log_every_steps: int = 1
    """Write a train record to metrics.jsonl (and wandb) every N optimizer steps."""
    wandb_mode: str = "offline"
    """offline (no login; `wandb sync RUN_DIR/wandb/offline-run-*` later), online, or disabled."""
    wandb_project: str = "giblet-ds"
    """wandb project name."""
    wandb_run_name: str = ""
    """wandb run name; empty: the run directory's name."""
    progress_bar: bool = True
    """Rank 0 shows a progress bar per epoch."""

    def __post_init__(self) -> None:
        _require(
            self.log_every_steps > 0, "logging.log_every_steps", self.log_every_steps, "must be > 0"
        )
        _require(
            self.wandb_mode in ("offline", "online", "disabled"),
            "logging.wandb_mode",
            self.wandb_mode,
            "must be offline, online or disabled",
        )


@dataclass
class RunConfig:
    """One training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
