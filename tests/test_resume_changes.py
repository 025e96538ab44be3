"""Resumes with a changed setting, as users run them (one process, tiny preset, 22 steps): each
follows docs/resume.md. One run killed after step 4 (validated and saved every 2 steps, `best` on
the reliable-voxel r) is shared; each test resumes a copy of it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.train_harness import records, run_training

# tiny.yaml: lr 1e-2, warmup 2 steps from 1e-3, floor 1e-4; 23 train TRs / 2 = 11 steps per epoch.
BASE = ("checkpoint.save_every_steps=2", "train.val_every_steps=2")  # patience 0: never stops


@pytest.fixture(scope="module")
def killed_at_4(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    result = run_training(
        run_dir, tiny_store, world=1, sets=BASE, env={"GIBLET_FAULT_KILL_AT_STEP": "4"}
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-00000004"
    return run_dir


def _resume(killed: Path, tmp_path: Path, store: Path, *sets: str, **kw: Any) -> tuple[Path, Any]:
    run_dir = tmp_path / "run"
    shutil.copytree(killed, run_dir)
    return run_dir, run_training(run_dir, store, world=1, sets=(*BASE, *sets), **kw)


def _cosine(step: int, start: int, top: float, end: int, floor: float = 1e-4) -> float:
    """The lr of 0-based step ``step`` on a cosine from ``top`` at ``start`` to ``floor`` at
    ``end``, written out here rather than taken from giblet_ds.train.schedule."""
    progress = min(1.0, (step - start) / (end - start))
    return floor + (top - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _lrs(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in records(run_dir, "train")}


def test_a_new_lr_and_optimizer_settings_apply_from_the_first_resumed_step(
    killed_at_4: Path, tiny_store: Path, tmp_path: Path
) -> None:
    new = ("optim.lr=1e-3", "optim.weight_decay=0.5", "optim.betas=[0.8, 0.9]", "optim.eps=1e-6")
    run_dir, result = _resume(killed_at_4, tmp_path, tiny_store, *new)
    assert result.returncode == 0, result.stderr[-2000:]
    lrs = _lrs(run_dir)
    assert lrs[4] == pytest.approx(_cosine(3, 2, 1e-2, 22), rel=1e-12)  # before the kill
    # step k runs at the planned lr of 0-based step k - 1, now with the peak 1e-3 (was 10x it)
    for step in range(5, 23):
        assert lrs[step] == pytest.approx(_cosine(step - 1, 2, 1e-3, 22), rel=1e-9), step
    assert lrs[6] == pytest.approx(0.0009509529358847656, rel=1e-12)
    start = records(run_dir, "start")[-1]
    assert start["resume_changes"] == {
        "checkpoint.run_dir": [str(killed_at_4), str(run_dir)],  # a copy: the folder moved
        "optim.lr": [0.01, 0.001],
        "optim.weight_decay": [1e-05, 0.5],
        "optim.betas": [[0.9, 0.999], [0.8, 0.9]],
        "optim.eps": [1e-08, 1e-06],
    }
    optim = torch.load(
        run_dir / "checkpoints" / "step-00000022" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        map_location="cpu",
        weights_only=False,
    )["optimizer_state_dict"]["base_optimizer_state"]
    assert [(g["weight_decay"], tuple(g["betas"]), g["eps"]) for g in optim["param_groups"]] == [
        (0.5, (0.8, 0.9), 1e-6),
        (0.0, (0.8, 0.9), 1e-6),
    ]


def test_more_epochs_continue_the_cosine_from_the_lr_reached(
    killed_at_4: Path, tiny_store: Path, tmp_path: Path
) -> None:
    run_dir, result = _resume(killed_at_4, tmp_path, tiny_store, "train.epochs=4")
    assert result.returncode == 0, result.stderr[-2000:]
    lrs = _lrs(run_dir)
    reached = _cosine(4, 2, 1e-2, 22)  # the lr step 5 had in the 22-step plan
    for step in range(5, 45):
        assert lrs[step] == pytest.approx(_cosine(step - 1, 4, reached, 44), rel=1e-9), step
    assert lrs[5] == pytest.approx(0.009757729755661011, rel=1e-12)
    assert lrs[44] == pytest.approx(_cosine(43, 4, reached, 44), rel=1e-12)
    start = records(run_dir, "start")[-1]
    assert start["max_steps"] == 44
    assert start["resume_changes"] == {
        "checkpoint.run_dir": [str(killed_at_4), str(run_dir)],
        "train.epochs": [2, 4],
    }
    assert start["resume_notes"] == [
        "the cosine is re-planned from step 4 (lr 0.00975773) to schedule.min_lr at step 44"
    ]


def test_extending_a_finished_run_goes_on_at_the_floor(tiny_store: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run_training(run_dir, tiny_store, world=1, sets=("train.max_steps=4",)).returncode == 0
    result = run_training(run_dir, tiny_store, world=1, sets=("train.max_steps=10",))
    assert result.returncode == 0, result.stderr[-2000:]
    lrs = _lrs(run_dir)
    # was: step 5 at the old plan's last lr (1e-4), step 6 up at 6.9e-3 (the 10-step plan)
    assert [lrs[s] for s in range(5, 11)] == pytest.approx([1e-4] * 6, rel=1e-9)


def test_smaller_batches_with_epochs_end_after_the_last_epoch(
    killed_at_4: Path, tiny_store: Path, tmp_path: Path
) -> None:
    """Step 4 of 11 per epoch at 2 samples; at 1 sample per step the rest of epoch 0 is 15 steps
    and epoch 1 is 23: the run ends at step 42 (epochs x 23 = 46 went 4 steps into epoch 2)."""
    run_dir, result = _resume(killed_at_4, tmp_path, tiny_store, "optim.micro_batch_size=1")
    assert result.returncode == 0, result.stderr[-2000:]
    start, end = records(run_dir, "start")[-1], records(run_dir, "end")[-1]
    assert (start["max_steps"], end["step"], end["status"]) == (42, 42, "finished")
    assert max(r["epoch"] for r in records(run_dir, "train")) == 1
    assert _lrs(run_dir)[42] == pytest.approx(_cosine(41, 4, _cosine(4, 2, 1e-2, 22), 42))


def test_another_zero_stage_is_refused_by_name(
    killed_at_4: Path, tiny_store: Path, tmp_path: Path
) -> None:
    run_dir, result = _resume(killed_at_4, tmp_path, tiny_store, ds_config="zero3_fp32_cpu.json")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    tag = run_dir / "checkpoints" / "step-00000004"
    assert (
        f"error: cannot resume from {tag}: this run changes settings a resume cannot change:\n"
        "  - deepspeed.zero_optimization.stage: saved 2, now 3 (DeepSpeed 0.19.8 loads a ZeRO tag "
        "only into its own stage" in result.stderr
    )
    assert "resume with a DeepSpeed JSON of ZeRO stage 2" in result.stderr
    # nothing converted or written
    assert not list((run_dir / "checkpoints").glob("*universal*"))
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-00000004"


def test_a_shorter_run_than_the_saved_step_is_refused_before_anything_is_written(
    killed_at_4: Path, tiny_store: Path, tmp_path: Path
) -> None:
    resolved = (killed_at_4 / "config.resolved.yaml").read_text()
    run_dir, result = _resume(killed_at_4, tmp_path, tiny_store, "train.max_steps=3")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert (
        "error: train.max_steps=3 ends the run at step 3, before the resumed checkpoint's step 4: "
        "the run already trained past it." in result.stderr
    )
    # refused with the resume table's checks: the run's config and checkpoints as they were
    assert (run_dir / "config.resolved.yaml").read_text() == resolved
    assert not list((run_dir / "checkpoints").glob("*universal*"))
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-00000004"


def test_another_precision_is_refused_before_anything_is_loaded(
    killed_at_4: Path, tiny_store: Path, tmp_path: Path
) -> None:
    """fp32 tag, bf16 JSON: DeepSpeed would look for bf16 optimizer files the tag does not have
    (a FileNotFoundError traceback before the precision was compared)."""
    tag = killed_at_4 / "checkpoints" / "step-00000004"
    assert json.loads((tag / "metadata.json").read_text())["precision"] == "fp32"
    run_dir, result = _resume(killed_at_4, tmp_path, tiny_store, ds_config="zero2_bf16.json")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert (
        "  - deepspeed.precision: saved 'fp32', now 'bf16' (DeepSpeed 0.19.8 saves a bf16 run's "
        "ZeRO optimizer state in its own files" in result.stderr
    )
    assert "resume with a DeepSpeed JSON of fp32 precision" in result.stderr
    assert not list((run_dir / "checkpoints").glob("*universal*"))
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-00000004"


def test_a_new_early_stopping_metric_restarts_the_best(
    killed_at_4: Path, tiny_store: Path, tmp_path: Path
) -> None:
    saved = json.loads(
        (killed_at_4 / "checkpoints" / "best" / "metadata.json").read_text()
    )  # best on the reliable r
    run_dir, result = _resume(
        killed_at_4,
        tmp_path,
        tiny_store,
        "train.early_stopping.metric=loss",
        "train.early_stopping.mode=min",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    val = {r["step"]: r for r in records(run_dir, "val")}
    old_best = val[saved["step"]]["best_metric"]
    # the first validation after the resume is the first of the loss: the new best
    assert val[6]["is_best"] is True and val[6]["best_metric"] == val[6]["loss"] != old_best
    assert json.loads((run_dir / "checkpoints" / "best" / "metadata.json").read_text())["step"] >= 6
    start = records(run_dir, "start")[-1]
    assert start["resume_notes"] == [
        "early stopping restarted (train.early_stopping.metric: saved 'fmri_r_reliable', now "
        "'loss'; train.early_stopping.mode: saved 'max', now 'min'): the saved best "
        f"{old_best:.6g} at step {saved['step']} measured something else; the next validation "
        "sets the new best of loss and replaces the `best` tag"
    ]


def test_a_length_that_ends_before_the_saved_step_is_refused_by_name() -> None:
    from giblet_ds.config import load_config
    from giblet_ds.errors import ConfigError
    from giblet_ds.train.resume import run_length

    where = {"step": 6, "epoch": 2, "steps_left_in_epoch": 1, "steps_per_epoch": 3}
    assert run_length(load_config(None, ["train.max_steps=6"]), **where) == 6  # done: no error
    assert run_length(load_config(None, ["train.epochs=3"]), **where) == 7  # 6 + the 1 left
    with pytest.raises(ConfigError) as shorter:
        run_length(load_config(None, ["train.max_steps=4"]), **where)
    assert str(shorter.value).startswith(
        "train.max_steps=4 ends the run at step 4, before the resumed checkpoint's step 6: the "
        "run already trained past it."
    )
    with pytest.raises(ConfigError, match=r"^train\.epochs=2 ends the run at step 4, before"):
        run_length(load_config(None, ["train.epochs=2"]), **where)  # 6 + 1 + (2 - 1 - 2) * 3
