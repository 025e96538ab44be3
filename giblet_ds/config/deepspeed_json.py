"""DeepSpeed JSON files hold engine knobs only; batch sizes and the optimizer's numbers come from
the run config. Anything a JSON sets that the run config owns must agree with it, or it is an error:
never silently overwritten."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from giblet_ds.config.checks import zero_engine_problems
from giblet_ds.config.sections import RunConfig
from giblet_ds.errors import ConfigError

__all__ = ["build_ds_config", "load_ds_json", "precision", "zero_stage"]

ENGINE_KEYS = {
    "bf16",
    "fp16",
    "zero_optimization",
    "optimizer",
    "checkpoint",
    "steps_per_print",
    "wall_clock_breakdown",
    "communication_data_type",
    "prescale_gradients",
    "gradient_predivide_factor",
    "zero_allow_untested_optimizer",
    "flops_profiler",
    "comms_logger",
    "data_types",
    "memory_breakdown",
    "dump_state",
    # Owned by the run config; accepted only when they agree with it (cross_check).
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
}
OPTIMIZER_TYPES = {"AdamW", "Adam"}
OPTIMIZER_ENGINE_PARAMS = {"torch_adam", "adam_w_mode", "fused"}
RUN_CONFIG_OPTIMIZER_PARAMS = {
    "lr": "optim.lr",
    "betas": "optim.betas",
    "eps": "optim.eps",
    "weight_decay": "optim.weight_decay",
}


def load_ds_json(path: str | Path) -> dict[str, Any]:
    """Read and validate one DeepSpeed JSON (keys, types, stage vs offload)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"DeepSpeed config {path} does not exist; see ds_configs/ for the shipped ones"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object")
    problems = _validate(data)
    if problems:
        raise ConfigError(f"DeepSpeed config {path}:\n  - " + "\n  - ".join(problems))
    return data


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def precision(ds: dict[str, Any]) -> str:
    """The engine's training precision: ``bf16`` or ``fp16`` when that section is enabled, else
    ``fp32`` (the weights; ZeRO keeps fp32 master weights in every case)."""
    for name in ("bf16", "fp16"):
        if ds.get(name, {}).get("enabled", False):
            return name
    return "fp32"


def _validate(ds: dict[str, Any]) -> list[str]:
    problems = []
    unknown = sorted(set(ds) - ENGINE_KEYS)
    if unknown:
        problems.append(f"unknown keys {unknown}; valid keys: {sorted(ENGINE_KEYS)}")
    problems.extend(zero_engine_problems(ds))
    optimizer = ds.get("optimizer")
    if optimizer is not None:
        kind = optimizer.get("type")
        if kind not in OPTIMIZER_TYPES:
            problems.append(
                f"optimizer.type must be one of {sorted(OPTIMIZER_TYPES)}, got {kind!r}"
            )
        params = optimizer.get("params", {})
        for key in sorted(set(params) & set(RUN_CONFIG_OPTIMIZER_PARAMS)):
            problems.append(
                f"optimizer.params.{key} belongs in the run config ({RUN_CONFIG_OPTIMIZER_PARAMS[key]}); "
                "remove it from the DeepSpeed JSON"
            )
        extra = sorted(set(params) - OPTIMIZER_ENGINE_PARAMS - set(RUN_CONFIG_OPTIMIZER_PARAMS))
        if extra:
            problems.append(
                f"optimizer.params {extra} unknown; valid engine knobs: {sorted(OPTIMIZER_ENGINE_PARAMS)}"
            )
    return problems


def build_ds_config(cfg: RunConfig, ds_json: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The dict handed to deepspeed.initialize: the JSON's knobs plus the run config's numbers.

    Call it on a resolved config (:func:`giblet_ds.resolve.resolve`): that is where the JSON's
    batch sizes and clipping are checked against the run config.
    """
    ds = copy.deepcopy(ds_json)
    o = cfg.optim
    ds["train_micro_batch_size_per_gpu"] = o.micro_batch_size
    ds["gradient_accumulation_steps"] = o.grad_accum_steps
    ds["train_batch_size"] = o.global_batch(world_size)
    ds["gradient_clipping"] = o.grad_clip
    optimizer = ds.setdefault("optimizer", {"type": "AdamW"})
    params = optimizer.setdefault("params", {})
    params.update(lr=o.lr, betas=list(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    # DeepSpeed's own progress prints every 10 steps by default; the trainer logs instead.
    ds.setdefault("steps_per_print", 2**31 - 1)
    return ds
