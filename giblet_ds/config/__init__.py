"""Run configuration: one YAML file -> nested dataclasses, validated, with dotted overrides.

- :mod:`sections`: one dataclass per concern (model, data, optim, schedule, loss, train,
  checkpoint, logging), each field documented under it, single-field checks in ``__post_init__``;
- :mod:`loading`: YAML and ``--set`` overrides in, unknown keys rejected;
- :mod:`checks`: checks across sections, raised together;
- :mod:`deepspeed_json`: DeepSpeed JSON files (engine knobs only) and the dict handed to DeepSpeed.
- :mod:`saved_model`: a saved run's model settings against this code and config (load, resume).
- :mod:`resume_rules`: what a resume does with each changed setting (apply / convert / refuse).

:func:`giblet_ds.resolve.resolve` is the one step that turns a loaded config plus a store, a DeepSpeed
JSON and a world size into what a run uses.
"""

from giblet_ds.config.checks import cross_check, zero_engine_problems
from giblet_ds.config.deepspeed_json import build_ds_config, load_ds_json, precision, zero_stage
from giblet_ds.config.loading import apply_overrides, config_to_dict, load_config
from giblet_ds.config.model_section import MODEL_INPUT_KEYS, ModelConfig
from giblet_ds.config.sections import (
    CheckpointConfig,
    DataConfig,
    EarlyStoppingConfig,
    LoggingConfig,
    LossConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
)

__all__ = [
    "MODEL_INPUT_KEYS",
    "CheckpointConfig",
    "DataConfig",
    "EarlyStoppingConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "build_ds_config",
    "config_to_dict",
    "cross_check",
    "load_config",
    "load_ds_json",
    "zero_engine_problems",
    "precision",
    "zero_stage",
]
