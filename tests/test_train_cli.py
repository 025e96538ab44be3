"""launch/train.py as a user meets it: clear errors with exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.train_harness import REPO, TRAIN, losses_by_step, records, run_training


def _train(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TRAIN), *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    result = _train("--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert f"config file {tmp_path / 'nope.yaml'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_override_lists_valid_keys() -> None:
    result = _train("--set", "optim.learning_rate=1e-3", "--dry-run")
    assert result.returncode == 2
    assert (
        "unknown config key optim.learning_rate; valid keys under 'optim.': ['lr'," in result.stderr
    )


def test_dry_run_prints_exact_counts_without_allocating() -> None:
    result = _train("--dry-run", "--num-gpus", "8")
    assert result.returncode == 0, result.stderr
    assert "3,513,060,994" in result.stdout


def test_dry_run_of_a_preset_takes_its_sizes_from_the_store(
    tiny_store: Path, tmp_path: Path
) -> None:
    small = str(REPO / "launch" / "configs" / "small.yaml")
    result = _train("--config", small, "--set", f"data.store={tiny_store}", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        f"model input sizes from the store {tiny_store}: frames_per_tr=2, frame_height=6, "
        "frame_width=10, n_codebooks=2, code_frames=5, text_slots=2, text_dim=7, n_voxels=23\n"
    )
    missing = tmp_path / "missing.h5"
    result = _train("--config", small, "--set", f"data.store={missing}", "--dry-run")
    assert result.returncode == 2
    assert result.stderr.startswith(
        "error: model input sizes ['frames_per_tr', 'frame_height', 'frame_width', 'n_codebooks', "
        f"'code_frames', 'text_slots', 'text_dim', 'n_voxels'] are null and data.store={missing} "
        "does not exist: build it (tools/build_store.py;"
    )


def test_repeated_nonfinite_steps_stop_the_run(tiny_store: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_training(
        run_dir,
        tiny_store,
        world=1,
        sets=("train.max_consecutive_skips=2",),
        env={"GIBLET_FAULT_NAN_STEPS": "2,3"},
    )
    assert result.returncode == 2
    assert (
        "2 optimizer steps in a row had a non-finite loss or gradient, the last at step 3 "
        "(terms: audio, fmri, text, video)" in result.stderr
    )
    (end,) = records(run_dir, "end")
    assert end["status"] == "failed" and end["step"] == 3
    assert not (run_dir / "checkpoints" / "latest").exists(), "no checkpoint after NaN steps"


def test_resume_on_a_different_store_is_refused(
    tiny_store: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from giblet_ds.store import write_synthetic_store

    other = write_synthetic_store(tmp_path_factory.mktemp("other") / "other.h5", seed=1)
    run_dir = tmp_path / "run"
    first = run_training(run_dir, tiny_store, world=1, sets=("train.max_steps=2",))
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_training(run_dir, other, world=1, sets=("train.max_steps=4",))
    assert again.returncode == 2
    assert "was trained on a store with hash" in again.stderr
    assert "resume with the same store or start a new run directory" in again.stderr


def test_resume_path_without_checkpoint_is_named(tiny_store: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_training(
        tmp_path / "run", tiny_store, world=1, sets=(f"checkpoint.resume={empty}",)
    )
    assert result.returncode == 2
    assert f"--resume {empty}: {empty}: no checkpoint here" in result.stderr


def test_resume_from_an_end_of_epoch_checkpoint_starts_the_next_epoch(
    tiny_store: Path, tmp_path: Path
) -> None:
    """Default cadence: validate and save at each epoch's end (23 train TRs / 2 = 11 steps)."""
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    assert run_training(reference, tiny_store, world=1).returncode == 0
    killed = run_training(run_dir, tiny_store, world=1, env={"GIBLET_FAULT_KILL_AT_STEP": "11"})
    assert killed.returncode != 0
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-00000011"
    resumed = run_training(run_dir, tiny_store, world=1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # The epoch-0 validation is not repeated (it would count twice toward early stopping).
    vals = records(run_dir, "val")
    assert [r["step"] for r in vals] == [11, 22]
    # the leave-one-subject-out ceiling of the 5 validation TRs is logged beside the r
    assert -1 < vals[0]["fmri_noise_ceiling_r"] < 1
    assert vals[0]["fmri_noise_ceiling_r"] == records(run_dir, "start")[0]["fmri_noise_ceiling_r"]
    assert losses_by_step(run_dir) == losses_by_step(reference)
    assert losses_by_step(run_dir, "val") == losses_by_step(reference, "val")


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 600 kB tmpfs: room for one tag of the tiny preset (~310 kB), not two. Unmounted after."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)],
                           capture_output=True, text=True)  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mount.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_at_a_save_stops_with_one_line_and_the_same_command_resumes(
    tiny_store: Path, small_disk: Path
) -> None:
    """Was exit 1 and `RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos
    139712 vs 139616`. The second save is refused before writing (the first tag's size is
    known); after the disk grows, the same command resumes from the tag `latest` names."""
    import re

    run_dir = small_disk / "run"
    sets = ("train.max_steps=6", "checkpoint.save_every_steps=2", "checkpoint.keep_last=1")
    first = run_training(run_dir, tiny_store, world=1, sets=sets)
    assert first.returncode == 2, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    ckpts = run_dir / "checkpoints"
    message = (
        r"checkpoint step-00000004 not saved: it needs about 3\d\d\.\d kB \(the size of "
        rf"step-00000002\) in {re.escape(str(ckpts))} and that file system has 2\d\d\.\d kB free; "
        r"nothing was written. `latest` still names step-00000002, complete, and the same "
        r"command resumes from it. Fix: free space, lower checkpoint.keep_last, or set "
        r"checkpoint.run_dir on a larger disk"
    )
    assert re.fullmatch(f"error: {message}", first.stderr.strip().splitlines()[-1])
    (end,) = records(run_dir, "end")
    assert end["status"] == "failed" and end["step"] == 4 and re.fullmatch(message, end["reason"])
    assert (ckpts / "latest").read_text() == "step-00000002"

    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    again = run_training(run_dir, tiny_store, world=1, sets=sets)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["start_step"] for r in records(run_dir, "start")] == [0, 2]
    assert records(run_dir, "end")[-1]["status"] == "finished"
    assert (ckpts / "latest").read_text() == "step-00000006"


def test_early_stopping_on_an_untrained_term_exits_2_before_training(
    tiny_store: Path, tmp_path: Path
) -> None:
    result = run_training(
        tmp_path / "run",
        tiny_store,
        world=1,
        sets=("train.early_stopping.metric=loss_video", "loss.video=0"),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        "error: invalid run configuration:\n  - train.early_stopping.metric=loss_video but "
        "loss.video=0.0: validation logs loss_video only for a term with a weight > 0; set "
        "train.early_stopping.metric to loss or fmri_r_reliable, or loss.video > 0\n"
    ) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step
