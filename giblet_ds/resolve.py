"""The one config resolution step: a loaded run config + its store + a DeepSpeed JSON + a world size
-> what a run (or a dry run, or a tool) uses.

Model input sizes left null in the config are taken from the store, every cross-section check runs
once (:func:`giblet_ds.config.cross_check`, with the checks of a config about to train: the
early-stopping metric must be one validation logs), and the DeepSpeed dict is built from the JSON's engine
knobs and the run config's numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from giblet_ds.config import RunConfig, build_ds_config, cross_check
from giblet_ds.errors import ConfigError
from giblet_ds.store import StoreInfo, open_store
from giblet_ds.store.run_splits import with_split_runs

__all__ = ["ResolvedRun", "resolve"]


@dataclass(frozen=True)
class ResolvedRun:
    cfg: RunConfig
    """The run config with every model input size set."""
    store: StoreInfo | None
    """The validated store (None only when the config sets every size and names no store)."""
    ds_config: dict[str, Any] | None
    """The dict for ``deepspeed.initialize`` (None when no DeepSpeed JSON or world size was given)."""
    from_store: dict[str, int]
    """The model input sizes taken from the store (those the config left null), and
    ``n_subjects`` when data.target=subjects left it 0."""

    def describe_sizes(self) -> str:
        """One line saying where the model's input sizes came from."""
        if not self.from_store:
            return "model input sizes: all set in the config"
        sizes = ", ".join(f"{k}={v:,}" for k, v in self.from_store.items())
        assert self.store is not None
        return f"model input sizes from the store {self.store.path}: {sizes}"


def resolve(
    cfg: RunConfig,
    *,
    ds_json: Mapping[str, Any] | None = None,
    world_size: int | None = None,
    require_store: bool = True,
) -> ResolvedRun:
    """Resolve ``cfg`` (see the module docstring).

    ``require_store=False`` (the dry run) accepts a missing store when the config sets every model
    input size. Raises ConfigError naming the keys to set, or StoreError for a bad store.
    """
    store_path = cfg.data.store
    store: StoreInfo | None = None
    missing = cfg.model.missing_input_sizes()
    if store_path and (require_store or missing or Path(store_path).exists()):
        if not Path(store_path).exists() and missing:
            raise ConfigError(
                f"model input sizes {missing} are null and data.store={store_path} does not "
                "exist: build it (tools/build_store.py; `make demo` builds demo_out/store.h5), "
                "point --set data.store=PATH at a store, or set the sizes in the model section "
                "(e.g. --set model.n_voxels=83138)"
            )
        # a leave-one-run-out fold: the same store with its runs assigned by data.split_runs
        store = with_split_runs(open_store(store_path), cfg.data.split_runs)
    elif missing:
        raise ConfigError(
            f"model input sizes {missing} are null and data.store is not set: set data.store to a "
            "feature store (tools/build_store.py) or set the sizes in the model section (e.g. "
            "--set model.n_voxels=83138)"
        )
    store_sizes = store.model_input_sizes() if store is not None else None
    store_subjects = store.n_subjects if store is not None else None
    cross_check(
        cfg,
        world_size=world_size,
        store_sizes=store_sizes,
        ds_config=ds_json,
        store_subjects=store_subjects,
        training=True,
    )
    from_store = {k: v for k, v in (store_sizes or {}).items() if k in missing}
    model = cfg.model.with_input_sizes(from_store)
    if cfg.data.target == "subjects" and model.n_subjects == 0 and store_subjects is not None:
        # One subject head per store subject, filled like an input size (and said so).
        model = dataclasses.replace(model, n_subjects=store_subjects)
        from_store["n_subjects"] = store_subjects
    cfg = dataclasses.replace(cfg, model=model)
    ds_config = (
        build_ds_config(cfg, dict(ds_json), world_size)
        if ds_json is not None and world_size is not None
        else None
    )
    return ResolvedRun(cfg, store, ds_config, from_store)
