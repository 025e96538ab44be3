"""Checks that span sections (batch sizes vs world size, store sizes vs model sizes, a DeepSpeed JSON vs
the run config, ZeRO stage vs offload): every problem is collected and raised once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from giblet_ds.config.model_section import MODEL_INPUT_KEYS
from giblet_ds.config.sections import RunConfig
from giblet_ds.errors import ConfigError

__all__ = ["cross_check", "early_stopping_problems", "subject_problems", "zero_engine_problems"]


def cross_check(
    cfg: RunConfig,
    *,
    world_size: int | None = None,
    store_sizes: Mapping[str, int] | None = None,
    ds_config: Mapping[str, Any] | None = None,
    store_subjects: int | None = None,
    training: bool = False,
) -> None:
    """Checks that span sections; every problem is collected and raised once.

    ``store_subjects``: the store's subject count (None: no store), which subject heads
    (``model.n_subjects``) must match when ``data.target`` is ``subjects``. ``training``: the
    config of a run about to train (:func:`giblet_ds.resolve.resolve`), so its early-stopping
    metric must be one that validation logs (:func:`early_stopping_problems`); tools that only
    load saved weights leave it False, so a saved config is never refused for it."""
    problems: list[str] = list(subject_problems(cfg, store_subjects))
    if training:
        problems.extend(early_stopping_problems(cfg, store_subjects))
    if world_size is not None:
        o = cfg.optim
        derived = o.global_batch(world_size)
        if o.global_batch_size is not None and o.global_batch_size != derived:
            problems.append(
                f"optim.global_batch_size={o.global_batch_size} but optim.micro_batch_size "
                f"({o.micro_batch_size}) x optim.grad_accum_steps ({o.grad_accum_steps}) x world size "
                f"({world_size}) = {derived}; change one of them or set global_batch_size to null"
            )
    if store_sizes is not None:
        for key in MODEL_INPUT_KEYS:
            want = getattr(cfg.model, key)
            have = store_sizes.get(key)
            if want is not None and have is not None and want != have:
                problems.append(
                    f"model.{key}={want} but the store {cfg.data.store} has {have}; set model.{key} "
                    f"to null to take it from the store"
                )
    elif missing := cfg.model.missing_input_sizes():
        problems.append(
            f"model input sizes {missing} are null and no store was given; set data.store to a "
            f"feature store or set them in the model section"
        )
    if ds_config is not None:
        problems.extend(zero_engine_problems(ds_config))
        problems.extend(_check_ds_against_run(cfg, ds_config, world_size))
    if cfg.schedule.warmup_start_lr > cfg.optim.lr:
        problems.append(
            f"schedule.warmup_start_lr={cfg.schedule.warmup_start_lr} exceeds optim.lr={cfg.optim.lr}"
        )
    if cfg.schedule.min_lr > cfg.optim.lr:
        problems.append(f"schedule.min_lr={cfg.schedule.min_lr} exceeds optim.lr={cfg.optim.lr}")
    if problems:
        raise ConfigError("invalid run configuration:\n  - " + "\n  - ".join(problems))


def subject_problems(cfg: RunConfig, store_subjects: int | None) -> list[str]:
    """``data.target`` against ``model.n_subjects`` and the store's subject count."""
    n, target = cfg.model.n_subjects, cfg.data.target
    if target == "mean" and n > 0:
        return [
            f"model.n_subjects={n} builds subject heads but data.target=mean trains one fMRI "
            "output; set data.target=subjects or model.n_subjects=0"
        ]
    if target != "subjects":
        return []
    if store_subjects is None:
        if n == 0:
            return [
                "data.target=subjects with model.n_subjects=0 (from the store) and no store was "
                "given; set data.store to a feature store or set model.n_subjects"
            ]
        return []
    if n not in (0, store_subjects):
        return [
            f"model.n_subjects={n} but the store {cfg.data.store} holds {store_subjects} "
            "subject(s); set model.n_subjects=0 to take it from the store (a new subject joins "
            "a trained model through giblet_ds.train.add_subject, not through a config)"
        ]
    return []


def early_stopping_problems(cfg: RunConfig, store_subjects: int | None = None) -> list[str]:
    """``train.early_stopping.metric`` against what validation logs, which it reads at every
    validation to choose ``best`` (whatever the patience). Validation logs ``loss``, the fMRI
    scores (whatever loss.fmri is: the fMRI head always predicts), ``loss_<term>`` only for a term
    whose loss weight is > 0 (a term not trained is not computed), and ``fmri_r_normalized`` only
    with a noise ceiling, which a store of one subject cannot give."""
    metric = cfg.train.early_stopping.metric
    problems = []
    if metric.startswith("loss_"):
        term = metric.removeprefix("loss_")
        weight = cfg.loss.weights()[term]
        if weight <= 0:
            problems.append(
                f"train.early_stopping.metric={metric} but loss.{term}={weight}: validation "
                f"logs {metric} only for a term with a weight > 0; set "
                f"train.early_stopping.metric to loss or fmri_r_reliable, or loss.{term} > 0"
            )
    if metric == "fmri_r_normalized" and store_subjects == 1:
        problems.append(
            f"train.early_stopping.metric=fmri_r_normalized needs a noise ceiling, but the store "
            f"{cfg.data.store} holds one subject; set train.early_stopping.metric=fmri_r_reliable"
        )
    return problems


def zero_engine_problems(ds: Mapping[str, Any]) -> list[str]:
    """ZeRO stage vs offload and precision checks of a DeepSpeed config dict."""
    problems = []
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        problems.append("fp16.enabled and bf16.enabled are both true; pick one (bf16 on A100/H100)")
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    offload_param = zero.get("offload_param", {}).get("device", "none")
    offload_opt = zero.get("offload_optimizer", {}).get("device", "none")
    if offload_param != "none" and stage != 3:
        problems.append(
            f"zero_optimization.offload_param needs stage 3, got stage {stage}; use stage 3 or "
            "remove offload_param"
        )
    if offload_opt != "none" and stage == 0:
        problems.append("zero_optimization.offload_optimizer needs stage 1, 2 or 3")
    return problems


def _check_ds_against_run(
    cfg: RunConfig, ds: Mapping[str, Any], world_size: int | None
) -> list[str]:
    """Batch sizes in a DeepSpeed JSON must agree with the run config; never silently overwritten."""
    problems = []
    o = cfg.optim
    pairs = {
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": o.grad_accum_steps,
    }
    if world_size is not None:
        pairs["train_batch_size"] = o.global_batch(world_size)
    for key, want in pairs.items():
        if key in ds and ds[key] != "auto" and ds[key] != want:
            problems.append(
                f"DeepSpeed config sets {key}={ds[key]} but the run config implies {want}; remove "
                f"{key} from the DeepSpeed JSON (batch sizes come from the optim section)"
            )
    if "gradient_clipping" in ds and ds["gradient_clipping"] != o.grad_clip:
        problems.append(
            f"DeepSpeed config sets gradient_clipping={ds['gradient_clipping']} but optim.grad_clip="
            f"{o.grad_clip}; remove it from the DeepSpeed JSON"
        )
    return problems
