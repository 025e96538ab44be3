"""2-rank CPU training (gloo, fp32, tiny preset) through the real deepspeed launcher.

Each launch costs ~20-30 s, so runs are shared: one uninterrupted run per ZeRO stage is the
reference for the killed-and-resumed run of that stage (ZeRO-3's reduction order differs from
ZeRO-2's in the last bits, so each stage is compared with itself)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.train_harness import losses_by_step, records, run_training

pytestmark = pytest.mark.distributed

COMMON = (
    "train.max_steps=8",
    "checkpoint.save_every_steps=2",
    "checkpoint.keep_last=5",
    "train.val_every_steps=3",
)


_REFERENCES: dict[str, Path] = {}


def _reference(ds_config: str, factory: pytest.TempPathFactory, store: Path) -> Path:
    """Uninterrupted run of one ZeRO stage (built once per session), wandb offline."""
    if ds_config not in _REFERENCES:
        run_dir = factory.mktemp("reference") / "run"
        result = run_training(
            run_dir, store, ds_config=ds_config, sets=(*COMMON, "logging.wandb_mode=offline")
        )
        assert result.returncode == 0, result.stderr[-3000:]
        _REFERENCES[ds_config] = run_dir
    return _REFERENCES[ds_config]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, tiny_store: Path) -> Path:
    return _reference("zero2_fp32_cpu.json", tmp_path_factory, tiny_store)


def test_reference_run_logs_and_checkpoints(reference_run: Path) -> None:
    steps = losses_by_step(reference_run)
    assert sorted(steps) == list(range(1, 9))
    assert all(math.isfinite(loss) for loss, _ in steps.values())
    (end,) = records(reference_run, "end")
    assert end["status"] == "finished" and end["step"] == 8
    vals = records(reference_run, "val")
    assert [v["step"] for v in vals] == [3, 6]
    assert {"fmri_r_mean", "fmri_r_median", "fmri_r_frac_gt_0p1", "fmri_spatial_r"} <= set(vals[0])
    first = records(reference_run, "train")[0]
    assert first["devices"][0]["index"] == "cpu" and first["samples_per_s"] > 0
    ckpts = reference_run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-00000008"
    assert (ckpts / "best" / "complete").is_file()
    assert (ckpts / "step-00000008" / "run_config.yaml").is_file()
    assert (reference_run / "config.resolved.yaml").is_file()
    offline = list((reference_run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, "wandb offline run directory missing"


@pytest.mark.parametrize("ds_config", ["zero2_fp32_cpu.json", "zero3_fp32_cpu.json"])
def test_sigkill_then_resume_matches_uninterrupted_run(
    ds_config: str,
    tiny_store: Path,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    reference_run = _reference(ds_config, tmp_path_factory, tiny_store)
    run_dir = tmp_path / "run"
    killed = run_training(
        run_dir,
        tiny_store,
        ds_config=ds_config,
        sets=COMMON,
        env={"GIBLET_FAULT_KILL_AT_STEP": "5"},
    )
    assert killed.returncode != 0
    assert not records(run_dir, "end"), "a killed run must not write an end record"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-00000004"
    resumed = run_training(run_dir, tiny_store, ds_config=ds_config, sets=COMMON)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert records(run_dir, "start")[-1]["start_step"] == 4
    # Every logged loss and term, train and validation, bit for bit.
    assert losses_by_step(run_dir) == losses_by_step(reference_run)
    assert losses_by_step(run_dir, "val") == losses_by_step(reference_run, "val")


def test_nan_step_is_skipped_and_early_stopping_stops_every_rank(
    tiny_store: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = run_training(
        run_dir,
        tiny_store,
        sets=(
            "train.max_steps=20",
            "train.val_every_steps=2",
            "train.early_stopping.patience=2",
            "train.early_stopping.min_delta=1000",  # nothing after the first validation counts
        ),
        env={"GIBLET_FAULT_NAN_STEPS": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (skip,) = records(run_dir, "skip")
    assert skip["step"] == 3 and set(skip["terms"]) == {"fmri", "video", "audio", "text"}
    train = {r["step"]: r for r in records(run_dir, "train")}
    assert train[2]["skipped_steps"] == 0 and train[4]["skipped_steps"] == 1
    # The skipped step did not advance the schedule.
    assert train[4]["lr"] == train[3]["lr"]
    (end,) = records(run_dir, "end")
    assert end["status"] == "early_stopped" and end["step"] == 6
    assert "did not improve by 1000" in end["reason"]
    # Both ranks stopped together: the launcher saw two clean exits, and no NaN reached a weight.
    assert result.stdout.count("exits successfully") == 2
    state = torch.load(
        run_dir / "checkpoints" / "step-00000006" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,
    )
    assert all(torch.isfinite(t).all() for t in state["module"].values())


def test_universal_resume_on_one_rank(
    reference_run: Path, tiny_store: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    (run_dir / "metrics.jsonl").unlink()
    result = run_training(
        run_dir,
        tiny_store,
        world=1,
        sets=(*COMMON[1:], "train.max_steps=10", "logging.wandb_mode=disabled"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step-00000008-universal" / "complete").is_file()
    (start,) = records(run_dir, "start")
    assert start["start_step"] == 8 and start["world_size"] == 1
    steps = losses_by_step(run_dir)
    assert sorted(steps) == [9, 10]
    assert all(math.isfinite(loss) for loss, _ in steps.values())
