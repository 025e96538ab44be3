"""Is a saved run's model the one this code and config build? Checked before any tensor is read.

Two ways a checkpoint stops fitting: the config changed (``model.context_trs`` 8 -> 12 when the
default moved, a width set differently on resume), or the code's design changed under the same
config. The one design change so far: before ``model.context_init`` existed, a window model
(``context_trs`` > 1) mixed the per-TR *features* before the trunk (mixer k x fused width); it
now mixes per-TR bottleneck codes (k x bottleneck). Such a run config has no ``context_init``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from giblet_ds.config.loading import load_config
from giblet_ds.config.model_section import MODEL_INPUT_KEYS, ModelConfig
from giblet_ds.config.resume_rules import RESUME_RULES
from giblet_ds.errors import CheckpointError

__all__ = ["check_same_model", "check_saved_design"]

# Settings that change neither a parameter's shape nor the forward arithmetic of a trained model:
# the model rows of the resume table (giblet_ds.config.resume_rules) that a resume applies.
_FREE_ON_RESUME = {
    key.removeprefix("model.")
    for key, rule in RESUME_RULES.items()
    if key.startswith("model.") and rule.action != "refuse"
}


def check_saved_design(config_path: Path) -> None:
    """CheckpointError when the run config at ``config_path`` was saved by a giblet-ds whose
    window model (``context_trs`` > 1) mixed features before the trunk (see the module doc)."""
    try:
        raw = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return  # load_config reports unreadable files with its own message
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict):
        return
    k = model.get("context_trs", 1)
    if isinstance(k, int) and k > 1 and "context_init" not in model:
        raise CheckpointError(
            f"{config_path}: this run (model.context_trs={k}) was trained by a giblet-ds that "
            "mixed the window's features before the trunk; the current model mixes per-TR "
            "bottleneck codes, so its weights cannot be loaded. Evaluate or resume it with the "
            "giblet-ds commit that trained it (109f056 or earlier), or retrain"
        )


def check_same_model(config_path: Path, model: ModelConfig) -> None:
    """CheckpointError naming every architecture setting in which ``model`` differs from the
    run config at ``config_path`` (input sizes come from the store and are checked with it;
    dropout, activation checkpointing and the mixer's start may change on resume)."""
    check_saved_design(config_path)
    saved = load_config(config_path).model
    differ = [
        f"model.{f.name}: saved {getattr(saved, f.name)!r}, now {getattr(model, f.name)!r}"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in MODEL_INPUT_KEYS and f.name not in _FREE_ON_RESUME
        and getattr(saved, f.name) != getattr(model, f.name)
    ]  # fmt: skip
    if differ:
        raise CheckpointError(
            f"cannot resume: the model of {config_path} differs from this run's config in "
            f"{'; '.join(differ)}. Resume with the saved values (--set ...), or start a new "
            "checkpoint.run_dir"
        )
