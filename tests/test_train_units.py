"""Trainer building blocks without a process group: schedule, early stopping, checkpoint folders,
DeepSpeed JSON validation, RNG capture."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from giblet_ds.config import cross_check, load_config
from giblet_ds.config.deepspeed_json import build_ds_config, load_ds_json, zero_stage
from giblet_ds.errors import CheckpointError, ConfigError
from giblet_ds.run import RunDir, resolve_resume, step_tag
from giblet_ds.train.early_stopping import EarlyStopping
from giblet_ds.train.rng import capture_rng_state, restore_rng_state
from giblet_ds.train.schedule import lr_at, make_scheduler
from tests.tiny_sizes import TINY_OVERRIDES, TINY_SIZES

REPO = Path(__file__).resolve().parent.parent
SCHEDULE = {"peak_lr": 1e-3, "warmup_steps": 4, "warmup_start_lr": 1e-5, "min_lr": 1e-6}


def test_lr_schedule_follows_the_formula() -> None:
    total = 14
    assert lr_at(0, total_steps=total, **SCHEDULE) == 1e-5
    assert lr_at(2, total_steps=total, **SCHEDULE) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 2 / 4)
    assert lr_at(4, total_steps=total, **SCHEDULE) == pytest.approx(1e-3)
    # half way through the cosine: the mid point of peak and floor
    assert lr_at(9, total_steps=total, **SCHEDULE) == pytest.approx((1e-3 + 1e-6) / 2)
    assert lr_at(14, total_steps=total, **SCHEDULE) == pytest.approx(1e-6)
    assert lr_at(99, total_steps=total, **SCHEDULE) == pytest.approx(1e-6)


def test_scheduler_steps_match_lr_at() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=123.0)
    scheduler = make_scheduler(optimizer, total_steps=14, **SCHEDULE)
    seen = []
    for _ in range(15):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [lr_at(s, total_steps=14, **SCHEDULE) for s in range(15)]
    assert seen == pytest.approx(expected, rel=1e-12)


def test_early_stopping_counts_validations_without_improvement() -> None:
    es = EarlyStopping(mode="max", patience=2, min_delta=0.01)
    assert es.update(0.10, step=1) is True
    assert es.update(0.105, step=2) is False  # inside min_delta
    assert not es.should_stop and es.patience_left == 1
    assert es.update(0.2, step=3) is True and es.patience_left == 2
    es.update(0.1, step=4)
    es.update(float("nan"), step=5)
    assert es.should_stop and es.best == 0.2 and es.best_step == 3
    restored = EarlyStopping(mode="max", patience=2, min_delta=0.01)
    restored.load_state_dict(es.state_dict())
    assert restored == es
    assert not EarlyStopping(mode="min", patience=0, min_delta=0).should_stop


def _make_tag(run: RunDir, step: int, complete: bool = True) -> Path:
    tag = run.tag_dir(step_tag(step))
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")  # what marks a ZeRO tag folder
    if complete:
        run.mark_complete(tag.name, step)
    return tag


def test_resume_resolution(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert resolve_resume("auto", run.path) is None
    _make_tag(run, 4)
    _make_tag(run, 6)
    incomplete = _make_tag(run, 8, complete=False)  # killed during the save

    def resumed(resume: str) -> Path | None:
        location = resolve_resume(resume, run.path)
        return None if location is None else location.path

    assert resumed("auto") == run.tag_dir("step-00000006")
    assert resumed("none") is None
    assert resumed(str(run.path)) == run.tag_dir("step-00000006")
    assert resumed(str(run.checkpoints)) == run.tag_dir("step-00000006")
    tag = run.tag_dir("step-00000004")
    assert resumed(str(tag)) == tag
    with pytest.raises(CheckpointError, match="incomplete .*newest complete tag is step-00000006"):
        resumed(str(incomplete))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as err:
        resumed(str(empty))
    assert str(err.value) == (
        f"--resume {empty}: {empty}: no checkpoint here (no ZeRO tag files, no checkpoints/ "
        "folder, no 'latest' file, no consolidated weights such as model.safetensors)"
    )
    with pytest.raises(CheckpointError, match="no such file or folder"):
        resumed(str(tmp_path / "missing"))


def test_prune_keeps_newest_complete_tags(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    for step in (2, 4, 6, 8):
        _make_tag(run, step)
    _make_tag(run, 5, complete=False)
    run.tag_dir("step-00000002-universal").mkdir()
    deleted = run.prune_step_tags(keep_last=2)
    assert not run.tag_dir("step-00000002-universal").exists()
    assert sorted(deleted) == ["step-00000002", "step-00000004", "step-00000005"]
    assert run.complete_step_tags() == ["step-00000006", "step-00000008"]


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_deepspeed_json_validates(path: Path) -> None:
    ds = load_ds_json(path)
    assert zero_stage(ds) in (2, 3)
    built = build_ds_config(load_config(REPO / "launch/configs/giblet_3p5b.yaml"), ds, world_size=8)
    assert built["train_batch_size"] == 16 and built["train_micro_batch_size_per_gpu"] == 2
    assert built["optimizer"]["params"]["lr"] == 1e-3
    if "bf16" in path.name:
        assert built["bf16"] == {"enabled": True, "check_grad_overflow": True}
        # Buckets must hold the 432,000 x 4,096 video matrix in one piece.
        assert built["zero_optimization"]["reduce_bucket_size"] >= 432_000 * 4_096


def _write_json(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return path


def test_deepspeed_json_errors_name_the_key_and_fix(tmp_path: Path) -> None:
    bad = {
        "zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.1}},
        "fp16x": {},
    }
    with pytest.raises(ConfigError) as err:
        load_ds_json(_write_json(tmp_path, bad))
    text = str(err.value)
    assert "unknown keys ['fp16x']" in text
    assert "zero_optimization.offload_param needs stage 3, got stage 2" in text
    assert "optimizer.params.lr belongs in the run config (optim.lr)" in text
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_ds_json(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_ds_json(tmp_path / "nope.json")


def test_batch_sizes_in_json_are_checked_never_overwritten(tmp_path: Path) -> None:
    cfg = load_config(REPO / "launch/configs/tiny.yaml")
    ds = {"train_batch_size": 64, "gradient_clipping": 0.5}
    with pytest.raises(ConfigError) as err:
        cross_check(cfg, world_size=2, store_sizes=TINY_SIZES, ds_config=ds)
    text = str(err.value)
    assert "DeepSpeed config sets train_batch_size=64 but the run config implies 4" in text
    assert "gradient_clipping=0.5 but optim.grad_clip=1.0" in text


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path: Path) -> None:
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_output_biases_start_at_the_training_means() -> None:
    from giblet_ds.model import GibletAutoencoder

    cfg = load_config(REPO / "launch/configs/tiny.yaml", TINY_OVERRIDES)
    model = GibletAutoencoder(cfg.model)
    video_mean = torch.linspace(0, 1, 180)
    model.init_weights(output_means={"video": video_mean, "fmri": torch.full((23,), 0.25)})
    assert model.decoder.video.out is not None and model.encoder.fmri_head.out is not None
    assert torch.equal(model.decoder.video.out.bias, video_mean)
    assert torch.equal(model.encoder.fmri_head.out.bias, torch.full((23,), 0.25))
    assert torch.count_nonzero(model.decoder.text.out.bias) == 0
