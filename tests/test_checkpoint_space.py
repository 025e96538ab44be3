"""A checkpoint save on a full disk: refused before writing where the size is known, and a failed
write said in one line (tag, folder, space needed and free, the tag to resume from). Single
process, a stand-in engine; the real trainer on a small tmpfs is in tests/test_train_cli.py."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from giblet_ds import host
from giblet_ds.errors import CheckpointError
from giblet_ds.run import RunDir, resolve_checkpoint
from giblet_ds.train.checkpointer import Checkpointer

TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 3200 vs 3092"
FIX = "Fix: free space, lower checkpoint.keep_last, or set checkpoint.run_dir on a larger disk"


class _Engine:
    """What Checkpointer.save asks of a DeepSpeed engine; ``fail`` is raised after the model
    file is half written, as torch's writer does on a full disk."""

    dp_world_size = 1

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail

    def zero_optimization_stage(self) -> int:
        return 2

    def bfloat16_enabled(self) -> bool:
        return False

    def fp16_enabled(self) -> bool:
        return False

    def save_checkpoint(self, save_dir: str, *, tag: str, client_state: Any, save_latest: bool):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        if self.fail is not None:
            (folder / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 3092)
            raise self.fail
        torch.save({"w": torch.zeros(3000)}, folder / "mp_rank_00_model_states.pt")
        torch.save({"x": torch.zeros(1000)}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")


class _Usage(NamedTuple):
    total: int
    used: int
    free: int


def _saved_once(tmp_path: Path) -> tuple[RunDir, Checkpointer, int]:
    """A run with step-00000002 complete; returns its size in bytes."""
    run = RunDir(tmp_path / "run")
    ckpt = Checkpointer(run, keep_last=3)
    ckpt.save(_Engine(), "step-00000002", step=2, state={"step": 2}, config_yaml="a: 1\n")
    size = sum(p.stat().st_size for p in run.tag_dir("step-00000002").rglob("*") if p.is_file())
    return run, ckpt, size


def _free(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    monkeypatch.setattr(host.shutil, "disk_usage", lambda _: _Usage(10**9, 0, free))


def test_a_save_that_does_not_fit_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, ckpt, size = _saved_once(tmp_path)
    assert 20_000 < size < 21_000  # 16 kB of tensors, run config, metadata, manifest, marker
    _free(monkeypatch, 5_000)
    with pytest.raises(CheckpointError) as info:
        ckpt.save(_Engine(), "step-00000004", step=4, state={"step": 4}, config_yaml="a: 1\n")
    assert str(info.value) == (
        f"checkpoint step-00000004 not saved: it needs about {size / 1000:.1f} kB (the size of "
        f"step-00000002) in {run.checkpoints} and that file system has 5.0 kB free; nothing was "
        "written. `latest` still names step-00000002, complete, and the same command resumes "
        f"from it. {FIX}"
    )
    assert not run.staging_tag_dir("step-00000004").exists()
    assert resolve_checkpoint(run.path, prefer="latest").tag == "step-00000002"
    _free(monkeypatch, size)  # exactly enough
    ckpt.save(_Engine(), "step-00000004", step=4, state={"step": 4}, config_yaml="a: 1\n")
    assert run.latest_tag() == "step-00000004"


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (RuntimeError(TORCH_SHORT_WRITE), f"RuntimeError: {TORCH_SHORT_WRITE}"),
        (OSError(errno.ENOSPC, "No space left on device"),
         "OSError: [Errno 28] No space left on device"),
    ],
)  # fmt: skip
def test_a_failed_write_names_the_tag_the_folder_the_space_and_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException, reason: str
) -> None:
    """The first save's size is not known: the write fails instead, and is said as such."""
    run, ckpt, size = _saved_once(tmp_path)
    _free(monkeypatch, 0)
    # as if the space had looked fine before the save (the disk filled up during it)
    monkeypatch.setattr(
        "giblet_ds.train.checkpointer.space_problem", lambda *_: None, raising=False
    )
    with pytest.raises(CheckpointError) as info:
        ckpt.save(_Engine(error), "step-00000004", step=4, state={}, config_yaml="a: 1\n")
    assert str(info.value) == (
        f"checkpoint step-00000004 not saved: the disk is full writing into {run.checkpoints} "
        f"({reason}); it needs about {size / 1000:.1f} kB (the size of step-00000002), 0 B free "
        "now. `latest` still names step-00000002, complete, and the same command resumes from "
        f"it; the partial copy in {run.staging_tag_dir('step-00000004')} is removed at the next "
        f"start. {FIX}"
    )
    assert info.value.__cause__ is error
    assert resolve_checkpoint(run.path, prefer="latest").tag == "step-00000002"


def test_a_first_save_that_fails_and_a_failure_that_is_no_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunDir(tmp_path / "run")
    ckpt = Checkpointer(run, keep_last=3)
    _free(monkeypatch, 2_000_000)
    denied = PermissionError(errno.EACCES, "Permission denied", str(run.staging / "x"))
    with pytest.raises(CheckpointError) as info:
        ckpt.save(_Engine(denied), "step-00000002", step=2, state={}, config_yaml="a: 1\n")
    assert str(info.value).startswith(
        f"checkpoint step-00000002 not saved: a write failed writing into {run.checkpoints} "
        f"(Permission denied: {run.staging / 'x'}); its size is not known yet, 2.0 MB free now. "
        "No complete tag yet: the same command starts from scratch; the partial copy"
    )
    bug = RuntimeError("tensor of wrong device")  # not a write failure: left as it is
    with pytest.raises(RuntimeError, match="^tensor of wrong device$"):
        ckpt.save(_Engine(bug), "step-00000002", step=2, state={}, config_yaml="a: 1\n")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_metric_record_on_a_full_disk_names_the_file(tmp_path: Path) -> None:
    """An append to metrics.jsonl on a full disk was `OSError: [Errno 28] No space left on
    device`, naming no file (/dev/full fails every write with ENOSPC)."""
    from giblet_ds.errors import GibletError
    from giblet_ds.run.records import EndRecord
    from giblet_ds.train.run_log import RunLog

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.metrics.symlink_to("/dev/full")
    log = RunLog(run.path, enabled=True, wandb_mode="disabled", wandb_project="p",
                 wandb_run_name="", wandb_run_id="x", config={})  # fmt: skip
    with pytest.raises(GibletError) as info:
        log.write(EndRecord(step=3, status="failed", reason="x"))
    text = str(info.value)
    assert text.startswith(f"cannot append to {run.metrics} (No space left on device): ")
    assert text.endswith(
        " free on its file system. No complete tag yet: the same command starts from scratch. "
        f"{FIX}"
    )
