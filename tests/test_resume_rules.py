"""What a resume does with each changed setting: the table covers every config key, docs/resume.md
is the table, the check names every refused change at once, and the schedule re-plan's numbers
(giblet_ds.config.resume_rules, giblet_ds.train.schedule)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from giblet_ds.config import RunConfig, config_to_dict, load_config
from giblet_ds.config.resume_rules import (
    PRECISION_KEY,
    RESUME_RULES,
    WORLD_SIZE_KEY,
    ZERO_STAGE_KEY,
    check_resume,
    flat_config,
    resume_table_markdown,
)
from giblet_ds.errors import CheckpointError
from giblet_ds.train.early_stopping import EarlyStopping
from giblet_ds.train.engine import set_optimizer_settings
from giblet_ds.train.resume import saved_schedule
from giblet_ds.train.schedule import Schedule, make_scheduler, set_schedule

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "launch" / "configs" / "tiny.yaml"


def test_every_config_key_has_a_resume_rule() -> None:
    keys = set(flat_config(RunConfig()))
    assert keys == set(_leaves(config_to_dict(RunConfig())))  # what config.resolved.yaml holds
    assert len(keys) == 70
    missing = sorted(keys - set(RESUME_RULES))
    assert missing == [], f"add a row to giblet_ds/config/resume_rules.py for {missing}"
    assert set(RESUME_RULES) - keys == {ZERO_STAGE_KEY, PRECISION_KEY, WORLD_SIZE_KEY}


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return out


def test_docs_resume_md_holds_the_table() -> None:
    """docs/resume.md shows the table as the code has it (regenerate the block when this fails:
    python -c 'from giblet_ds.config.resume_rules import resume_table_markdown as t; print(t())')."""
    text = (REPO / "docs" / "resume.md").read_text()
    assert resume_table_markdown() in text


def test_refused_changes_are_named_together_with_both_values_and_the_fix() -> None:
    saved = load_config(TINY)
    now = load_config(TINY, ["model.bottleneck=7", "train.seed=5", "optim.lr=1e-3"])
    with pytest.raises(CheckpointError) as caught:
        check_resume(saved, now, where="RUN/step-4", outside={ZERO_STAGE_KEY: (2, 3)})
    assert str(caught.value) == (
        "cannot resume from RUN/step-4: this run changes settings a resume cannot change:\n"
        "  - model.bottleneck: saved 6, now 7 (the weights' shapes or the model's arithmetic "
        "follow it: the saved weights do not fit; resume with the saved value (--set "
        "model.bottleneck=6), or start a new checkpoint.run_dir)\n"
        "  - train.seed: saved 1234, now 5 (the saved data order (the sampler's shuffle) and "
        "random streams follow the saved seed; resume with the saved value (--set "
        "train.seed=1234), or start a new checkpoint.run_dir)\n"
        "  - deepspeed.zero_optimization.stage: saved 2, now 3 (DeepSpeed 0.19.8 loads a ZeRO tag "
        "only into its own stage: its ZeRO-3 loader looks for per-rank model files a stage 0-2 "
        "tag does not have, and its universal checkpoint (which converts a tag to another world "
        "size) does not convert between stages either; resume with a DeepSpeed JSON of ZeRO "
        "stage 2 (ds_configs/ holds stage 2 and 3 ones), or consolidate the weights "
        "(tools/zero_to_fp32.py) and start a new checkpoint.run_dir)"
    )


def test_applied_changes_are_listed_and_unknowns_not_compared() -> None:
    saved = load_config(TINY)
    now = load_config(
        TINY, ["optim.lr=1e-3", "optim.betas=[0.8, 0.9]", "model.dropout=0.2", "train.epochs=4"]
    )
    outside = {WORLD_SIZE_KEY: (2, 1), ZERO_STAGE_KEY: (None, 3)}  # a tag without metadata
    plan = check_resume(saved, now, where="T", outside=outside)
    assert plan.changes == {
        "model.dropout": [0.0, 0.2],
        "optim.lr": [0.01, 0.001],
        "optim.betas": [[0.9, 0.999], [0.8, 0.9]],
        "train.epochs": [2, 4],
        WORLD_SIZE_KEY: [2, 1],
    }
    assert plan.restart_early_stopping is None
    assert check_resume(saved, saved, where="T").changes == {}


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (
            ["train.early_stopping.metric=loss", "train.early_stopping.mode=min"],
            "train.early_stopping.metric: saved 'fmri_r_reliable', now 'loss'; "
            "train.early_stopping.mode: saved 'max', now 'min'",
        ),
        (["data.reliable_isc_threshold=0.3"], "data.reliable_isc_threshold: saved 0.1, now 0.3"),
        (["loss.video=0.5"], None),  # the r on the reliable voxels does not weigh the loss
        (["train.early_stopping.patience=4"], None),
    ],
)
def test_early_stopping_restarts_when_its_metric_measures_something_else(
    overrides: list[str], reason: str | None
) -> None:
    plan = check_resume(load_config(TINY), load_config(TINY, overrides), where="T")
    assert plan.restart_early_stopping == reason


def test_a_loss_weight_restarts_early_stopping_on_the_loss() -> None:
    saved = load_config(TINY, ["train.early_stopping.metric=loss", "train.early_stopping.mode=min"])
    now = load_config(
        TINY,
        ["train.early_stopping.metric=loss", "train.early_stopping.mode=min", "loss.video=0.5"],
    )
    plan = check_resume(saved, now, where="T")
    assert plan.restart_early_stopping == "loss.video: saved 1.0, now 0.5"


def test_early_stopping_restart_forgets_the_best() -> None:
    es = EarlyStopping(mode="min", patience=2, min_delta=0.0, best=0.089, best_step=4)
    es.bad_validations = 1
    es.restart()
    assert (math.isnan(es.best), es.best_step, es.bad_validations) == (True, -1, 0)
    assert es.update(3.5, step=6) is True and es.best == 3.5


def _cosine(step: int, start: int, top: float, floor: float, end: int) -> float:
    return floor + (top - floor) * 0.5 * (
        1 + math.cos(math.pi * min(1, (step - start) / (end - start)))
    )


def test_a_longer_run_re_plans_the_cosine_from_the_lr_it_reached() -> None:
    saved = Schedule(1e-2, 2, 1e-3, 1e-4, total_steps=22)
    longer = Schedule(1e-2, 2, 1e-3, 1e-4, total_steps=44).continuing(saved, step=4)
    reached = _cosine(4, 2, 1e-2, 1e-4, 22)  # 0.009757729755661011
    assert longer.decay_start == 4
    assert longer.lr(4) == pytest.approx(reached, rel=1e-12)
    for step in (5, 20, 43, 44, 50):
        assert longer.lr(step) == pytest.approx(_cosine(step, 4, reached, 1e-4, 44), rel=1e-12)
    # resumed again with the same length: the re-plan is kept (saved with the tag)
    again = Schedule(1e-2, 2, 1e-3, 1e-4, total_steps=44).continuing(longer, step=30)
    assert again == longer
    # a new peak scales the re-planned cosine; the floor stays
    scaled = Schedule(1e-3, 2, 1e-3, 1e-4, total_steps=44).continuing(longer, step=30)
    assert scaled.lr(30) == pytest.approx(_cosine(30, 4, reached / 10, 1e-4, 44), rel=1e-12)


def test_a_length_change_inside_the_warmup_plans_the_new_length() -> None:
    saved = Schedule(1e-2, 4, 1e-3, 1e-4, total_steps=22)
    assert Schedule(1e-2, 4, 1e-3, 1e-4, 44).continuing(saved, step=3) == Schedule(
        1e-2, 4, 1e-3, 1e-4, 44
    )


def test_set_schedule_and_settings_override_what_a_load_brought_back() -> None:
    """What DeepSpeed's load does: the optimizer's groups and the scheduler's base lr come back
    from the checkpoint; set_schedule and set_optimizer_settings put this config's in place."""
    params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]

    def build(lr: float) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
        groups = [
            {"params": [params[0]], "weight_decay": 0.1},
            {"params": [params[1]], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
        return optimizer, make_scheduler(
            optimizer, peak_lr=lr, warmup_steps=2, warmup_start_lr=1e-3, min_lr=1e-4, total_steps=22
        )

    old_opt, old_sched = build(1e-2)
    for _ in range(4):
        old_opt.step()
        old_sched.step()
    new_opt, new_sched = build(1e-3)
    new_opt.load_state_dict(old_opt.state_dict())
    new_sched.load_state_dict(old_sched.state_dict())
    assert new_sched.base_lrs == [1e-2, 1e-2]  # the fault: the saved peak came back
    set_schedule(new_sched, Schedule(1e-3, 2, 1e-3, 1e-4, 22))
    cfg = load_config(TINY, ["optim.weight_decay=0.5", "optim.betas=[0.8, 0.9]", "optim.eps=1e-6"])
    set_optimizer_settings(new_opt.param_groups, cfg.optim)
    seen = []
    for _ in range(3):
        seen.append(new_opt.param_groups[0]["lr"])
        new_opt.step()
        new_sched.step()
    assert seen == pytest.approx([_cosine(s, 2, 1e-3, 1e-4, 22) for s in (4, 5, 6)], rel=1e-12)
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in new_opt.param_groups] == [
        (0.5, (0.8, 0.9), 1e-6),
        (0.0, (0.8, 0.9), 1e-6),
    ]


def test_a_tag_saved_before_the_schedule_was_gets_it_from_its_config() -> None:
    """Tags of earlier giblet-ds carry no schedule: the saved config, world size and sampler say
    what that run planned (23 TRs on 2 ranks: 11 each, 5 steps of 2, 2 epochs)."""
    saved = load_config(TINY)
    state = {"world_size": 2, "sampler": {"dataset_size": 23}}
    assert saved_schedule(state, saved) == Schedule(1e-2, 2, 1e-3, 1e-4, total_steps=10)
    planned = Schedule(1e-2, 2, 1e-3, 1e-4, total_steps=44, decay_start=4, decay_start_factor=0.5)
    assert saved_schedule({"schedule": planned.state_dict()}, saved) == planned


def test_another_precision_is_refused_and_old_bf16_tags_are_known_by_their_files(
    tmp_path: Path,
) -> None:
    from giblet_ds.config import precision
    from giblet_ds.train.checkpointer import saved_precision

    assert [precision(ds) for ds in ({}, {"bf16": {"enabled": True}},
            {"fp16": {"enabled": True}}, {"bf16": {"enabled": False}})] == [
        "fp32", "bf16", "fp16", "fp32"]  # fmt: skip
    cfg = load_config(TINY)
    with pytest.raises(CheckpointError) as caught:
        check_resume(cfg, cfg, where="RUN/step-4", outside={PRECISION_KEY: ("bf16", "fp32")})
    assert str(caught.value) == (
        "cannot resume from RUN/step-4: this run changes settings a resume cannot change:\n"
        "  - deepspeed.precision: saved 'bf16', now 'fp32' (DeepSpeed 0.19.8 saves a bf16 run's "
        "ZeRO optimizer state in its own files (bf16_zero_pp_rank_*) that the fp32 and fp16 "
        "loaders do not read, and the reverse; the fp16 loss scaler has no fp32 counterpart; "
        "resume with a DeepSpeed JSON of bf16 precision (ds_configs/ holds bf16 and fp32 ones; "
        "fp16: its fp16.enabled), or consolidate the weights (tools/zero_to_fp32.py) and start a "
        "new checkpoint.run_dir)"
    )
    # tags from before precision was recorded, by DeepSpeed's optimizer file names
    assert saved_precision(tmp_path, None, now="bf16") is None  # no optimizer files: unknown
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert saved_precision(plain, None, now="fp32") == "fp32"  # fp32 and fp16 share the names
    assert saved_precision(plain, None, now="fp16") == "fp16"
    assert saved_precision(plain, None, now="bf16") == "fp32 or fp16"  # refused against bf16
    (tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert saved_precision(tmp_path, None, now="fp32") == "bf16"
