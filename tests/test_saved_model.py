"""A saved run's model against this code and config: the old window design and changed settings
are named before any tensor is read (giblet_ds.config.saved_model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from giblet_ds.config import config_to_dict, load_config
from giblet_ds.config.saved_model import check_same_model, check_saved_design
from giblet_ds.errors import CheckpointError

TINY = Path(__file__).resolve().parents[1] / "launch" / "configs" / "tiny.yaml"


def saved_config(tmp_path: Path, *overrides: str, drop: str | None = None) -> Path:
    """A run config as the trainer saves it (every field), optionally without one model key."""
    data = config_to_dict(load_config(TINY, list(overrides)))
    if drop is not None:
        del data["model"][drop]
    path = tmp_path / "run_config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_window_run_from_before_the_code_mixer_is_named(tmp_path: Path) -> None:
    old = saved_config(tmp_path, "model.context_trs=8", drop="context_init")
    with pytest.raises(CheckpointError, match=r"model.context_trs=8\) was trained by a giblet-ds"
                       r" that mixed the window's features before the trunk"):  # fmt: skip
        check_saved_design(old)


def test_current_runs_and_one_tr_runs_pass(tmp_path: Path) -> None:
    check_saved_design(saved_config(tmp_path, "model.context_trs=8"))
    check_saved_design(saved_config(tmp_path, drop="context_init"))  # k = 1: nothing changed


def test_resume_names_each_changed_setting(tmp_path: Path) -> None:
    path = saved_config(tmp_path, "model.context_trs=8")
    now = load_config(TINY, ["model.context_trs=12", "model.bottleneck=7"]).model
    with pytest.raises(CheckpointError) as caught:
        check_same_model(path, now)
    assert "model.bottleneck: saved 6, now 7; model.context_trs: saved 8, now 12" in str(
        caught.value
    )
    assert "Resume with the saved values (--set ...)" in str(caught.value)


def test_resume_allows_what_changes_no_weight(tmp_path: Path) -> None:
    path = saved_config(tmp_path, "model.context_trs=8")
    now = load_config(
        TINY,
        ["model.context_trs=8", "model.dropout=0.2", "model.activation_checkpointing=true",
         "model.context_init=current_tr", "model.n_voxels=99"],
    ).model  # fmt: skip
    check_same_model(path, now)
