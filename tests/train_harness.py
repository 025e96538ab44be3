"""Launch launch/train.py the way users do (deepspeed launcher or a plain process) and read back
what it wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "launch" / "train.py"
TINY = REPO / "launch" / "configs" / "tiny.yaml"
DS_BIN = Path(sys.executable).parent / "deepspeed"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_training(
    run_dir: Path,
    store: Path,
    *,
    ds_config: str = "zero2_fp32_cpu.json",
    world: int = 2,
    sets: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: int = 240,
) -> subprocess.CompletedProcess[str]:
    args = [
        str(TRAIN),
        "--config",
        str(TINY),
        "--deepspeed_config",
        str(REPO / "ds_configs" / ds_config),
        "--set",
        f"data.store={store}",
        "--set",
        f"checkpoint.run_dir={run_dir}",
    ]
    for item in sets:
        args += ["--set", item]
    if world == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [str(DS_BIN), "--num_gpus", str(world), "--master_port", str(free_port()), *args]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    # This checkout's giblet_ds, not the one an editable install points at (a git worktree's
    # script would otherwise import another checkout's package).
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    # Own session: a fault-injected SIGKILL of the process group takes the launcher with it, not
    # pytest.
    return subprocess.run(
        cmd,
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def records(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def losses_by_step(run_dir: Path, kind: str = "train") -> dict[int, Any]:
    """Last record per step wins (a resumed run repeats the steps after its checkpoint)."""
    out: dict[int, Any] = {}
    for row in records(run_dir, kind):
        out[row["step"]] = (row["loss"], row["terms"])
    return out
