"""Issue 9: tags a cluster run can trust. Staging and whole replacement, metadata, manifests,
complete-only reading by the tools, DeepSpeed's zero_to_fp32 module API on our reader, and one
audit verdict per set of weights. Single-process (the multi-rank cases are in
test_train_distributed.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from giblet_ds.checkpoint import audit_path, convert_zero_checkpoint, load_model
from giblet_ds.checkpoint import zero_to_fp32 as api
from giblet_ds.errors import CheckpointError
from giblet_ds.run import RunDir, resolve_checkpoint
from giblet_ds.run.manifest import (
    TagMetadata,
    manifest_entries,
    read_metadata,
    verify_manifest,
    write_manifest,
)
from tests.test_tools_common import (
    REPO,
    assert_bitwise_equal,
    build_real_run,
    build_zero_checkpoint,
    load_tool,
    load_weights,
)

zero_to_fp32 = load_tool("zero_to_fp32")
audit_tool = load_tool("audit_weights")


# ---------------------------------------------------------------------------- manifest units


def _tag_with_manifest(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 40)
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\x01" * 5000)
    write_manifest(folder, manifest_entries(folder, sorted(p.name for p in folder.iterdir())))
    return folder


def _flip(path: Path, offset: int, n: int = 4) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_names_the_flipped_truncated_or_stale_file(tmp_path: Path) -> None:
    """Case 4 (unit): a 4-byte flip, a truncation and a file of another save are each named."""
    tag = _tag_with_manifest(tmp_path / "step-00000001")
    verify_manifest(tag)  # as written: passes
    optim = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    _flip(optim, 2000)
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt: check"):
        verify_manifest(tag)
    verify_manifest(tag, names=["mp_rank_00_model_states.pt"])  # that rank's share is fine
    _flip(optim, 2000)  # restored
    verify_manifest(tag)
    model = tag / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: 10239 bytes, the man"):
        verify_manifest(tag)
    other = _tag_with_manifest(tmp_path / "other")
    (other / "zero_pp_rank_3_mp_rank_00_optim_states.pt").write_bytes(b"stale")
    with pytest.raises(CheckpointError, match="not written by the save.*zero_pp_rank_3"):
        verify_manifest(other)


def test_staged_tag_replaces_the_old_one_as_a_whole(tmp_path: Path) -> None:
    """Case 2(b) (unit): `best` from 2 ranks, saved again by 1 rank: no 2-rank file survives, and
    the universal copy converted from the old files is gone."""
    run = RunDir(tmp_path / "run")
    old = run.tag_dir("best")
    old.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        (old / name).write_bytes(b"old")
    run.tag_dir("best-universal").mkdir()
    staged = run.fresh_staging("best")
    (staged / "mp_rank_00_model_states.pt").write_bytes(b"new")
    with pytest.raises(CheckpointError, match="staged tag has no 'complete' marker"):
        run.commit_staged("best")
    run.mark_complete("best", 7, staged=True)
    run.commit_staged("best")
    assert sorted(p.name for p in old.iterdir()) == ["complete", "mp_rank_00_model_states.pt"]
    assert (old / "mp_rank_00_model_states.pt").read_bytes() == b"new"
    assert not run.tag_dir("best-universal").exists()
    assert run.tags() == ["best"]  # the staging folder is not a tag


class _FakeEngine:
    """What Checkpointer.save asks of a DeepSpeed engine, writing DeepSpeed's file names."""

    dp_world_size = 1

    def zero_optimization_stage(self) -> int:
        return 2

    def bfloat16_enabled(self) -> bool:
        return False

    def fp16_enabled(self) -> bool:
        return False

    def save_checkpoint(self, save_dir: str, *, tag: str, client_state: Any, save_latest: bool):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {}, **client_state}, folder / "mp_rank_00_model_states.pt")
        torch.save({"x": torch.arange(10)}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):  # DeepSpeed's copies
            (Path(save_dir) / script).write_text("import zero_to_fp32  # deepspeed's\n")


