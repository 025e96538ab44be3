"""tools/audit_weights.py: injected NaN/Inf found by name in every input kind; exit codes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from giblet_ds.checkpoint import ZeroCheckpoint, convert_zero_checkpoint
from giblet_ds.checkpoint.audit import audit_path
from tests.test_tools_common import TAG, build_zero_checkpoint, load_tool, load_weights

audit_weights = load_tool("audit_weights")


@pytest.fixture(scope="session")
def zero2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp() / "zero_fixtures"
    base.mkdir(exist_ok=True)
    return build_zero_checkpoint(base, 2, 2, True)


def _errors(report_json: dict) -> set[tuple[str, str]]:  # type: ignore[type-arg]
    return {
        (f["check"], f["tensor"])
        for s in report_json["sections"]
        for f in s["findings"]
        if f["severity"] == "error"
    }


@pytest.mark.distributed
@pytest.mark.parametrize("fmt", ["bin", "safetensors", "index"])
def test_injected_nan_and_inf_found_by_name_in_consolidated_weights(
    zero2_dir: Path, tmp_path: Path, fmt: str
) -> None:
    clean = tmp_path / "clean"
    convert_zero_checkpoint(zero2_dir, clean)
    weights = {
        k: v.detach().clone() for k, v in load_weights(clean).items() if k != "sq_tied.weight"
    }
    weights["enc.weight"][3, 2] = math.nan
    weights["dec.bias"][1] = -math.inf
    bad = tmp_path / "bad"
    bad.mkdir()
    if fmt == "bin":
        target = bad / "pytorch_model.bin"
        torch.save(weights, target)
    elif fmt == "safetensors":
        target = bad / "model.safetensors"
        save_file(weights, target)
    else:  # a sharded output written by our converter, then one shard replaced
        convert_zero_checkpoint(zero2_dir, bad / "sharded", max_shard_size=400)
        target = bad / "sharded" / "pytorch_model.bin.index.json"
        index = json.loads(target.read_text())["weight_map"]
        shard = target.parent / index["enc.weight"]
        part = torch.load(shard, weights_only=True)
        part["enc.weight"] = weights["enc.weight"]
        torch.save(part, shard)
        shard = target.parent / index["dec.bias"]
        part = torch.load(shard, weights_only=True)
        part["dec.bias"] = weights["dec.bias"]
        torch.save(part, shard)
    out = tmp_path / "audit.json"
    assert audit_weights.main([str(target), "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    assert _errors(data) == {("nonfinite", "enc.weight"), ("nonfinite", "dec.bias")}
    stats = {t["name"]: t for s in data["sections"] for t in s["tensors"]}
    assert (stats["enc.weight"]["nan"], stats["enc.weight"]["inf"]) == (1, 0)
    assert (stats["dec.bias"]["nan"], stats["dec.bias"]["inf"]) == (0, 1)
    # statistics exclude the bad element: they match the clean tensor without it
    ref = load_weights(clean)["enc.weight"].detach().reshape(-1)
    keep = torch.ones(77, dtype=torch.bool)
    keep[3 * 7 + 2] = False
    assert stats["enc.weight"]["mean"] == pytest.approx(float(ref[keep].double().mean()), rel=1e-9)
    assert stats["enc.weight"]["std"] == pytest.approx(
        float(ref[keep].double().std(unbiased=False)), rel=1e-9
    )
    assert data["exit_code"] == 1 and data["summary"]["errors"] == 2


@pytest.mark.distributed
def test_zero_tag_audited_directly_finds_weight_and_moment_faults(
    zero2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import deepspeed  # noqa: F401  (the DeepSpeed classes in the file we rewrite)

    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    shutil.copytree(zero2_dir, ckpts)
    shutil.copytree(ckpts / TAG, ckpts / "best")
    with ZeroCheckpoint.open(ckpts) as ckpt:
        entries = ckpt.state_dict_entries()
        dec_w = entries["dec.weight"].pieces[-1]  # dec.weight lives on rank 1
        enc_b = entries["enc.bias"].pieces[0]
    shard = ckpts / TAG / f"zero_pp_rank_{dec_w.rank}_mp_rank_00_optim_states.pt"
    sd = torch.load(shard, weights_only=False)  # our own fixture: trusted
    osd = sd["optimizer_state_dict"]
    with torch.no_grad():  # the saved partitions keep requires_grad=True
        osd["single_partition_of_fp32_groups"][dec_w.group][dec_w.start + 3] = math.nan
    torch.save(sd, shard)
    shard = ckpts / TAG / f"zero_pp_rank_{enc_b.rank}_mp_rank_00_optim_states.pt"
    sd = torch.load(shard, weights_only=False)
    moments = sd["optimizer_state_dict"]["base_optimizer_state"]["state"][enc_b.group]
    moments["exp_avg_sq"][enc_b.start] = math.inf
    torch.save(sd, shard)

    out = tmp_path / "a.json"
    assert audit_weights.main([str(run), "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    labels = [s["label"] for s in data["sections"]]
    assert labels == [f"latest ({TAG})", "best"]
    latest, best = data["sections"]
    assert {(f["check"], f["tensor"]) for f in latest["findings"] if f["severity"] == "error"} == {
        ("nonfinite", "dec.weight"),
        ("moments_nonfinite", "enc.bias"),
    }
    assert not [f for f in best["findings"] if f["severity"] == "error"]  # untouched copy
    printed = capsys.readouterr().out
    assert "dec.weight: 1 NaN and 0 Inf of 55 elements" in printed
    assert "enc.bias: Adam exp_avg_sq holds 0 NaN and 1 Inf" in printed
    assert "UNHEALTHY" in printed


def test_dead_tensors_norms_at_init_and_fail_on_levels(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    weights = {
        "enc.block.linear.weight": torch.randn(6, 4, generator=g),
        "enc.block.norm.weight": torch.ones(6),  # never updated
        "enc.block.norm.bias": torch.randn(6, generator=g),
        "enc.pre_norm_bias": torch.zeros(6),  # a bias that never got a gradient
        "head.weight": torch.randn(3, 6, generator=g) * 5000,  # exploded
        "bn.running_var": torch.full((6,), 3.0e4),  # buffers: no abs-max / dead checks
        "bn.num_batches_tracked": torch.tensor(12),
    }
    path = tmp_path / "model.safetensors"
    save_file(weights, path)
    report = audit_path(path)
    found = {(f.check, f.tensor) for f in report.findings}
    assert found == {
        ("norm_at_init", "enc.block.norm.weight"),
        ("dead", "enc.pre_norm_bias"),
        ("abs_max", "head.weight"),
    }
    assert all(f.severity == "warn" for f in report.findings)
    assert audit_weights.main([str(path)]) == 0
    assert audit_weights.main([str(path), "--fail-on", "warn"]) == 1
    assert audit_weights.main([str(path), "--fail-on", "warn", "--max-abs", "1e6"]) == 1


def test_unreadable_inputs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_file({"w": torch.randn(100)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-40])
    (tmp_path / "junk.bin").write_text("not a checkpoint")
    for bad, message in [
        (tmp_path / "cut.safetensors", "unreadable safetensors file (truncated or not"),
        (tmp_path / "junk.bin", "not a complete PyTorch zip"),
        (tmp_path / "missing", "no such file or folder"),
        (tmp_path, "no checkpoint here"),
    ]:
        if bad == tmp_path:
            for p in tmp_path.iterdir():
                p.unlink()
        assert audit_weights.main([str(bad)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
