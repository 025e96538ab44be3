"""What a resume does with each changed setting: one table (key -> apply / convert / refuse) read by
one check that collects every refused change and raises once.

A resume compares the config saved with the tag (``run_config.yaml``, resolved) against this run's
resolved config, key by key, plus three settings that live outside the run config: the DeepSpeed
JSON's ZeRO stage and precision, and the world size (from the tag's ``metadata.json``). Every leaf
key of :class:`RunConfig` has a row (a test fails when a new key has none); ``docs/resume.md`` is this
table, checked by a test.

- **apply**: the new value takes effect from the first resumed step; nothing saved is changed.
- **convert**: the saved state is adapted to the new value (how: the row says).
- **refuse**: the resume stops before anything is loaded, naming the key, both values and the fix.

Every change that is applied or converted is listed in the start record (``resume_changes``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from giblet_ds.config.model_section import MODEL_INPUT_KEYS
from giblet_ds.config.sections import RunConfig
from giblet_ds.errors import CheckpointError

__all__ = [
    "RESUME_RULES",
    "PRECISION_KEY",
    "WORLD_SIZE_KEY",
    "ZERO_STAGE_KEY",
    "ResumePlan",
    "ResumeRule",
    "check_resume",
    "flat_config",
    "resume_table_markdown",
]

ZERO_STAGE_KEY = "deepspeed.zero_optimization.stage"
"""The DeepSpeed JSON's ZeRO stage (not a run config key): saved in the tag's metadata.json."""
PRECISION_KEY = "deepspeed.precision"
"""The DeepSpeed JSON's bf16 / fp16 / fp32 (not a run config key): saved in the tag's
metadata.json (older tags: bf16 when its optimizer files are DeepSpeed's bf16 ones)."""
WORLD_SIZE_KEY = "world_size"
"""Data-parallel ranks (not a run config key): saved in the tag's metadata.json."""


@dataclass(frozen=True)
class ResumeRule:
    """What a resume does when one setting differs from the saved one."""

    action: Literal["apply", "convert", "refuse"]
    what: str
    """What happens (apply, convert) or why it cannot (refuse), for users: docs/resume.md."""
    fix: str = ""
    """For refuse: what to do instead (the message's last words)."""


_NEW_RUN = "resume with the saved value (--set {key}={saved}), or start a new checkpoint.run_dir"
_WEIGHTS = ResumeRule(
    "refuse",
    "the weights' shapes or the model's arithmetic follow it: the saved weights do not fit",
    _NEW_RUN,
)
_STORE_SIZE = ResumeRule(
    "refuse",
    "an input size of the feature store (null: taken from it); another store is also refused "
    "by its build hash",
    _NEW_RUN,
)
_FREE = ResumeRule("apply", "changes no weight; used from the first resumed step")
_SCHEDULE = ResumeRule(
    "apply",
    "the learning rate of every resumed step follows the schedule with the new value (as if the "
    "run had been planned with it); the optimizer's saved lr is not used",
)
_OPTIM = ResumeRule(
    "apply",
    "set on the optimizer's parameter groups after the load (the saved groups carry the old "
    "value, which would otherwise silently win)",
)
_LENGTH = ResumeRule(
    "convert",
    "the run ends at the new length; the cosine is re-planned from the resumed step: it starts "
    "at the lr the run had reached there and decays to schedule.min_lr at the new last step (no "
    "jump; a finished run extended goes on at min_lr); a length that ends before the saved step "
    "is refused",
)
_LOSS_WEIGHT = ResumeRule(
    "apply",
    "the training loss of every resumed step uses the new weight; with "
    "train.early_stopping.metric=loss (the weighted sum) early stopping restarts: the saved best "
    "was another sum",
)
_EARLY_STOP_MEASURE = ResumeRule(
    "convert",
    "early stopping restarts: the saved best and patience measured something else; the next "
    "validation sets the new best (and replaces the `best` tag)",
)
_CADENCE = ResumeRule("apply", "takes effect from the first resumed step")
_BATCH = ResumeRule(
    "apply",
    "the rest of the epoch's samples (the saved position) are taken in the new batches; with "
    "train.epochs the run still ends after its last epoch (the step count and the schedule's end "
    "follow, see train.epochs)",
)

RESUME_RULES: dict[str, ResumeRule] = {
    **{f"model.{key}": _STORE_SIZE for key in MODEL_INPUT_KEYS},
    "model.seed_compat": _WEIGHTS,
    "model.codebook_size": _WEIGHTS,
    "model.video_hidden": _WEIGHTS,
    "model.audio_embed_dim": _WEIGHTS,
    "model.audio_hidden": _WEIGHTS,
    "model.text_hidden": _WEIGHTS,
    "model.trunk_hidden": _WEIGHTS,
    "model.bottleneck": _WEIGHTS,
    "model.fmri_hidden": _WEIGHTS,
    "model.decoder_hidden": _WEIGHTS,
    "model.video_decoder_hidden": _WEIGHTS,
    "model.audio_decoder_hidden": _WEIGHTS,
    "model.text_decoder_hidden": _WEIGHTS,
    "model.context_trs": _WEIGHTS,
    "model.context_end": _WEIGHTS,
    "model.dropout": _FREE,
    "model.n_subjects": _WEIGHTS,
    "model.subject_rank": _WEIGHTS,
    "model.subject_dropout": _FREE,
    "model.activation_checkpointing": _FREE,
    "model.context_init": ResumeRule(
        "apply", "only where the mixer starts: the resumed mixer's weights come from the tag"
    ),
    "data.store": ResumeRule(
        "apply", "the store may move: its build hash must match the saved one (checked)"
    ),
    "data.subject": ResumeRule(
        "refuse",
        "another target: the output biases, the loss's variances and the validation reference "
        "were set from the saved subject",
        _NEW_RUN,
    ),
    "data.target": ResumeRule(
        "refuse",
        "another target (the subject mean or each subject's own volumes): the fMRI outputs, the "
        "loss's variances and the validation reference were set from the saved one",
        _NEW_RUN,
    ),
    "data.split_runs": ResumeRule(
        "refuse",
        "another assignment of runs to splits: the steps so far trained on runs that would now "
        "be held out (and the training statistics came from the saved training runs)",
        _NEW_RUN,
    ),
    "data.smoothing_fwhm_mm": ResumeRule(
        "refuse",
        "other fMRI targets: the steps so far fitted the saved smoothing, and the evaluation's "
        "ridge baseline fits the one smoothing a run records",
        _NEW_RUN,
    ),
    "data.num_workers": _CADENCE,
    "data.reliable_isc_threshold": ResumeRule(
        "apply",
        "validation scores the new reliable voxels; with train.early_stopping.metric="
        "fmri_r_reliable or fmri_r_normalized early stopping restarts: the saved best was "
        "measured on other voxels",
    ),
    "optim.lr": _SCHEDULE,
    "optim.weight_decay": _OPTIM,
    "optim.betas": _OPTIM,
    "optim.eps": _OPTIM,
    "optim.grad_clip": ResumeRule(
        "apply", "DeepSpeed's gradient_clipping, from the first resumed step"
    ),
    "optim.micro_batch_size": _BATCH,
    "optim.grad_accum_steps": _BATCH,
    "optim.global_batch_size": ResumeRule(
        "apply", "a check of micro x accumulation x world size (as on a fresh start)"
    ),
    "schedule.warmup_steps": _SCHEDULE,
    "schedule.warmup_start_lr": _SCHEDULE,
    "schedule.min_lr": _SCHEDULE,
    "loss.fmri": _LOSS_WEIGHT,
    "loss.video": _LOSS_WEIGHT,
    "loss.audio": _LOSS_WEIGHT,
    "loss.text": _LOSS_WEIGHT,
    "train.max_steps": _LENGTH,
    "train.epochs": _LENGTH,
    "train.val_every_steps": _CADENCE,
    "train.seed": ResumeRule(
        "refuse",
        "the saved data order (the sampler's shuffle) and random streams follow the saved seed",
        _NEW_RUN,
    ),
    "train.max_consecutive_skips": _CADENCE,
    "train.evaluate_split": _CADENCE,
    "train.early_stopping.metric": _EARLY_STOP_MEASURE,
    "train.early_stopping.mode": _EARLY_STOP_MEASURE,
    "train.early_stopping.patience": ResumeRule(
        "apply", "the saved count of validations without improvement counts against it"
    ),
    "train.early_stopping.min_delta": ResumeRule(
        "apply", "the next validations are compared with the saved best by the new margin"
    ),
    "checkpoint.run_dir": ResumeRule(
        "apply", "resuming another run's tag (--resume PATH) here forks that run into this folder"
    ),
    "checkpoint.save_every_steps": _CADENCE,
    "checkpoint.keep_last": _CADENCE,
    "checkpoint.resume": ResumeRule("apply", "chooses the tag; nothing to compare"),
    "logging.log_every_steps": _CADENCE,
    "logging.wandb_mode": _CADENCE,
    "logging.wandb_project": _CADENCE,
    "logging.wandb_run_name": _CADENCE,
    "logging.progress_bar": _CADENCE,
    ZERO_STAGE_KEY: ResumeRule(
        "refuse",
        "DeepSpeed 0.19.8 loads a ZeRO tag only into its own stage: its ZeRO-3 loader looks for "
        "per-rank model files a stage 0-2 tag does not have, and its universal checkpoint "
        "(which converts a tag to another world size) does not convert between stages either",
        "resume with a DeepSpeed JSON of ZeRO stage {saved} (ds_configs/ holds stage 2 and 3 "
        "ones), or consolidate the weights (tools/zero_to_fp32.py) and start a new "
        "checkpoint.run_dir",
    ),
    PRECISION_KEY: ResumeRule(
        "refuse",
        "DeepSpeed 0.19.8 saves a bf16 run's ZeRO optimizer state in its own files "
        "(bf16_zero_pp_rank_*) that the fp32 and fp16 loaders do not read, and the reverse; the "
        "fp16 loss scaler has no fp32 counterpart",
        "resume with a DeepSpeed JSON of {saved} precision (ds_configs/ holds bf16 and fp32 "
        "ones; fp16: its fp16.enabled), or consolidate the weights (tools/zero_to_fp32.py) and "
        "start a new checkpoint.run_dir",
    ),
    WORLD_SIZE_KEY: ResumeRule(
        "convert",
        "the tag is converted once to DeepSpeed's universal checkpoint format and loaded; the "
        "rest of the epoch's order is split over the new ranks",
    ),
}


@dataclass
class ResumePlan:
    """What one resume changes: found by :func:`check_resume` before anything is loaded."""

    saved: RunConfig
    """The config saved with the tag."""
    changes: dict[str, list[Any]] = field(default_factory=dict)
    """Every setting applied or converted: dotted key -> [saved, now]."""
    restart_early_stopping: str | None = None
    """Why early stopping restarts (the saved best measured something else); None: it goes on."""


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """Every leaf of the run config by dotted key (``train.early_stopping.metric``)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = value

    walk(cfg, "")
    return out


def check_resume(
    saved: RunConfig,
    now: RunConfig,
    *,
    where: str,
    outside: Mapping[str, tuple[Any, Any]] | None = None,
) -> ResumePlan:
    """Compare ``now`` with the config ``saved`` at ``where`` (a tag) through
    :data:`RESUME_RULES`. ``outside``: settings beside the run config, key -> (saved, now), e.g.
    ``{ZERO_STAGE_KEY: (2, 3)}``; a None on either side means unknown and is not compared.

    Raises one CheckpointError listing every refused change (key, both values, why and the fix);
    otherwise returns the plan of the applied and converted changes."""
    before, after = flat_config(saved), flat_config(now)
    pairs = {key: (before[key], after[key]) for key in after}
    pairs.update({k: v for k, v in (outside or {}).items() if None not in v})
    plan = ResumePlan(saved)
    refused = []
    for key, (old, new) in pairs.items():
        if old == new:
            continue
        rule = RESUME_RULES.get(key)
        if rule is None:  # a test keeps the table complete; never let a gap pass silently
            raise CheckpointError(f"no resume rule for {key}; add one to RESUME_RULES")
        if rule.action == "refuse":
            fix = rule.fix.format(key=key, saved=_yaml(old))
            refused.append(f"{key}: saved {old!r}, now {new!r} ({rule.what}; {fix})")
        else:
            plan.changes[key] = [old, new]
    if refused:
        raise CheckpointError(
            f"cannot resume from {where}: this run changes settings a resume cannot change:\n  - "
            + "\n  - ".join(refused)
        )
    plan.restart_early_stopping = _early_stopping_restart(plan.changes, now)
    return plan


def _early_stopping_restart(changes: Mapping[str, list[Any]], now: RunConfig) -> str | None:
    """Why the saved best no longer measures what early stopping now compares, or None."""
    metric = now.train.early_stopping.metric
    reasons = [
        k for k in ("train.early_stopping.metric", "train.early_stopping.mode") if k in changes
    ]
    if metric in ("fmri_r_reliable", "fmri_r_normalized"):
        reasons += [k for k in ("data.reliable_isc_threshold",) if k in changes]
    if metric == "loss":
        reasons += [k for k in changes if k.startswith("loss.")]
    if not reasons:
        return None
    return "; ".join(f"{k}: saved {changes[k][0]!r}, now {changes[k][1]!r}" for k in reasons)


def _yaml(value: Any) -> str:
    """A value as --set takes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def resume_table_markdown() -> str:
    """The table of docs/resume.md (key, action, what happens), in the table's order."""
    lines = ["| setting | on resume | what happens |", "| --- | --- | --- |"]
    for key, rule in RESUME_RULES.items():
        what = rule.what + (f"; fix: {rule.fix.format(key=key, saved='SAVED')}" if rule.fix else "")
        lines.append(f"| `{key}` | {rule.action} | {what} |")
    return "\n".join(lines) + "\n"
