"""After DeepSpeed's load: make the resumed run follow this run's config, not the checkpoint's
(docs/resume.md; the table of what may change is giblet_ds.config.resume_rules).

DeepSpeed restores the optimizer's parameter groups (lr, betas, eps, weight decay) and the
scheduler's base lr from the tag. Those are the saved settings; a resume that changed them must
set them again, and a changed run length re-plans the cosine without a jump in the lr.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from giblet_ds.config import RunConfig
from giblet_ds.errors import ConfigError
from giblet_ds.train.engine import set_optimizer_settings
from giblet_ds.train.schedule import Schedule, set_schedule

__all__ = [
    "apply_resumed_settings",
    "check_resumed_length",
    "early_stopping_note",
    "replan_note",
    "run_length",
    "saved_schedule",
]


def run_length(
    cfg: RunConfig, *, step: int, epoch: int, steps_left_in_epoch: int, steps_per_epoch: int
) -> int:
    """The run's last optimizer step as resumed: ``train.max_steps``, or with ``train.epochs`` the
    saved step + the steps left in its epoch + the later epochs, all at this run's batches. (The
    saved step count says nothing about a step's size: after a change of world size or batch,
    ``epochs x steps_per_epoch`` would end the run before or after its last epoch.)

    Raises ConfigError when the new length ends before the saved step: the weights already went
    past it, and ending there would report a run of that length that it is not."""
    if cfg.train.max_steps:
        length, key = cfg.train.max_steps, f"train.max_steps={cfg.train.max_steps}"
    else:
        length = step + steps_left_in_epoch + (cfg.train.epochs - 1 - epoch) * steps_per_epoch
        key = f"train.epochs={cfg.train.epochs}"
    if length < step:
        raise ConfigError(
            f"{key} ends the run at step {length}, before the resumed checkpoint's step {step}: "
            "the run already trained past it. Resume with a length of at "
            "least the saved step, or start a new run (another checkpoint.run_dir) to train "
            "a shorter one"
        )
    return length


def check_resumed_length(
    cfg: RunConfig, *, step: int, sampler: Any, sampler_state: dict[str, Any] | None
) -> None:
    """:func:`run_length` from a tag's metadata (its step and sampler position), before anything
    is loaded or converted, so a length ending before the saved step is refused (ConfigError)
    while nothing has been touched. ``sampler``: this run's fresh ResumableDistributedSampler
    (left unchanged). Without a saved position only ``train.max_steps`` can be checked here; a
    length in epochs is then checked after loading."""
    per_step = cfg.optim.samples_per_rank_step
    if sampler_state is None:
        if cfg.train.max_steps:
            run_length(cfg, step=step, epoch=0, steps_left_in_epoch=0, steps_per_epoch=0)
        return
    probe = copy.deepcopy(sampler)
    steps_per_epoch = probe.num_samples // per_step
    probe.load_state_dict(sampler_state)
    run_length(
        cfg,
        step=step,
        epoch=probe.epoch,
        steps_left_in_epoch=len(probe) // per_step,
        steps_per_epoch=steps_per_epoch,
    )


def saved_schedule(state: dict[str, Any], saved: RunConfig) -> Schedule:
    """The schedule the saved run followed: saved with the tag, or (tags written before it was)
    rebuilt from the saved config, world size and sampler as that run planned it."""
    if "schedule" in state:
        return Schedule.from_state(state["schedule"])
    total = saved.train.max_steps
    if not total:
        per_rank = state["sampler"]["dataset_size"] // int(state["world_size"])  # drop_last
        total = saved.train.epochs * (per_rank // saved.optim.samples_per_rank_step)
    return Schedule.of(saved, total)


def apply_resumed_settings(engine: Any, cfg: RunConfig, schedule: Schedule) -> None:
    """Set ``schedule`` on the engine's scheduler and ``cfg.optim`` on its optimizer's groups
    (after ``engine.load_checkpoint``, which brought back the saved ones)."""
    set_schedule(engine.lr_scheduler, schedule)
    set_optimizer_settings(engine.optimizer.param_groups, cfg.optim)


def early_stopping_note(saved: dict[str, Any], metric: str, reason: str) -> str:
    """The start record's note when a resume restarts early stopping."""
    best = float(saved["best"])
    was = "no best yet" if math.isnan(best) else f"best {best:.6g} at step {saved['best_step']}"
    return (
        f"early stopping restarted ({reason}): the saved {was} measured something else; the "
        f"next validation sets the new best of {metric} and replaces the `best` tag"
    )


def replan_note(before: Schedule, after: Schedule) -> str | None:
    """The start record's note when a resume re-planned the cosine (the run's length changed)."""
    if after.decay_start == before.decay_start and after.total_steps == before.total_steps:
        return None
    if after.decay_start <= after.warmup_steps:
        return f"the cosine is planned over {after.total_steps} steps (it had not begun)"
    return (
        f"the cosine is re-planned from step {after.decay_start} (lr "
        f"{after.lr(after.decay_start):.6g}) to schedule.min_lr at step {after.total_steps}"
    )
