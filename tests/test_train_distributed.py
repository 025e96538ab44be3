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


def test_step_loss_is_the_global_batch_mean_on_any_world_size(
    reference_run: Path, tiny_store: Path, tmp_path: Path
) -> None:
    """Step 1 of the 2-rank reference (micro batch 2 per rank) and of one rank with micro batch 4
    train on the same 4 samples from the same weights: the logged loss and terms are that global
    batch's mean, not rank 0's own half (which read 1.739 against 4.800)."""
    run_dir = tmp_path / "one"
    sets = ("train.max_steps=1", "optim.micro_batch_size=4")
    result = run_training(run_dir, tiny_store, world=1, sets=sets)
    assert result.returncode == 0, result.stderr[-3000:]
    one_loss, one_terms = losses_by_step(run_dir)[1]
    two_loss, two_terms = losses_by_step(reference_run)[1]
    assert two_loss == pytest.approx(one_loss, rel=1e-5)
    assert set(two_terms) == set(one_terms) == {"fmri", "video", "audio", "text"}
    for name, value in one_terms.items():
        assert two_terms[name] == pytest.approx(value, rel=1e-5), name


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
    # Case 2(b): every complete tag, best included (re-saved by 1 rank when validation improved),
    # holds exactly the files of the world size its metadata names.
    ckpts = run_dir / "checkpoints"
    sizes = {
        t.name: _tag_files_match_metadata(t)["world_size"] for t in ckpts.glob("step-000000??")
    }
    assert sizes == {f"step-{s:08d}": 2 for s in (2, 4, 6, 8)} | {"step-00000010": 1}
    _tag_files_match_metadata(ckpts / "best")


# ------------------------------------------------------------------ issue 9: trustworthy tags


def _tag_files_match_metadata(tag_dir: Path) -> dict:
    """The tag's metadata, after checking its rank files are those of its world size only and
    its manifest verifies."""
    from giblet_ds.checkpoint import ZeroCheckpoint
    from giblet_ds.run.manifest import read_metadata, verify_manifest

    meta = read_metadata(tag_dir)
    assert meta is not None and (tag_dir / "complete").is_file()
    verify_manifest(tag_dir)
    with ZeroCheckpoint(tag_dir) as ckpt:  # refuses files of ranks beyond the world size
        assert ckpt.world_size == meta.world_size
    return meta.__dict__


