"""Run config: shipped presets, unknown keys, value checks, dotted overrides, cross-checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from giblet_ds.config import (
    MODEL_INPUT_KEYS,
    RunConfig,
    apply_overrides,
    config_to_dict,
    cross_check,
    load_config,
)
from giblet_ds.errors import ConfigError, GibletError
from tests.tiny_sizes import TINY_SIZES

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "launch" / "configs").glob("*.yaml"))

# Uneven input sizes, as a synthetic store would report them, for presets that leave them null.
SEED_SIZES = {
    "frames_per_tr": 10,
    "frame_height": 90,
    "frame_width": 160,
    "n_codebooks": 8,
    "code_frames": 112,
    "text_slots": 3,
    "text_dim": 1024,
    "n_voxels": 83138,
}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- shipped presets


def test_the_four_presets_are_shipped() -> None:
    names = {p.name for p in PRESETS}
    assert {"giblet_3p5b.yaml", "giblet_3p5b_seed.yaml", "small.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_cross_checks(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # Presets that name their input sizes must agree with a store of those sizes; the others
    # take them from the store.
    sizes = {k: getattr(cfg.model, k) for k in MODEL_INPUT_KEYS}
    store_sizes = sizes if None not in sizes.values() else TINY_SIZES
    for world_size in (1, 2, 8):
        cross_check(cfg, world_size=world_size, store_sizes=store_sizes)
    # Round trip: the resolved dict (what config.resolved.yaml holds) loads back unchanged.
    resolved = tmp_path / "config.resolved.yaml"
    resolved.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(resolved) == cfg


def test_3p5b_presets_carry_the_seed_sizes() -> None:
    for name, seed_compat in (("giblet_3p5b.yaml", False), ("giblet_3p5b_seed.yaml", True)):
        cfg = load_config(ROOT / "launch" / "configs" / name)
        assert {k: getattr(cfg.model, k) for k in MODEL_INPUT_KEYS} == SEED_SIZES
        assert cfg.model.seed_compat is seed_compat


def test_defaults_without_a_file() -> None:
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.optim.lr == 1e-3
    assert cfg.model.missing_input_sizes() == list(MODEL_INPUT_KEYS)


# ------------------------------------------------------------------------------ unknown keys


def test_unknown_key_lists_the_valid_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: unknown config key optim.lrr; valid keys under 'optim.': ['lr', "
        "'weight_decay', 'betas', 'eps', 'grad_clip', 'micro_batch_size', 'grad_accum_steps', "
        "'global_batch_size']"
    )


def test_unknown_section_lists_the_sections(tmp_path: Path) -> None:
    path = _write(tmp_path, "optimiser:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: unknown config key optimiser; valid keys under '.': ['model', 'data', 'optim', "
        "'schedule', 'loss', 'train', 'checkpoint', 'logging']"
    )


def test_unknown_nested_key_names_the_full_dotted_path() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key train\.early_stopping\.wait;"):
        load_config(None, ["train.early_stopping.wait=3"])


def test_config_error_is_a_giblet_error() -> None:
    # Tools catch GibletError and exit 2; a config problem must be one.
    assert issubclass(ConfigError, GibletError)


# ------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
        ("optim.micro_batch_size=0", "optim.micro_batch_size must be > 0, got 0"),
        ("optim.betas=[0.9, 1.0]", "optim.betas must be two numbers in [0, 1), got [0.9, 1.0]"),
        ("model.dropout=1.5", "model.dropout must be in [0, 1), got 1.5"),
        (
            "model.n_voxels=0",
            "model.n_voxels must be a positive integer or null (null: take it from the store), "
            "got 0",
        ),
        (
            "model.trunk_hidden=[]",
            "model.trunk_hidden must be a non-empty list of positive integers, got []",
        ),
        ("train.early_stopping.patience=-1", "train.early_stopping.patience must be >= 0, got -1"),
        (
            "train.early_stopping.mode=up",
            "train.early_stopping.mode must be max or min, got 'up'",
        ),
        (
            "logging.wandb_mode=cloud",
            "logging.wandb_mode must be offline, online or disabled, got 'cloud'",
        ),
        ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
        ("optim.micro_batch_size=2.5", "optim.micro_batch_size must be an integer, got 2.5"),
        ("model.seed_compat=1", "model.seed_compat must be true or false, got 1"),
        ("data.store=[1]", "data.store must be a string, got [1]"),
    ],
)
def test_bad_value_names_key_value_and_rule(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == message


def test_a_section_given_a_scalar_names_the_section() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.early_stopping=5"])
    assert str(info.value) == "train.early_stopping must be a mapping of keys to values, got 5"


def test_bad_value_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "optim:\n  lr: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: optim.lr must be > 0, got 0.0"


def test_seed_compat_with_checkpointing_names_the_fix() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.seed_compat=true", "model.activation_checkpointing=true"])
    assert str(info.value) == (
        "model.activation_checkpointing cannot be true with model.seed_compat (BatchNorm running "
        "statistics would be updated twice per step, a fault of the old system), got True; set "
        "one of them to false"
    )


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value) == (
        f"config file {missing} does not exist; pass --config PATH to a run YAML"
    )
    with pytest.raises(ConfigError, match="must hold a mapping of sections, got"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(_write(tmp_path, "optim: [\n"))


# -------------------------------------------------------------------------------- overrides


def test_override_scientific_notation_is_a_float() -> None:
    # YAML 1.1 reads 3e-4 (no dot) as a string; the override parser must still give a number.
    cfg = load_config(ROOT / "launch" / "configs" / "tiny.yaml", ["optim.lr=3e-4"])
    assert cfg.optim.lr == 0.0003
    assert type(cfg.optim.lr) is float


def test_nested_override_and_order() -> None:
    cfg = load_config(
        ROOT / "launch" / "configs" / "giblet_3p5b.yaml",
        [
            "train.early_stopping.patience=3",
            "optim.micro_batch_size=4",
            "optim.micro_batch_size=1",  # applied in order: the last one wins
            "model.fmri_hidden=[]",
            "data.subject=null",
            "checkpoint.resume=runs/x/checkpoints/step-00000123",
        ],
    )
    assert cfg.train.early_stopping.patience == 3
    assert cfg.train.early_stopping.metric == "fmri_r_mean"  # siblings untouched
    assert cfg.optim.micro_batch_size == 1
    assert cfg.model.fmri_hidden == []
    assert cfg.data.subject is None
    assert cfg.checkpoint.resume == "runs/x/checkpoints/step-00000123"
    assert cfg.model.n_voxels == 83138  # the file's values stay where not overridden


def test_apply_overrides_on_a_raw_dict() -> None:
    data = {"optim": {"lr": 0.1}}
    out = apply_overrides(data, ["optim.lr=3e-4", "train.early_stopping.patience=3"])
    assert out is data
    assert data == {"optim": {"lr": 0.0003}, "train": {"early_stopping": {"patience": 3}}}


def test_malformed_overrides() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, ["optim.lr"])
    assert str(info.value) == (
        "override 'optim.lr' must look like section.key=value, e.g. optim.lr=3e-4"
    )
    with pytest.raises(ConfigError) as info:
        apply_overrides({"optim": {"lr": 0.1}}, ["optim.lr.x=1"])
    assert str(info.value) == "override 'optim.lr.x=1': lr is not a section"
    for value, problem in (
        ("[128", "expected ',' or ']', but got '<stream end>'"),
        ("{a: 1", "expected ',' or '}', but got '<stream end>'"),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"model.audio_hidden={value}"])  # no YAML error escapes
        assert str(info.value) == (
            f"override 'model.audio_hidden={value}': the value {value!r} is not valid YAML "
            f"({problem}); write lists whole and quoted for the shell, e.g. "
            "'model.fmri_hidden=[256, 128]'"
        )


# ----------------------------------------------------------------------------- cross-checks


def test_cross_check_collects_every_problem_into_one_error() -> None:
    cfg = load_config(
        ROOT / "launch" / "configs" / "giblet_3p5b.yaml",
        ["optim.global_batch_size=10", "optim.grad_accum_steps=2"],
    )
    store = dict(SEED_SIZES, n_voxels=77347, code_frames=113)
    ds = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": "auto",  # auto is fine: DeepSpeed takes the run's value
        "train_batch_size": 7,
        "gradient_clipping": 0.5,
    }
    with pytest.raises(ConfigError) as info:
        cross_check(cfg, world_size=4, store_sizes=store, ds_config=ds)
    assert str(info.value) == (
        "invalid run configuration:\n"
        "  - optim.global_batch_size=10 but optim.micro_batch_size (2) x optim.grad_accum_steps "
        "(2) x world size (4) = 16; change one of them or set global_batch_size to null\n"
        "  - model.code_frames=112 but the store data/sherlock_store.h5 has 113; set "
        "model.code_frames to null to take it from the store\n"
        "  - model.n_voxels=83138 but the store data/sherlock_store.h5 has 77347; set "
        "model.n_voxels to null to take it from the store\n"
        "  - DeepSpeed config sets train_micro_batch_size_per_gpu=4 but the run config implies 2; "
        "remove train_micro_batch_size_per_gpu from the DeepSpeed JSON (batch sizes come from the "
        "optim section)\n"
        "  - DeepSpeed config sets train_batch_size=7 but the run config implies 16; remove "
        "train_batch_size from the DeepSpeed JSON (batch sizes come from the optim section)\n"
        "  - DeepSpeed config sets gradient_clipping=0.5 but optim.grad_clip=1.0; remove it from "
        "the DeepSpeed JSON"
    )


def test_cross_check_accepts_consistent_settings() -> None:
    cfg = load_config(
        ROOT / "launch" / "configs" / "giblet_3p5b.yaml",
        ["optim.global_batch_size=32", "optim.grad_accum_steps=2"],
    )
    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 32,
        "gradient_clipping": 1.0,
    }
    cross_check(cfg, world_size=8, store_sizes=SEED_SIZES, ds_config=ds)


def test_cross_check_needs_sizes_from_somewhere() -> None:
    cfg = load_config(ROOT / "launch" / "configs" / "small.yaml")
    with pytest.raises(ConfigError) as info:
        cross_check(cfg, world_size=1)
    assert str(info.value) == (
        "invalid run configuration:\n  - model input sizes ['frames_per_tr', 'frame_height', "
        "'frame_width', 'n_codebooks', 'code_frames', 'text_slots', 'text_dim', 'n_voxels'] are "
        "null and no store was given; set data.store to a feature store or set them in the model "
        "section"
    )
    filled = cfg.model.with_input_sizes(TINY_SIZES)
    assert filled.missing_input_sizes() == []
    assert filled.n_voxels == 23 and filled.video_hidden == cfg.model.video_hidden


def test_with_input_sizes_keeps_explicit_sizes() -> None:
    cfg = load_config(ROOT / "launch" / "configs" / "giblet_3p5b.yaml")
    assert cfg.model.with_input_sizes(TINY_SIZES).n_voxels == 83138
    with pytest.raises(ConfigError, match=r"unknown model input sizes \['voxels'\]"):
        cfg.model.with_input_sizes({"voxels": 3})


def test_cross_check_learning_rate_order() -> None:
    cfg = load_config(
        ROOT / "launch" / "configs" / "giblet_3p5b.yaml",
        ["schedule.warmup_start_lr=0.01", "schedule.min_lr=0.02"],
    )
    with pytest.raises(ConfigError) as info:
        cross_check(cfg, store_sizes=SEED_SIZES)
    assert str(info.value) == (
        "invalid run configuration:\n"
        "  - schedule.warmup_start_lr=0.01 exceeds optim.lr=0.001\n"
        "  - schedule.min_lr=0.02 exceeds optim.lr=0.001"
    )


# ------------------------------------------------------- early stopping on a metric never logged


@pytest.mark.parametrize("term", ["fmri", "video", "audio", "text"])
def test_early_stopping_on_an_untrained_loss_term_is_a_config_error(term: str) -> None:
    # Validation logs loss_<term> only for a term with a weight > 0: the metric would be missing
    # at the first validation (a KeyError there before). Refused when a run resolves its config.
    other = "video" if term == "fmri" else "fmri"  # one weight must stay > 0
    cfg = load_config(
        None, [f"train.early_stopping.metric=loss_{term}", f"loss.{term}=0", f"loss.{other}=1"]
    )
    with pytest.raises(ConfigError) as info:
        cross_check(cfg, store_sizes=TINY_SIZES, training=True)
    assert str(info.value) == (
        "invalid run configuration:\n"
        f"  - train.early_stopping.metric=loss_{term} but loss.{term}=0.0: validation logs "
        f"loss_{term} only for a term with a weight > 0; set train.early_stopping.metric to loss "
        f"or fmri_r_reliable, or loss.{term} > 0"
    )
    # A tool loading saved weights (training=False) is not refused for it.
    cross_check(cfg, store_sizes=TINY_SIZES)


@pytest.mark.parametrize(
    "metric", ["fmri_r_reliable", "fmri_r_normalized", "fmri_r_mean", "fmri_r_median", "loss"]
)
def test_metrics_validation_always_logs_pass_with_the_fmri_weight_at_zero(metric: str) -> None:
    # The fMRI head predicts whatever loss.fmri is, so the fMRI scores are always logged; so is
    # the total; train.evaluate_split only concerns the end-of-training evaluation.
    cfg = load_config(
        None,
        [f"train.early_stopping.metric={metric}", "loss.fmri=0", "train.evaluate_split=none"],
    )
    cross_check(cfg, store_sizes=TINY_SIZES, training=True, store_subjects=2)


def test_early_stopping_on_normalized_r_needs_a_second_subject() -> None:
    cfg = load_config(None, ["train.early_stopping.metric=fmri_r_normalized", "data.store=one.h5"])
    with pytest.raises(ConfigError) as info:
        cross_check(cfg, store_sizes=TINY_SIZES, training=True, store_subjects=1)
    assert str(info.value) == (
        "invalid run configuration:\n"
        "  - train.early_stopping.metric=fmri_r_normalized needs a noise ceiling, but the store "
        "one.h5 holds one subject; set train.early_stopping.metric=fmri_r_reliable"
    )
