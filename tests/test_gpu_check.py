"""bench/gpu_check.sh --cpu: every stage of the GPU bring-up on the tiny preset, so the script a
GPU session runs in one call never rots. Values are read back from its JSON and recomputed here."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from tests.bench_modules import load_bench
from tests.tiny_sizes import TINY_SIZES

REPO = Path(__file__).resolve().parent.parent
TINY_PARAMS = 16_701  # tests/test_model.py: test_tiny_counts_pinned_and_by_hand
# Bytes one step moves per fp32 parameter, by hand: weights read in forward and backward (4 + 4),
# gradients written (4), fp32 master weights and two Adam moments read and written (2 x 3 x 4),
# weights rewritten (4).
FP32_FLOOR_BYTES = 4 + 4 + 4 + 2 * 3 * 4 + 4  # 40
STAGES = [
    "setup",
    "environment",
    "bandwidth",
    "store",
    "dry_run",
    "optimizer_op",
    "train_zero2_ac",
    "train_zero3_ac",
    "train_zero2_no_ac",
    "checkpoint",
    "consolidate",
    "audit",
]


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("gpu_check")
    out, work = base / "out", base / "work"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GIBLET_PYTHON")}
    env["GIBLET_PYTHON"] = sys.executable
    result = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu", "--out", str(out)]
        + ["--work-dir", str(work)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    report = json.loads((out / "gpu_check.json").read_text())
    return {"result": result, "report": report, "out": out, "work": work}


def _stages(check: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in check["report"]["stages"]}


def test_every_stage_passes_in_order(cpu_check: dict[str, Any]) -> None:
    result, report = cpu_check["result"], cpu_check["report"]
    failed = {s["name"]: s.get("error") or s.get("reason") for s in report["stages"]}
    assert result.returncode == 0, (failed, result.stderr[-3000:])
    assert [s["name"] for s in report["stages"]] == STAGES
    assert [s["status"] for s in report["stages"]] == ["ok"] * len(STAGES)
    assert report["ok"] is True and report["mode"] == "cpu" and report["weight_bytes"] == 4
    assert report["config"] == "launch/configs/tiny.yaml"


def test_environment_and_ceilings(cpu_check: dict[str, Any]) -> None:
    from importlib.metadata import version

    stages = _stages(cpu_check)
    env = stages["environment"]["result"]
    assert env["device"] == "cpu" and env["ds_accelerator"] == "cpu"
    assert env["deepspeed"] == version("deepspeed")
    assert env["torch"].split("+")[0] == version("torch").split("+")[0]
    bw = stages["bandwidth"]["result"]
    assert bw["copy_bytes"] == 64 * 2**20 and bw["matmul_n"] == 512
    assert bw["matmul_dtype"] == "float32"
    assert bw["bandwidth_bytes_per_s"] == pytest.approx(2 * 64 * 2**20 / bw["copy_median_s"])
    assert bw["matmul_flops_per_s"] == pytest.approx(2 * 512**3 / bw["matmul_median_s"])
    store = stages["store"]["result"]
    assert store["n_trs"] == 37 and store["model_input_sizes"] == TINY_SIZES
    dry = stages["dry_run"]["result"]
    assert dry["params"] == TINY_PARAMS
    assert set(dry["model_state_bytes"]) == {"2", "3"}


@pytest.mark.parametrize(
    ("name", "stage", "ac", "steps", "warmup", "launcher"),
    [
        ("train_zero2_ac", 2, True, 5, 2, "deepspeed --num_gpus 1"),
        ("train_zero3_ac", 3, True, 5, 2, "one process"),
        ("train_zero2_no_ac", 2, False, 3, 1, "one process"),
    ],
)
def test_training_runs_against_their_records_and_the_floor(
    cpu_check: dict[str, Any],
    name: str,
    stage: int,
    ac: bool,
    steps: int,
    warmup: int,
    launcher: str,
) -> None:
    stages = _stages(cpu_check)
    run = stages[name]["result"]
    bw = stages["bandwidth"]["result"]
    dry = stages["dry_run"]["result"]
    assert (run["zero_stage"], run["activation_checkpointing"], run["launcher"]) == (
        stage,
        ac,
        launcher,
    )
    assert (run["steps"], run["train_records"], run["timed_steps"]) == (
        steps,
        steps,
        steps - warmup,
    )
    assert run["end_status"] == "finished"
    assert run["params"] == TINY_PARAMS and run["global_batch"] == 2
    # the medians, recomputed from the run's own metrics.jsonl
    rows = [json.loads(line) for line in (Path(run["run_dir"]) / "metrics.jsonl").open()]
    timed = [r for r in rows if r["kind"] == "train" and r["step"] > warmup]
    assert run["median_step_s"] == statistics.median(r["step_time_s"] for r in timed)
    assert run["samples_per_s"] == statistics.median(r["samples_per_s"] for r in timed)
    assert {
        r["config"]["model"]["activation_checkpointing"] for r in rows if r["kind"] == "start"
    } == {ac}
    # floor: 40 bytes per fp32 parameter over the measured copy bandwidth
    assert run["floor_bytes_per_param"] == FP32_FLOOR_BYTES
    assert run["floor_bytes"] == TINY_PARAMS * FP32_FLOOR_BYTES == 668_040
    assert run["floor_s"] == pytest.approx(668_040 / bw["bandwidth_bytes_per_s"])
    assert run["measured_over_floor"] == pytest.approx(run["median_step_s"] / run["floor_s"])
    # a CPU has no datasheet peak (no trainer MFU); the measured matmul rate gives one
    assert run["mfu"] is None
    assert run["mfu_vs_measured_matmul"] == pytest.approx(
        6 * TINY_PARAMS * run["samples_per_s"] / bw["matmul_flops_per_s"]
    )
    act = dry["activation_bytes"]["with" if ac else "without"]
    assert run["predicted_bytes"] == dry["model_state_bytes"][str(stage)] + act
    assert run["peaks"]["rss_peak_gb"] > 0.1 and "gpu_peak_reserved_gb" not in run["peaks"]
    # only the last run keeps its checkpoint; the others' skipped tags are removed
    assert run["saved_checkpoint"] is (name == "train_zero2_no_ac")
    assert (Path(run["run_dir"]) / "checkpoints").exists() is (name == "train_zero2_no_ac")


def test_checkpoint_consolidated_and_audited(cpu_check: dict[str, Any]) -> None:
    stages = _stages(cpu_check)
    ckpt = stages["checkpoint"]["result"]
    assert Path(ckpt["tag"]).name == "step-00000003"
    assert "mp_rank_00_model_states.pt" in ckpt["files"]
    assert any(f.endswith("_optim_states.pt") for f in ckpt["files"])
    # the `best` tag of the end-of-run validation was not written, only noted
    best = Path(ckpt["tag"]).parent / "best"
    assert [p.name for p in best.iterdir() if p.suffix == ".txt"] == ["SKIPPED_BY_GPU_CHECK.txt"]
    consolidated = stages["consolidate"]["result"]
    with safe_open(consolidated["path"], framework="pt") as f:
        tensors = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118
        assert sum(math.prod(t.get_shape()) for t in tensors.values()) == TINY_PARAMS
        assert {t.get_dtype() for t in tensors.values()} == {"BF16"}
    audit = stages["audit"]["result"]
    assert audit["exit_code"] in (0, 1)
    assert audit["summary"]["tensors"] == len(tensors)


def test_table_written_and_printed(cpu_check: dict[str, Any]) -> None:
    table = (cpu_check["out"] / "gpu_check.md").read_text()
    assert table in cpu_check["result"].stdout
    for name in STAGES:
        assert f"| {name} | ok |" in table
    assert "| train_zero3_ac (ok) | 3 | on | 5/5 |" in table
    assert "all stages ok: True" in table


def test_a_failed_stage_is_reported_and_later_stages_still_run(tmp_path: Path) -> None:
    gpu_check = load_bench("gpu_check")
    args = argparse.Namespace(
        cpu=True, out=tmp_path / "out", work_dir=tmp_path, budget_s=60.0, ckpt_dir=None
    )
    check = gpu_check.Check(args)
    check.logs.mkdir(parents=True)
    boom = [sys.executable, "-c", "import sys; sys.stderr.write('boom: no GPU'); sys.exit(3)"]
    check.stage("first", lambda: check.child("first", boom, 30))
    check.stage("needs_first", lambda: {"x": 1}, needs=("first",))
    check.stage("independent", lambda: {"x": 2})
    first = check.stages["first"]
    assert first["status"] == "failed" and first["error"] == "first exited with 3"
    assert first["returncode"] == 3 and first["stderr_tail"] == "boom: no GPU"
    assert check.stages["needs_first"]["status"] == "skipped"
    assert check.stages["needs_first"]["reason"] == "needs first, which did not pass"
    assert check.stages["independent"] == {
        "name": "independent",
        "status": "ok",
        "seconds": check.stages["independent"]["seconds"],
        "result": {"x": 2},
    }


def test_gpu_plan_is_the_3p5b_preset_in_bf16() -> None:
    gpu_check, gpu_runs = load_bench("gpu_check"), load_bench("gpu_runs")
    config, runs, weight_bytes = gpu_check.plan(cpu=False)
    assert config == REPO / "launch" / "configs" / "giblet_3p5b.yaml" and weight_bytes == 2
    assert [(r.name, r.zero_stage, r.activation_checkpointing, r.steps) for r in runs] == [
        ("train_zero2_ac", 2, True, 30),
        ("train_zero3_ac", 3, True, 30),
        ("train_zero2_no_ac", 2, False, 12),
    ]
    for run in runs:
        assert json.loads(run.ds_config.read_text())["bf16"]["enabled"] is True
        cmd = gpu_runs.train_command("python3", config, run, Path("s.h5"), Path("r"))
        assert cmd[1:5] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "1"]
    # bf16: 2 + 2 read, 2 written, 24 of fp32 optimizer traffic, 2 rewritten
    assert gpu_runs.floor_bytes_per_param(2) == 2 + 2 + 2 + 24 + 2 == 32


def test_a_failed_fused_adam_build_falls_back_to_torch_adamw(tmp_path: Path) -> None:
    gpu_check = load_bench("gpu_check")
    args = argparse.Namespace(
        cpu=False, out=tmp_path / "out", work_dir=tmp_path, budget_s=60.0, ckpt_dir=None
    )
    check = gpu_check.Check(args)
    check.logs.mkdir(parents=True)
    check.python = "false"  # the build command exits 1, as a failed nvcc/ninja build would
    check.stage("optimizer_op", check.optimizer_op)
    assert check.stages["optimizer_op"]["status"] == "failed"
    assert check.stages["optimizer_op"]["error"] == "optimizer_op exited with 1"
    for run in check.runs:
        assert run.ds_config.parent == tmp_path and run.ds_config.name.endswith(".torch_adam.json")
        ds = json.loads(run.ds_config.read_text())
        original = json.loads(
            (REPO / "ds_configs" / run.ds_config.name.replace(".torch_adam", "")).read_text()
        )
        assert ds["optimizer"] == {"type": "AdamW", "params": {"torch_adam": True}}
        assert {k: v for k, v in ds.items() if k != "optimizer"} == {
            k: v for k, v in original.items() if k != "optimizer"
        }


def test_a_failed_stage_line_quotes_the_exception_not_the_launcher_noise() -> None:
    gpu_report = load_bench("gpu_report")
    stage = {
        "name": "train_zero2_ac",
        "status": "failed",
        "seconds": 12.5,
        "error": "train_zero2_ac exited with 1",
        "stderr_tail": "Traceback (most recent call last):\n  File x\n[rank0]: ValueError: bad "
        "shape\n[launch.py:351:main] Process 7 exits with return code = 1\n",
    }
    assert gpu_report._stage_line(stage) == (
        "| train_zero2_ac | failed | 12.5 | train_zero2_ac exited with 1 "
        "(stderr: [rank0]: ValueError: bad shape) |"
    )