def test_preempted_run_saves_exits_75_and_resumes_bit_identically(
    tiny_store: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Cases 5 and 6: SIGUSR1 reaches rank 0 only after step 5; both ranks stop there after a
    complete save, the end record says preempted, the exit code is 75, and the resumed run logs
    the reference's losses bit for bit, into the same wandb run (id kept in the run dir, not the
    folder's name: the reference's folder has the same name, 'run', and another id)."""
    reference_run = _reference("zero2_fp32_cpu.json", tmp_path_factory, tiny_store)
    run_dir = tmp_path / "run"
    sets = (*COMMON, "logging.wandb_mode=offline")
    preempted = run_training(
        run_dir, tiny_store, sets=sets, env={"GIBLET_FAULT_SIGNAL_AT_STEP": "5:USR1"}
    )
    assert preempted.returncode == 75, preempted.stderr[-3000:]
    (end,) = records(run_dir, "end")
    assert end["status"] == "preempted" and end["step"] == 5
    assert end["reason"].startswith("SIGUSR1 received: stopped after step 5")
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-00000005"
    meta = _tag_files_match_metadata(ckpts / "step-00000005")
    assert meta["world_size"] == 2 and meta["step"] == 5 and meta["zero_stage"] == 2
    # Case 7: the script beside the checkpoints is ours, DeepSpeed's wrapper uses it.
    assert "giblet_ds.checkpoint.zero_to_fp32" in (ckpts / "zero_to_fp32.py").read_text()
    assert "import zero_to_fp32" in (ckpts / "zero_to_torch.py").read_text()
    assert not list(ckpts.glob(".staging/*")), "nothing left in the staging folder"
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert run_id != (reference_run / "wandb_run_id").read_text().strip()

    resumed = run_training(run_dir, tiny_store, sets=sets)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert records(run_dir, "start")[-1]["start_step"] == 5
    assert losses_by_step(run_dir) == losses_by_step(reference_run)
    assert losses_by_step(run_dir, "val") == losses_by_step(reference_run, "val")
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(f"-{run_id}") for name in offline)


def test_resume_on_three_ranks_at_a_position_that_does_not_divide(
    tiny_store: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Cases 1 and 2(a): the 2-rank tag of step 2 (8 samples consumed, 8 % 3 != 0) resumed on 3
    ranks; the folder of step 4 already holds a stale rank-3 file of an interrupted save (and the
    staging folder another): the new step-4 tag replaces it whole, its world size comes from its
    metadata, and the tools read it."""
    reference_run = _reference("zero2_fp32_cpu.json", tmp_path_factory, tiny_store)
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    (run_dir / "metrics.jsonl").unlink()
    ckpts = run_dir / "checkpoints"
    for tag in ckpts.glob("step-*"):
        if tag.name != "step-00000002":
            shutil.rmtree(tag)
    (ckpts / "latest").write_text("step-00000002")
    stale = ckpts / "step-00000004"
    stale.mkdir()
    shutil.copy(ckpts / "step-00000002" / "mp_rank_00_model_states.pt", stale)
    (stale / "zero_pp_rank_3_mp_rank_00_optim_states.pt").write_bytes(b"stale")
    (ckpts / ".staging" / "step-00000004").mkdir(parents=True)
    (ckpts / ".staging" / "step-00000004" / "zero_pp_rank_2_mp_rank_00_optim_states.pt").touch()

    result = run_training(run_dir, tiny_store, world=3, sets=(*COMMON[1:], "train.max_steps=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (start,) = records(run_dir, "start")
    assert start["start_step"] == 2 and start["world_size"] == 3
    steps = losses_by_step(run_dir)
    assert sorted(steps) == [3, 4] and all(math.isfinite(loss) for loss, _ in steps.values())
    meta = _tag_files_match_metadata(ckpts / "step-00000004")
    assert meta["world_size"] == 3
    assert not (ckpts / "step-00000004" / "zero_pp_rank_3_mp_rank_00_optim_states.pt").exists()
    assert not list(ckpts.glob(".staging/*"))
    from giblet_ds.checkpoint import audit_path, convert_zero_checkpoint

    out = convert_zero_checkpoint(run_dir, tmp_path / "consolidated")
    assert out.tag_dir == ckpts / "step-00000004" and out.world_size == 3
    assert audit_path(run_dir).count("error") == 0


def test_resume_zero3_from_one_rank_on_two(tiny_store: Path, tmp_path: Path) -> None:
    """1 -> 2 ranks under ZeRO-3 (universal conversion of a ZeRO-3 tag)."""
    run_dir = tmp_path / "run"
    sets = ("checkpoint.save_every_steps=2", "train.val_every_steps=0", "train.max_steps=3")
    first = run_training(run_dir, tiny_store, ds_config="zero3_fp32_cpu.json", world=1, sets=sets)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _tag_files_match_metadata(run_dir / "checkpoints" / "step-00000003")["world_size"] == 1
    second = run_training(
        run_dir, tiny_store, ds_config="zero3_fp32_cpu.json", sets=(*sets[:2], "train.max_steps=5")
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert records(run_dir, "start")[-1]["start_step"] == 3
    steps = losses_by_step(run_dir)
    assert sorted(steps) == [1, 2, 3, 4, 5]
    assert all(math.isfinite(loss) for loss, _ in steps.values())
    meta = _tag_files_match_metadata(run_dir / "checkpoints" / "step-00000005")
    assert meta["world_size"] == 2 and meta["zero_stage"] == 3