def test_checkpointer_save_order_metadata_and_script(tmp_path: Path) -> None:
    """Cases 2 and 7 (unit): a save into a folder holding another save's files ends with exactly
    its own files + run_config, metadata, manifest and marker; the world size is read from the
    metadata, not by counting files; the script beside the checkpoints is the safe one."""
    from giblet_ds.train.checkpointer import Checkpointer
    from giblet_ds.train.engine import checkpoint_world_size

    run = RunDir(tmp_path / "run")
    stale = run.tag_dir("step-00000002")
    stale.mkdir(parents=True)
    for r in (1, 2):  # an interrupted 3-rank save
        (stale / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"stale")
    (run.staging_tag_dir("step-00000002")).mkdir(parents=True)
    (run.staging_tag_dir("step-00000002") / "leftover.pt").write_bytes(b"x")
    ckpt = Checkpointer(run, keep_last=3)
    state = {"sampler": {"consumed_global": 4}, "step": 2}
    tag = ckpt.save(_FakeEngine(), "step-00000002", step=2, state=state, config_yaml="a: 1\n",
                    store_hash="abc")  # fmt: skip
    assert sorted(p.name for p in tag.iterdir()) == [
        "complete", "manifest.json", "metadata.json", "mp_rank_00_model_states.pt",
        "run_config.yaml", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ]  # fmt: skip
    meta = read_metadata(tag)
    assert meta == TagMetadata(
        "step-00000002", 2, 1, 2, "abc", {"consumed_global": 4}, precision="fp32"
    )
    verify_manifest(tag)
    (tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(b"stale")
    assert checkpoint_world_size(tag) == 1  # 2 optimizer files, the metadata says 1
    assert (run.checkpoints / "latest").read_text() == "step-00000002"
    script = (run.checkpoints / "zero_to_fp32.py").read_text()
    assert "from giblet_ds.checkpoint.zero_to_fp32 import main" in script
    assert script == (REPO / "tools" / "zero_to_fp32.py").read_text()
    assert (run.checkpoints / "zero_to_torch.py").is_file()
    assert not list(run.staging.iterdir())
    (tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    # Resume verification names the corrupted file (every rank raises the same error).
    _flip(tag / "mp_rank_00_model_states.pt", 100)
    from giblet_ds.run import CheckpointLocation

    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: checksum"):
        ckpt.verify(CheckpointLocation("tag", tag, run, "test"))


def test_wandb_run_id_is_fresh_per_run_and_kept_on_resume(tmp_path: Path) -> None:
    """Case 6 (unit): two runs in folders of one name get two ids; a resume reuses its own."""
    from giblet_ds.train.run_log import wandb_run_id

    a, b = RunDir(tmp_path / "x" / "giblet_3p5b"), RunDir(tmp_path / "y" / "giblet_3p5b")
    id_a, id_b = wandb_run_id(a, resuming=False), wandb_run_id(b, resuming=False)
    assert id_a != id_b and "giblet" not in id_a and len(id_a) == 16
    assert wandb_run_id(a, resuming=True) == id_a
    assert wandb_run_id(a, resuming=False) != id_a  # a fresh start in the same folder


# ------------------------------------------------------------------- tools on a real run dir


@pytest.fixture(scope="session")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp() / "real_run_fixture"
    base.mkdir(exist_ok=True)
    return build_real_run(base)


def test_tools_read_only_complete_tags(real_run: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Case 3: `best` without its marker (a save that did not finish) is refused by name by
    zero_to_fp32, the audit and the model loader (exit 2, naming the newest complete tag); given
    the run directory they take the newest complete tag and say which."""
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    ckpts = run / "checkpoints"
    newest = RunDir(run).complete_step_tags()[-1]
    (ckpts / "best" / "complete").unlink()
    capsys.readouterr()
    assert zero_to_fp32.main([str(ckpts), str(tmp_path / "out"), "-t", "best"]) == 2
    err = capsys.readouterr().err
    assert "tag 'best' is incomplete" in err and f"newest complete tag is {newest}" in err
    assert not (tmp_path / "out").exists()
    assert audit_tool.main([str(ckpts / "best")]) == 2
    assert f"newest complete tag is {newest}" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="'best' is incomplete"):
        load_model(ckpts / "best")
    assert zero_to_fp32.main([str(run), str(tmp_path / "out")]) == 0
    assert f"using the newest complete tag {newest}" in capsys.readouterr().out
    assert audit_tool.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert f"latest ({newest})" in out and "note: best: not audited ('best' is incomplete" in out
    _, _, location = load_model(run)
    assert location.tag == newest and "'best' is incomplete" in location.how


def test_corrupted_tag_is_named_by_every_reader(real_run: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Case 4: a 4-byte flip inside a tag's weights (torch.load would read it without a word)."""
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    tag = run / "checkpoints" / RunDir(run).complete_step_tags()[-1]
    target = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    _flip(target, target.stat().st_size // 2)
    capsys.readouterr()
    assert zero_to_fp32.main([str(tag), str(tmp_path / "out")]) == 2
    assert f"{target}: checksum" in capsys.readouterr().err
    assert audit_tool.main([str(run)]) == 2
    assert f"{target}: checksum" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="checksum .* does not match"):
        load_model(tag)
    with pytest.raises(CheckpointError, match="checksum"):
        resolve_checkpoint(run)
    # The opt-out reads it anyway (for speed, at the user's risk).
    assert zero_to_fp32.main([str(tag), str(tmp_path / "out"), "--no-verify"]) == 0


def test_deepspeed_zero_to_torch_runs_on_our_script(real_run: Path, tmp_path: Path) -> None:
    """Cases 7 and 8: DeepSpeed's zero_to_torch.py, beside our zero_to_fp32.py in the checkpoints
    folder, converts to bf16 through our module-level functions; the result equals ours."""
    ckpts = real_run / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "bf16"
    proc = subprocess.run(
        [sys.executable, str(ckpts / "zero_to_torch.py"), str(ckpts), str(out), "--dtype", "bf16"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = tmp_path / "ours"
    convert_zero_checkpoint(ckpts, ours, dtype="bf16")
    a, b = load_weights(out), load_weights(ours)
    assert sorted(a) == sorted(b) and a
    for name in a:
        assert a[name].dtype in (torch.bfloat16, torch.int64)
        assert_bitwise_equal(a[name], b[name], name)


def test_module_level_api_matches_deepspeed(tmp_path: Path, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    """Case 8: DeepSpeed 0.19.8's names, signatures and results."""
    import inspect

    from deepspeed.utils import zero_to_fp32 as ds

    for name in ("get_fp32_state_dict_from_zero_checkpoint", "load_state_dict_from_zero_checkpoint",
                 "convert_zero_checkpoint_to_fp32_state_dict",
                 "convert_zero_checkpoint_to_state_dict"):  # fmt: skip
        ours, theirs = inspect.signature(getattr(api, name)), inspect.signature(getattr(ds, name))
        assert list(ours.parameters) == list(theirs.parameters), name
        assert [p.default for p in ours.parameters.values()] == [
            p.default for p in theirs.parameters.values()
        ], name
    assert api.OUTPUT_DTYPE_NAMES == ds.OUTPUT_DTYPE_NAMES
    base = tmp_path_factory.getbasetemp() / "zero_fixtures"
    base.mkdir(exist_ok=True)
    ckpt = build_zero_checkpoint(base, 2, 2, True)
    theirs_sd = ds.get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    ours_sd = api.get_fp32_state_dict_from_zero_checkpoint(ckpt)
    assert list(ours_sd) == list(theirs_sd)
    for name in theirs_sd:
        assert_bitwise_equal(ours_sd[name], theirs_sd[name], name)
    lazy = api.get_fp32_state_dict_from_zero_checkpoint(ckpt, lazy_mode=True)
    assert_bitwise_equal(lazy["enc.weight"].contiguous(), theirs_sd["enc.weight"])
    for dtype in ("fp16", torch.bfloat16):
        api.convert_zero_checkpoint_to_state_dict(ckpt, tmp_path / f"o{dtype}", dtype=dtype,
                                                  max_shard_size=None)  # fmt: skip
        ds.convert_zero_checkpoint_to_state_dict(str(ckpt), str(tmp_path / f"d{dtype}"),
                                                 dtype=dtype, max_shard_size=None)  # fmt: skip
        a, b = load_weights(tmp_path / f"o{dtype}"), load_weights(tmp_path / f"d{dtype}")
        assert sorted(a) == sorted(b)
        for name in a:
            assert_bitwise_equal(a[name], b[name], name)
    with pytest.raises(ValueError, match="Unsupported output dtype 'int8'"):
        api.convert_zero_checkpoint_to_state_dict(ckpt, tmp_path / "x", dtype="int8")


# ------------------------------------------------------------------------------ case 9: audit


def test_same_weights_same_audit_verdict_in_every_form(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A tag with a constant frozen parameter and a constant buffer gets the same findings as its
    consolidated .bin: only the fixture's trainable `scale` (its gradient is
    uniform, so it stays constant) is dead; the frozen bias and the buffer are not, although a
    consolidated file alone cannot tell frozen from trainable (tensor_kinds.json beside it does)."""
    base = tmp_path_factory.getbasetemp() / "zero_fixtures"
    base.mkdir(exist_ok=True)
    src = build_zero_checkpoint(base, 2, 2, True)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    model_file = next((ckpt).glob("*/mp_rank_00_model_states.pt"))
    sd = torch.load(model_file, weights_only=False)  # our own fixture: trusted
    sd["frozen_param_fragments"]["frozen.bias"].fill_(0.25)
    sd["module"]["frozen.bias"] = sd["frozen_param_fragments"]["frozen.bias"]
    sd["module"]["const"] = torch.full((6,), 3.0)
    sd["buffer_names"] = [*sd["buffer_names"], "const"]
    torch.save(sd, model_file)
    tag = model_file.parent

    def findings(path: Path) -> list[tuple[str, str]]:
        return sorted((f.check, f.tensor) for f in audit_path(path).findings)

    assert findings(tag) == [("dead", "scale")]
    assert audit_tool.main([str(tag), "--fail-on", "warn"]) == 1
    # (safetensors refuses this fixture's tied weights; its kinds come from the same file)
    out = tmp_path / "consolidated_False"
    assert zero_to_fp32.main([str(ckpt), str(out), "--no-shard"]) == 0
    assert findings(out / "pytorch_model.bin") == [("dead", "scale")]
    assert audit_tool.main([str(out / "pytorch_model.bin"), "--fail-on", "warn"]) == 1
    # The same tensors without the kinds file are judged as trainable: the two constants warn.
    (tmp_path / "consolidated_False" / "tensor_kinds.json").unlink()
    report = audit_path(tmp_path / "consolidated_False" / "pytorch_model.bin")
    assert sorted(f.tensor for f in report.findings) == ["const", "frozen.bias", "scale"]
