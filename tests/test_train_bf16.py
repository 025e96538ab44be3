"""bf16 on CPU (slow there, so a 3-step run): bf16 weights for compute, fp32 master weights and
optimizer state (the old system trained pure bf16 and small updates vanished)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from tests.train_harness import REPO, records, run_training


def test_bf16_run_keeps_fp32_master_weights(tiny_store: Path, tmp_path: Path) -> None:
    shipped = json.loads((REPO / "ds_configs" / "zero2_bf16.json").read_text())
    # The shipped GPU config, with CPU-friendly engine knobs (no fused kernels to compile).
    shipped["optimizer"] = {"type": "AdamW", "params": {"torch_adam": True}}
    shipped["zero_optimization"] = {"stage": 2}
    ds_path = tmp_path / "zero2_bf16_cpu.json"
    ds_path.write_text(json.dumps(shipped))
    run_dir = tmp_path / "run"
    result = run_training(
        run_dir, tiny_store, ds_config=str(ds_path), world=1, sets=("train.max_steps=3",)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [r["loss"] for r in records(run_dir, "train")]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    tag = run_dir / "checkpoints" / "step-00000003"
    model = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert {t.dtype for t in model["module"].values()} == {torch.bfloat16}
    optim = torch.load(
        tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        map_location="cpu",
        weights_only=False,
    )["optimizer_state_dict"]
    masters = optim["single_partition_of_fp32_groups"]
    assert [t.dtype for t in masters] == [torch.float32, torch.float32]
    assert sum(t.numel() for t in masters) == 16_701  # every parameter of the tiny model
