"""Training runs for bench/gpu_check.py: the deepspeed command, the dry run's prediction, and one
run's numbers read back from its metrics.jsonl, set against the bytes-moved floor."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "bench" / "gpu_train_entry.py"
TRAIN = REPO / "launch" / "train.py"
GIB = 2**30

# Bytes one optimizer step must move per parameter, with w bytes per model weight (2 in bf16, 4 in
# fp32): the weights read in forward and in backward (2w), the gradients written (w), the fp32
# master weights and the two fp32 Adam moments read and written (2 x 3 x 4 = 24), the model
# weights rewritten from the master copy (w). Activations are ignored: at micro batch 2 they are
# megabytes against gigabytes of weights (the dry run's activation line).
FLOOR_FORMULA = "4w + 24 bytes per parameter (w: bytes per model weight)"


def floor_bytes_per_param(weight_bytes: int) -> int:
    """4w + 24: 32 for bf16 weights, 40 for fp32 (see FLOOR_FORMULA)."""
    return 4 * weight_bytes + 24


@dataclass(frozen=True)
class RunSpec:
    """One training run: its name, ZeRO config, activation checkpointing and length."""

    name: str
    ds_config: Path
    activation_checkpointing: bool
    steps: int
    warmup: int
    """Steps left out of the medians (allocations, kernel builds and autotuning happen there)."""
    launcher: bool = True
    """Start under ``deepspeed --num_gpus 1``; False: one plain process (same training code)."""

    @property
    def zero_stage(self) -> int:
        return int(json.loads(self.ds_config.read_text())["zero_optimization"]["stage"])


@dataclass
class ProcessResult:
    returncode: int | None
    seconds: float
    timed_out: bool
    stdout_tail: str
    stderr_tail: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, chars: int) -> str:
    if not path.is_file():
        return ""
    data = path.read_bytes()[-chars:]
    return data.decode("utf-8", errors="replace")


def run_process(
    cmd: list[str], log_prefix: Path, timeout: float, env: dict[str, str] | None = None
) -> ProcessResult:
    """Run ``cmd`` in its own process group with stdout/stderr to ``log_prefix``.out/.err; on
    timeout SIGKILL the whole group (the deepspeed launcher and its ranks)."""
    out_path = log_prefix.with_suffix(".out")
    err_path = log_prefix.with_suffix(".err")
    started = time.perf_counter()
    timed_out = False
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=out, stderr=err, env=env, start_new_session=True
        )
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return ProcessResult(
        returncode=proc.returncode,
        seconds=time.perf_counter() - started,
        timed_out=timed_out,
        stdout_tail=tail(out_path, 1500),
        stderr_tail=tail(err_path, 3000),
    )


def train_command(
    python: str, config: Path, spec: RunSpec, store: Path, run_dir: Path
) -> list[str]:
    """``deepspeed --num_gpus 1`` (the launcher's module, same as its console script), or one
    plain process, on launch/train.py's main() through bench/gpu_train_entry.py, with the run's
    overrides."""
    sets = [
        f"data.store={store}",
        f"checkpoint.run_dir={run_dir}",
        "checkpoint.resume=none",
        f"train.max_steps={spec.steps}",
        f"model.activation_checkpointing={str(spec.activation_checkpointing).lower()}",
        "logging.wandb_mode=disabled",
        "logging.progress_bar=false",
        "logging.log_every_steps=1",
    ]
    cmd = [python]
    if spec.launcher:
        cmd += ["-m", "deepspeed.launcher.runner", "--num_gpus", "1"]
        cmd += ["--master_port", str(free_port())]
    cmd += [str(ENTRY)]
    cmd += ["--config", str(config), "--deepspeed_config", str(spec.ds_config)]
    for item in sets:
        cmd += ["--set", item]
    return cmd


# ---------------------------------------------------------------------------------- dry run

_UNITS = {"GiB": GIB, "MiB": 2**20, "KiB": 2**10, "B": 1}
_SIZE = r"([\d,]+(?:\.\d+)?) (GiB|MiB|KiB|B)"


def _bytes(number: str, unit: str) -> float:
    return float(number.replace(",", "")) * _UNITS[unit]


def parse_dry_run(text: str) -> dict[str, Any]:
    """Parameter count, activations with and without checkpointing, and the ZeRO-2 / ZeRO-3 model
    states per GPU from ``launch/train.py --dry-run`` output (format_estimate's table)."""
    total = re.search(r"giblet model, .*?: ([\d,]+) parameters", text)
    without = re.search(r"without activation checkpointing\s+" + _SIZE, text)
    with_ = re.search(r"\bwith activation checkpointing\s+" + _SIZE, text)
    if not (total and without and with_):
        raise ValueError("the dry run's output has no parameter or activation lines")
    result: dict[str, Any] = {
        "params": int(total.group(1).replace(",", "")),
        "activation_bytes": {
            "without": _bytes(*without.groups()),
            "with": _bytes(*with_.groups()),
        },
        "model_state_bytes": {},
    }
    for stage in (2, 3):
        # the plain "ZeRO-N" row, not the "ZeRO-N, offload ..." rows
        row = re.search(rf"^\s*ZeRO-{stage}\s{{2,}}{_SIZE}", text, re.MULTILINE)
        if row is None:
            raise ValueError(f"the dry run's output has no ZeRO-{stage} row")
        result["model_state_bytes"][str(stage)] = _bytes(*row.groups())
    return result


def predicted_bytes(dry: dict[str, Any], stage: int, activation_checkpointing: bool) -> float:
    """Model states for the stage plus the activations for the checkpointing setting."""
    act = dry["activation_bytes"]["with" if activation_checkpointing else "without"]
    return float(dry["model_state_bytes"][str(stage)]) + float(act)


# ------------------------------------------------------------------------------- run numbers


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize_run(
    records: list[dict[str, Any]],
    spec: RunSpec,
    *,
    weight_bytes: int,
    bandwidth: float | None,
    matmul_flops: float | None,
    dry: dict[str, Any] | None,
    peaks: dict[str, Any] | None,
) -> dict[str, Any]:
    """One run's numbers: medians over the train records after ``spec.warmup`` steps, peaks,
    the dry run's prediction beside the measured peak, and the ratio to the bytes-moved floor."""
    train = [r for r in records if r.get("kind") == "train"]
    start = next((r for r in records if r.get("kind") == "start"), None)
    end = next((r for r in records if r.get("kind") == "end"), None)
    timed = [r for r in train if r["step"] > spec.warmup]
    params = int(start["param_counts"]["total"]) if start else None
    global_batch = None
    if start:
        o = start["config"]["optim"]
        global_batch = o["micro_batch_size"] * o["grad_accum_steps"] * start["world_size"]
    step_s = _median([r["step_time_s"] for r in timed])
    samples_s = _median([r["samples_per_s"] for r in timed])
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    gpu_alloc = [r["memory"].get("gpu_max_allocated_gb") for r in train]
    out: dict[str, Any] = {
        "ds_config": spec.ds_config.name,
        "launcher": "deepspeed --num_gpus 1" if spec.launcher else "one process",
        "zero_stage": spec.zero_stage,
        "activation_checkpointing": spec.activation_checkpointing,
        "steps": spec.steps,
        "warmup_steps_left_out": spec.warmup,
        "train_records": len(train),
        "timed_steps": len(timed),
        "end_status": end.get("status") if end else None,
        "params": params,
        "global_batch": global_batch,
        "median_step_s": step_s,
        "samples_per_s": samples_s,
        "mfu": _median(mfus),
        "mfu_vs_measured_matmul": None,
        "gpu_max_allocated_gb": max((g for g in gpu_alloc if g is not None), default=None),
        "rss_max_gb": max((r["memory"]["rss_gb"] for r in train), default=None),
        "first_loss": train[0]["loss"] if train else None,
        "last_loss": train[-1]["loss"] if train else None,
        "peaks": peaks,
        "predicted_bytes": None,
        "measured_over_predicted": None,
        "floor_bytes_per_param": floor_bytes_per_param(weight_bytes),
        "floor_bytes": None,
        "floor_s": None,
        "measured_over_floor": None,
    }
    if params is not None and samples_s and matmul_flops:
        out["mfu_vs_measured_matmul"] = 6 * params * samples_s / matmul_flops
    if dry is not None:
        predicted = predicted_bytes(dry, spec.zero_stage, spec.activation_checkpointing)
        out["predicted_bytes"] = predicted
        measured = (peaks or {}).get("gpu_peak_allocated_gb")
        if measured is not None:
            out["measured_over_predicted"] = measured * 1e9 / predicted
    if params is not None:
        out["floor_bytes"] = params * floor_bytes_per_param(weight_bytes)
        if bandwidth:
            out["floor_s"] = out["floor_bytes"] / bandwidth
            if step_s:
                out["measured_over_floor"] = step_s / out["floor_s"]
    return out


def python_env(cpu: bool) -> dict[str, str]:
    """The environment of every child: offline, no wandb; on CPU the test suite's settings."""
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    pythonpath = [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(pythonpath))
    if cpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return env


def this_python() -> str:
    return sys.executable
