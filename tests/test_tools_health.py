"""tools/health_report.py on hand-written finished/crashed/running runs and on a real trainer run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from giblet_ds.report.health import build_health_report
from tests.test_tools_common import build_real_run, load_tool

health_report = load_tool("health_report")
T0 = 1_800_000_000.0  # a fixed clock: reports are compared as text


@pytest.fixture(scope="session")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp() / "real_run_fixture"
    base.mkdir(exist_ok=True)
    return build_real_run(base)


def _gpus(temp: float) -> list[dict[str, Any]]:
    return [
        {"index": i, "util_pct": 97.0, "mem_used_gb": 44.1, "mem_total_gb": 49.1,
         "temp_c": temp + i}
        for i in range(2)
    ]  # fmt: skip


def _write_run(
    run_dir: Path,
    *,
    train_losses: list[list[float | str]],
    val: list[tuple[float, float]],  # (val loss, fmri r) per epoch
    end: str | None,
    skips: tuple[int, ...] = (),
    fmri_term: float = 0.8,
    constant_term: float | None = 1.3,
    torn_tail: bool = False,
) -> None:
    """A metrics.jsonl as the trainer writes it: 4 steps per epoch, one validation per epoch."""
    run_dir.mkdir(parents=True)
    spe = len(train_losses[0])
    counts = {"encoder": 3_235_947_138, "decoder": 264_241_152, "total": 3_500_188_290}
    config = {"optim": {"lr": 1e-3, "micro_batch_size": 2, "grad_accum_steps": 1},
              "data": {"store": str(run_dir / "absent.h5")}}  # fmt: skip
    recs: list[dict[str, Any]] = [
        {"kind": "start", "time": T0, "world_size": 2, "config": config, "param_counts": counts,
         "steps_per_epoch": spe, "max_steps": spe * 10, "store": "absent.h5",
         "store_hash": "abc", "device": "NVIDIA H100", "peak_flops": 989e12}
    ]  # fmt: skip
    step, t = 0, T0
    for epoch, losses in enumerate(train_losses):
        for loss in losses:
            step += 1
            t += 5.0
            if step in skips:
                recs.append({"kind": "skip", "step": step, "time": t, "terms": ["video"],
                             "consecutive": 1})  # fmt: skip
                continue
            recs.append({"kind": "train", "step": step, "epoch": epoch, "time": t, "loss": loss,
                         "terms": {"fmri": fmri_term, "video": 0.9}, "lr": 1e-3 * (step / 40),
                         "grad_norm": 1.0, "skipped_steps": sum(s <= step for s in skips),
                         "step_time_s": 5.0, "samples_per_s": 0.8, "mfu": 0.02,
                         "memory": {"rss_gb": 30.0, "gpu_allocated_gb": 40.0,
                                    "gpu_max_allocated_gb": 44.0},
                         "devices": _gpus(53.0)})  # fmt: skip
        if epoch < len(val):
            vloss, r = val[epoch]
            recs.append({"kind": "val", "step": step, "epoch": epoch, "time": t + 1, "loss": vloss,
                         "terms": {"fmri": fmri_term, "video": 0.9}, "fmri_r_mean": r,
                         "fmri_r_median": r / 2, "fmri_r_frac_gt_0p1": 0.25,
                         "fmri_spatial_r": 0.1, "fmri_r_reliable": 2 * r, "fmri_n_reliable": 7,
                         "fmri_noise_ceiling_r": 0.5, "fmri_r_normalized": 4 * r,
                         "fmri_constant_term": constant_term, "is_best": True, "best_metric": r,
                         "patience_left": 20})  # fmt: skip
    if end:
        recs.append({"kind": "end", "time": t + 2, "step": step, "status": end,
                     "reason": "reached max_steps=12" if end == "finished" else "stop"})  # fmt: skip
    text = "".join(json.dumps(r) + "\n" for r in recs)
    if torn_tail:
        text += '{"kind": "train", "step": 99, "los'
    (run_dir / "metrics.jsonl").write_text(text)
    last = recs[-1]["time"]
    os.utime(
        run_dir / "metrics.jsonl", (last, last)
    )  # the file was last written with its last record


def test_finished_run_report(tmp_path: Path) -> None:
    run = tmp_path / "finished"
    _write_run(run, train_losses=[[4.0, 3.8, 3.6, 3.4], [3.2, 3.0, 2.9, 2.7], [2.6, 2.5, 2.4, 2.3]],
               val=[(3.5, 0.05), (3.0, 0.12), (2.6, 0.2)], end="finished")  # fmt: skip
    report = build_health_report(run, now=T0 + 3600)
    md = report.markdown()
    assert report.status == "finished" and report.verdict == "HEALTHY", md
    assert "## Status: FINISHED — HEALTHY" in md
    # the r>0.1 fraction (no null during training) gave way to the reliable-voxel r
    assert "| 1 | 4 | 3.7000 | 3.5000 | 0.0500 | 0.0250 | 0.1000 | 1.00e-04 | 0.8 |" in md
    assert "| 3 | 4 | 2.4500 | 2.6000 | 0.2000 | 0.1000 | 0.4000 | 3.00e-04 | 0.8 |" in md
    notes = " ".join(c.note for c in report.checks)
    assert "reliable voxels (7) r 0.4000, ceiling there 0.5000" in notes
    assert "normalized r 0.800" in notes
    # fMRI term 0.8 against the constant's 1.3 on the same validation TRs
    assert "val fMRI term 0.8000 below the training-mean constant's 1.3000 on the same TRs" in notes
    assert "No evaluation yet" in md
    assert "GPU 0: 97% util, 44.1 GB / 49.1 GB (89.8%) | Temp: 53°C" in md
    assert "GPU 1: 97% util, 44.1 GB / 49.1 GB (89.8%) | Temp: 54°C" in md
    assert "- **Time per step**: 5.000 s" in md and "- **MFU**: 2.0%" in md
    assert "| **total** | **3,500,188,290** |" in md
    assert "- **Step**: 12 / 40 (30.0%)" in md
    assert "validation loss 3.5000 -> best 2.6000 (25.7% lower)" in md
    assert "Store `" in md and "not found here" in md  # an absent store is said, not hidden


def test_preempted_run_is_neither_crashed_nor_unhealthy(tmp_path: Path) -> None:
    run = tmp_path / "preempted"
    _write_run(run, train_losses=[[4.0, 3.8, 3.6, 3.4], [3.2, 3.0, 2.9, 2.7]],
               val=[(3.5, 0.05), (3.0, 0.12)], end="preempted")  # fmt: skip
    report = build_health_report(run, now=T0 + 3600)
    assert report.status == "preempted" and report.verdict == "HEALTHY", report.markdown()
    assert "## Status: PREEMPTED — HEALTHY" in report.markdown()
    (run_check,) = [c for c in report.checks if c.component == "Run"]
    assert run_check.level == "info"
    assert run_check.note.startswith("preempted: stop; it saved a complete tag at the step")


def test_crashed_run_with_nan_skips_and_near_zero_r(tmp_path: Path) -> None:
    run = tmp_path / "crashed"
    _write_run(run, train_losses=[[725.7, 720.7, 721.2, 722.0], [720.1, "nan", 721.0, 720.5]],
               val=[(566.57, -0.0005), (566.96, -0.0008)], end=None, skips=(3, 7),
               fmri_term=1.002, constant_term=0.98, torn_tail=True)  # fmt: skip
    report = build_health_report(run, now=T0 + 2 * 3600)
    md = report.markdown()
    assert report.status == "crashed" and report.verdict == "UNHEALTHY"
    assert "## Status: CRASHED — UNHEALTHY" in md
    assert "no end record and nothing written for" in md
    levels = {(c.component, c.level) for c in report.checks}
    assert ("Run", "fail") in levels and ("Numerics", "fail") in levels
    notes = " ".join(c.note for c in report.checks)
    assert "validation loss flat: first 566.5700, best 566.5700" in notes
    assert "near zero: mean per-voxel r -0.0008" in notes
    assert (
        "val fMRI term 1.0020: no better than the training-mean constant on the same TRs (0.9800)"
        in notes
    )
    assert "2 skipped step(s), first at step 3" in notes
    assert "- Skipped steps (non-finite loss or gradient): 3 (video), 7 (video)" in md
    assert "unreadable metrics.jsonl line(s) [12] skipped" in notes
    # the same records, read a minute after the last one: running, with an ETA
    running = build_health_report(run, now=T0 + 8 * 5.0 + 60)
    assert running.status == "running" and "- **ETA**: 2 min 40 s" in running.markdown()
    assert running.verdict != "HEALTHY"  # near-zero r is never healthy, even while running


def test_cli_writes_report_and_plot_of_a_real_run(real_run: Path, tmp_path: Path) -> None:
    md, png = tmp_path / "health.md", tmp_path / "loss.png"
    assert health_report.main([str(real_run), "--out", str(md), "--plot", str(png)]) == 0
    text = md.read_text()
    assert "## Status: FINISHED" in text and "| 2 |" in text  # the tiny preset runs 2 epochs
    latest = (real_run / "checkpoints" / "latest").read_text().strip()
    assert f"Audit of `{latest}`" in text and "0 error(s)" in text
    assert "z-scored per subject with training-TR statistics" in text  # store was read
    assert png.stat().st_size > 20_000
    assert health_report.main([str(tmp_path / "nope")]) == 2


def test_fmri_term_above_one_that_beats_the_constant_is_not_flagged(tmp_path: Path) -> None:
    """Held-out TRs drift from the training mean: the constant itself scores 1.27-1.60 there (the
    demo), so a term of 1.2 beats it; the old rule (warn above 1.0) flagged such a model."""
    run = tmp_path / "drift"
    _write_run(run, train_losses=[[4.0, 3.8, 3.6, 3.4], [3.2, 3.0, 2.9, 2.7]],
               val=[(3.5, 0.15), (3.0, 0.2)], end="finished", fmri_term=1.2,
               constant_term=1.45)  # fmt: skip
    report = build_health_report(run, now=T0 + 3600, audit=False)
    loss = [c for c in report.checks if c.component == "Loss"]
    assert [c.level for c in loss] == ["ok", "ok"], loss
    assert "below the training-mean constant's 1.4500" in loss[1].note
    # an older run without the constant's score: said, not judged against 1.0
    old = tmp_path / "old"
    _write_run(old, train_losses=[[4.0, 3.8, 3.6, 3.4], [3.2, 3.0, 2.9, 2.7]],
               val=[(3.5, 0.15), (3.0, 0.2)], end="finished", fmri_term=1.2,
               constant_term=None)  # fmt: skip
    notes = [c.note for c in build_health_report(old, now=T0 + 3600, audit=False).checks]
    assert (
        "val fMRI term 1.2000; the constant's score on the validation TRs was not logged (older run)"
        in notes
    )


def test_evaluation_table_and_checks(tmp_path: Path) -> None:
    run = tmp_path / "evaluated"
    _write_run(run, train_losses=[[4.0, 3.8, 3.6, 3.4], [3.2, 3.0, 2.9, 2.7]],
               val=[(3.5, 0.15), (3.0, 0.2)], end="finished")  # fmt: skip
    base = {"split": "test", "n_trs": 54, "ridge_r_normalized": None, "oracle_r": 0.3,
            "model_ev_fraction": None, "model_r_normalized": None, "ridge_term": 0.9,
            "frac_r_gt_0p1": {"fraction": 0.4, "null_mean": 0.2}}  # fmt: skip
    sets = {
        "all": {**base, "n_voxels": 1000, "model_r": 0.05, "ridge_r": 0.06, "ceiling_r": None,
                "constant_term": 1.4, "model_term": 1.1},
        "reliable": {**base, "n_voxels": 120, "model_r": 0.2, "ridge_r": 0.25, "ceiling_r": 0.5,
                     "model_r_normalized": 0.4, "constant_term": 1.5, "model_term": 1.6},
    }  # fmt: skip
    (run / "evaluation").mkdir()
    (run / "evaluation" / "evaluation.json").write_text(json.dumps(
        {"split": "test", "n_trs": 54, "target": "subject mean", "checkpoint": "best",
         "sets": sets, "ceiling": {"why": "the model predicts the subject mean"}}))  # fmt: skip
    report = build_health_report(run, now=T0 + 3600, audit=False)
    md = report.markdown()
    assert "|  | all (1,000 voxels) | reliable (120 voxels) |" in md
    assert "| model r | 0.0500 | 0.2000 |" in md
    assert "| ridge r (himalaya) | 0.0600 | 0.2500 |" in md
    assert "| ceiling r (sqrt reliability) | n/a | 0.5000 |" in md
    assert (
        "| voxels with model r > 0.1 (shift null) | 40.0% (null 20.0%) | 40.0% (null 20.0%) |" in md
    )
    evaluation = {(c.level, c.note) for c in report.checks if c.component == "Evaluation"}
    assert evaluation == {
        ("warn", "the ridge baseline on the store's inputs beats the model: r 0.2000 vs 0.2500 "
                 "(test split, reliable voxels (120))"),
        ("info", "model r is 40.0% of the ceiling 0.5000 (test split, reliable voxels (120))"),
        ("warn", "fMRI term 1.6000 is no better than the training-mean constant's 1.5000 on the "
                 "same TRs (test split, reliable voxels (120))"),
    }  # fmt: skip
    assert report.verdict != "HEALTHY"
    assert "| fMRI term, ridge | 0.9000 | 0.9000 |" in md
    assert "smoothed" not in md

    # a run trained on smoothed targets: the table says so, and the warning that the ridge wins
    # says the ridge fitted the same targets
    saved = json.loads((run / "evaluation" / "evaluation.json").read_text())
    saved["target_smoothing_fwhm_mm"] = 8.0
    (run / "evaluation" / "evaluation.json").write_text(json.dumps(saved))
    report = build_health_report(run, now=T0 + 3600, audit=False)
    assert (
        "Training targets were smoothed at FWHM 8 mm inside the mask (`data.smoothing_fwhm_mm`), "
        "for the network and the ridge alike" in report.markdown()
    )
    notes = {c.note for c in report.checks if c.component == "Evaluation"}
    assert (
        "the ridge baseline on the store's inputs, fitted on the same targets smoothed at 8 mm, "
        "beats the model: r 0.2000 vs 0.2500 (test split, reliable voxels (120))" in notes
    )


def test_an_evaluation_on_another_store_is_a_warning(tmp_path: Path) -> None:
    """tools/evaluate.py records a store that is not the training store; the report says so
    instead of showing its numbers as the model's score."""
    run = tmp_path / "evaluated"
    _write_run(run, train_losses=[[4.0, 3.8, 3.6, 3.4], [3.2, 3.0, 2.9, 2.7]],
               val=[(3.5, 0.15), (3.0, 0.2)], end="finished")  # fmt: skip
    note = "OTHER STORE: best was trained on store 15046108bb3a; b.h5 has the same mask"
    sets = {"all": {"split": "test", "n_trs": 54, "n_voxels": 10, "model_r": 0.027}}
    (run / "evaluation").mkdir()
    (run / "evaluation" / "evaluation.json").write_text(json.dumps(
        {"split": "test", "n_trs": 54, "target": "subject mean", "checkpoint": "best",
         "sets": sets, "store_match": {"verdict": "other store, same mask", "note": note}}))  # fmt: skip
    report = build_health_report(run, now=T0 + 3600, audit=False)
    assert f"**Warning**: {note}." in report.markdown()
    evaluation = [(c.level, c.note) for c in report.checks if c.component == "Evaluation"]
    assert evaluation == [("warn", note)]
