"""The run config's sections: one dataclass per concern, every field documented right under it.

Single-field checks live in ``__post_init__`` and name the dotted key, the bad value and the fix.
Checks that need several sections live in :mod:`giblet_ds.config.checks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from giblet_ds.config.model_section import ModelConfig
from giblet_ds.config.rules import require

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "EarlyStoppingConfig",
    "LoggingConfig",
    "LossConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "TARGETS",
    "TrainConfig",
]

TARGETS = ("mean", "subjects")
"""Values of ``data.target``."""


@dataclass
class DataConfig:
    """Where the features come from."""

    store: str = ""
    """Path of the HDF5 feature store built by tools/build_store.py (required to train)."""
    subject: int | None = None
    """Train on one subject's fMRI (index into the store's subjects); null: the cross-subject mean."""
    target: str = "mean"
    """What the fMRI output is trained on. "mean": the mean of the z-scored subjects (or
    data.subject). "subjects": every subject's own volume, through subject heads on the shared
    model (model.n_subjects), the loss normalized per subject; the average subject predicts the
    mean (docs/design.md, "Subject heads"). "mean" stays the default until measured."""
    num_workers: int = 0
    """DataLoader worker processes per rank (each opens the store itself)."""
    reliable_isc_threshold: float = 0.1
    """Reliable voxels: mean pairwise inter-subject r on the training TRs above this. Validation
    (fmri_r_reliable, early stopping) and tools/evaluate.py score the model on them."""
    smoothing_fwhm_mm: float = 0.0
    """Gaussian smoothing of the training fMRI targets inside the brain mask, FWHM in mm (0:
    none). The loss compares against the smoothed volumes; every r (validation, early stopping,
    tools/evaluate.py) is computed against the unsmoothed fMRI, and the ridge baseline fits the
    same smoothed training targets (docs/design.md, "Smoothed training targets")."""
    split_runs: dict[str, list[str]] | None = None
    """Train on another assignment of a ``split_by: run`` store's runs to splits:
    ``{train: [ids], val: [ids], test: [ids]}``, every run exactly once (val and test may name
    the same single run, cut in time), as the build's ``split_runs``. One leave-one-run-out fold
    holds out one run as its test (docs/store.md, "Leave-one-run-out"). The store's training
    statistics are then computed on these training runs. null: the store's own splits."""

    def __post_init__(self) -> None:
        require(
            self.subject is None or self.subject >= 0,
            "data.subject",
            self.subject,
            "must be >= 0 or null",
        )
        require(self.target in TARGETS, "data.target", self.target, f"must be one of {TARGETS}")
        require(
            isinstance(self.smoothing_fwhm_mm, int | float)
            and not isinstance(self.smoothing_fwhm_mm, bool)
            and 0.0 <= self.smoothing_fwhm_mm < 50.0,
            "data.smoothing_fwhm_mm",
            self.smoothing_fwhm_mm,
            "must be a number of mm in [0, 50) (0: no smoothing)",
        )
        require(
            not (self.target == "subjects" and self.subject is not None),
            "data.subject",
            self.subject,
            "must be null with data.target=subjects (every subject is a target)",
            "set data.subject=null, or data.target=mean to train on one subject",
        )
        require(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")
        require(
            self.split_runs is None
            or (
                isinstance(self.split_runs, dict)
                and set(self.split_runs) <= {"train", "val", "test"}
                and all(
                    isinstance(ids, list) and all(isinstance(i, str) for i in ids)
                    for ids in self.split_runs.values()
                )
            ),
            "data.split_runs",
            self.split_runs,
            "must be null or a mapping of train, val, test to lists of run ids",
            "e.g. --set 'data.split_runs={train: [run-1], val: [run-2], test: [run-3]}'",
        )
        require(
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
        require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        require(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            "optim.betas",
            self.betas,
            "must be two numbers in [0, 1)",
        )
        require(self.eps > 0, "optim.eps", self.eps, "must be > 0")
        require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0 (0 disables)")
        require(
            self.micro_batch_size > 0,
            "optim.micro_batch_size",
            self.micro_batch_size,
            "must be > 0",
        )
        require(
            self.grad_accum_steps > 0,
            "optim.grad_accum_steps",
            self.grad_accum_steps,
            "must be > 0",
        )
        require(
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
        require(self.warmup_steps >= 0, "schedule.warmup_steps", self.warmup_steps, "must be >= 0")
        require(
            self.warmup_start_lr >= 0,
            "schedule.warmup_start_lr",
            self.warmup_start_lr,
            "must be >= 0",
        )
        require(self.min_lr >= 0, "schedule.min_lr", self.min_lr, "must be >= 0")


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
            require(getattr(self, key) >= 0, f"loss.{key}", getattr(self, key), "must be >= 0")
        require(
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
    data.reliable_isc_threshold), fmri_r_normalized (that r over their ceiling; needs >= 2
    subjects), fmri_r_mean, fmri_r_median, loss, or loss_<term> (a term with a loss weight > 0:
    validation logs no other; a run refuses it when it resolves its config). With subject heads
    the fMRI metrics score the average subject against the subject mean."""
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
        require(
            self.metric in valid,
            "train.early_stopping.metric",
            self.metric,
            f"must be one of {sorted(valid)}",
        )
        require(
            self.mode in ("max", "min"),
            "train.early_stopping.mode",
            self.mode,
            "must be max or min",
        )
        require(self.patience >= 0, "train.early_stopping.patience", self.patience, "must be >= 0")
        require(
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
        require(self.max_steps >= 0, "train.max_steps", self.max_steps, "must be >= 0")
        require(self.epochs > 0, "train.epochs", self.epochs, "must be > 0")
        require(
            self.val_every_steps >= 0, "train.val_every_steps", self.val_every_steps, "must be >= 0"
        )
        require(
            self.max_consecutive_skips > 0,
            "train.max_consecutive_skips",
            self.max_consecutive_skips,
            "must be > 0",
        )
        require(
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
        require(bool(self.run_dir), "checkpoint.run_dir", self.run_dir, "must be a directory path")
        require(
            self.save_every_steps >= 0,
            "checkpoint.save_every_steps",
            self.save_every_steps,
            "must be >= 0",
        )
        require(self.keep_last > 0, "checkpoint.keep_last", self.keep_last, "must be > 0")
        require(bool(self.resume), "checkpoint.resume", self.resume, "must be auto, none or a path")


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
        require(
            self.log_every_steps > 0, "logging.log_every_steps", self.log_every_steps, "must be > 0"
        )
        require(
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
