"""bench/bench_context_seeds.py: settings parse strictly and runs read make demo's configuration."""

from __future__ import annotations

import argparse

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
    assert (cfg.train.max_steps, cfg.train.epochs) == (0, 10)  # launch/demo.sh: the preset's
    assert (cfg.train.seed, cfg.model.context_trs) == (7, 12)
    assert cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps * bench.RANKS == 16
    assert bench.run_config(["train.max_steps=88"], seed=1).train.max_steps == 88
