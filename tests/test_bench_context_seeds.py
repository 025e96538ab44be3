"""bench/bench_context_seeds.py: settings parse strictly and runs read make demo's configuration."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from tests.bench_modules import load_bench


def test_a_setting_is_a_name_a_colon_and_overrides() -> None:
    parse = load_bench("bench_context_seeds").parse_setting
    assert parse("k12:") == ("k12", [])
    assert parse("k1:model.context_trs=1,optim.lr=2e-3") == (
        "k1",
        ["model.context_trs=1", "optim.lr=2e-3"],
    )
    assert parse("w:model.dropout=0.2,model.audio_hidden=[128,64],model.text_hidden=[8, 4]") == (
        "w",  # commas inside a list value do not split it
        ["model.dropout=0.2", "model.audio_hidden=[128,64]", "model.text_hidden=[8, 4]"],
    )
    for bad in ("w:model.audio_hidden=[1,optim.lr=2e-3", "w:model.audio_hidden=1],optim.lr=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="unbalanced brackets"):
            parse(bad)  # never two overrides merged into one string value
    for bad in ("k12", ":model.context_trs=1"):  # a bare name would train the default silently
        with pytest.raises(argparse.ArgumentTypeError, match=r"a setting is NAME:\[OVERRIDE"):
            parse(bad)


def test_runs_take_make_demos_steps_and_the_seed_and_the_settings_last() -> None:
    bench = load_bench("bench_context_seeds")
    cfg = bench.run_config(["model.context_trs=12"], seed=7)
    assert (cfg.train.max_steps, cfg.train.epochs) == (0, 15)  # launch/demo.sh: the preset's
    assert (cfg.train.seed, cfg.model.context_trs) == (7, 12)
    assert cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps * bench.RANKS == 16
    assert bench.run_config(["train.max_steps=88"], seed=1).train.max_steps == 88


def test_the_ensemble_scores_the_seeds_average_on_the_members_trs_and_voxels() -> None:
    bench = load_bench("bench_context_seeds")
    rng = np.random.default_rng(0)
    target = rng.standard_normal((20, 4)).astype(np.float32)
    noise = rng.standard_normal((20, 4)).astype(np.float32)
    # two members whose errors cancel: each alone is target +- noise, their average is the target
    runs = [
        {"predictions": {s: target + sign * noise for s in ("val", "test")},
         "targets": {s: target for s in ("val", "test")}}
        for sign in (1.0, -1.0)
    ]  # fmt: skip
    groups = {"all": np.ones(4, bool), "first": np.array([True, False, False, False])}
    scores = bench.ensemble_scores(runs, groups)
    assert scores["val_r"]["all"] == pytest.approx(1.0, abs=1e-6)
    assert scores["test_r"]["first"] == pytest.approx(1.0, abs=1e-6)
    member = bench.group_means(target + noise, target, groups)
    by_hand = np.corrcoef(target[:, 0] + noise[:, 0], target[:, 0])[0, 1]
    assert member["first"] == pytest.approx(by_hand, abs=1e-6)
    assert member["all"] < 0.9  # a member alone is far from the ensemble
