"""tools/zero_to_fp32.py against DeepSpeed's own script, on real 2-rank ZeRO-2 and ZeRO-3 tags."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from giblet_ds.checkpoint import (
    TensorMeta,
    ZeroCheckpoint,
    convert_zero_checkpoint,
    load_torch_file,
    plan_shards,
    write_safetensors_file,
    write_torch_file,
)
from giblet_ds.errors import CheckpointError
from giblet_ds.run import resolve_checkpoint
from tests.test_tools_common import (
    REPO,
    TAG,
    assert_bitwise_equal,
    build_real_run,
    build_zero_checkpoint,
    load_tool,
    load_weights,
)

zero_to_fp32 = load_tool("zero_to_fp32")


@pytest.fixture(scope="session")
def zero2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ZeRO-2, 2 ranks, with a frozen layer and tied weights."""
    base = tmp_path_factory.getbasetemp() / "zero_fixtures"
    base.mkdir(exist_ok=True)
    return build_zero_checkpoint(base, 2, 2, True)


@pytest.fixture(scope="session")
def zero3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp() / "zero_fixtures"
    base.mkdir(exist_ok=True)
    return build_zero_checkpoint(base, 3, 2)


def deepspeed_convert(ckpt: Path, out: Path, **kwargs: object) -> None:
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_state_dict

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        convert_zero_checkpoint_to_state_dict(str(ckpt), str(out), **kwargs)


def weight_files(folder: Path) -> list[str]:
    """Files of a consolidated folder but our tensor_kinds.json (which DeepSpeed does not write)."""
    return sorted(n for n in os.listdir(folder) if n != "tensor_kinds.json")


def copy_tag(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- equality with DS


@pytest.mark.distributed
def test_zero2_equals_deepspeed_tensor_for_tensor(zero2_dir: Path, tmp_path: Path) -> None:
    ds_out, ours = tmp_path / "ds", tmp_path / "ours"
    deepspeed_convert(zero2_dir, ds_out, max_shard_size=400)
    rc = zero_to_fp32.main([str(zero2_dir), str(ours), "--max_shard_size", "0.0004MB"])
    assert rc == 0
    names = sorted(os.listdir(ds_out))
    assert names == weight_files(ours)
    assert "pytorch_model.bin.index.json" in names and len(names) >= 3  # really sharded
    index = "pytorch_model.bin.index.json"
    assert (ds_out / index).read_bytes() == (ours / index).read_bytes()
    for name in names:
        if name.endswith(".bin"):
            a = torch.load(ds_out / name, weights_only=True)
            b = torch.load(ours / name, weights_only=True)
            assert list(a) == list(b)  # same tensors, same order, per shard
            for key in a:
                assert_bitwise_equal(a[key], b[key], key)
    weights = load_weights(ours)
    assert "frozen.weight" in weights and weights["norm.num_batches_tracked"].dtype == torch.int64
    assert weights["norm.num_batches_tracked"].item() == 4
    # tied names share one storage in our output, as torch.save keeps them
    assert weights["sq_tied.weight"].data_ptr() == weights["sq.weight"].data_ptr()


@pytest.mark.distributed
@pytest.mark.parametrize(("safe", "dtype"), [(True, "fp32"), (False, "bf16"), (False, "fp32")])
def test_zero3_equals_deepspeed(zero3_dir: Path, tmp_path: Path, safe: bool, dtype: str) -> None:
    ds_out, ours = tmp_path / "ds", tmp_path / "ours"
    deepspeed_convert(zero3_dir, ds_out, max_shard_size=300, safe_serialization=safe, dtype=dtype)
    result = convert_zero_checkpoint(
        zero3_dir,
        ours,
        max_shard_size=300,
        safe_serialization=safe,
        dtype=dtype,  # type: ignore[arg-type]
    )
    names = sorted(os.listdir(ds_out))
    assert names == weight_files(ours) and len(names) >= 3
    for name in names:
        same_bytes = (ds_out / name).read_bytes() == (ours / name).read_bytes()
        # DeepSpeed's fp32 ZeRO-3 .bin keeps each odd-sized tensor as a view of its padded gather
        # (one spare element in the file); every other combination is the same file byte for byte.
        assert same_bytes or (name.endswith(".bin") and dtype == "fp32"), name
    a, b = load_weights(ds_out), load_weights(ours)
    assert list(a) == list(b)
    for key in a:
        assert_bitwise_equal(a[key], b[key], key)
    assert (result.stage, result.world_size, result.num_tensors) == (3, 2, 10)
    # 7*11 + 11 + 11*5 + 5 + 13 + 2*11 (norm) + 11 + 11 (buffers) + 1 = 206
    assert result.num_elements == 206


@pytest.mark.distributed
def test_bf16_output_equals_deepspeed_and_rounds_fp32(
    zero2_dir: Path, zero3_dir: Path, tmp_path: Path
) -> None:
    for ckpt in (zero2_dir, zero3_dir):
        ds_out, ours, fp32 = (tmp_path / ckpt.name / d for d in ("ds", "ours", "fp32"))
        deepspeed_convert(ckpt, ds_out, dtype="bf16")
        assert zero_to_fp32.main([str(ckpt), str(ours), "--dtype", "bf16"]) == 0
        convert_zero_checkpoint(ckpt, fp32)
        a, b, full = load_weights(ds_out), load_weights(ours), load_weights(fp32)
        assert list(a) == list(b)
        for key in a:
            assert_bitwise_equal(a[key], b[key], key)
            expected = full[key].to(torch.bfloat16) if full[key].is_floating_point() else full[key]
            assert_bitwise_equal(b[key], expected, key)
        assert b["enc.weight"].dtype == torch.bfloat16
        assert b["norm.num_batches_tracked"].dtype == torch.int64  # integer buffers keep theirs


@pytest.fixture(scope="session")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp() / "real_run_fixture"
    base.mkdir(exist_ok=True)
    return build_real_run(base)


def test_trainer_tags_equal_deepspeed(real_run: Path, tmp_path: Path) -> None:
    """Tags written by launch/train.py (client state with RNG, sampler and config) read with
    weights_only=True and consolidate to DeepSpeed's tensors: ZeRO-2 latest and best, ZeRO-3."""
    zero3_run = build_real_run(real_run.parent, 3)
    for run, tag in ((real_run, "best"), (real_run, None), (zero3_run, None)):
        ds_out, ours = tmp_path / f"ds_{run.name}_{tag}", tmp_path / f"ours_{run.name}_{tag}"
        deepspeed_convert(run / "checkpoints", ds_out, tag=tag)
        result = convert_zero_checkpoint(run / "checkpoints", ours, tag=tag)
        assert result.stage == (3 if run is zero3_run else 2)
        a, b = load_weights(ds_out), load_weights(ours)
        assert list(a) == list(b) and len(a) > 20
        for key in a:
            assert_bitwise_equal(a[key], b[key], key)


@pytest.mark.distributed
def test_no_shard_and_exclude_frozen(zero2_dir: Path, tmp_path: Path) -> None:
    ds_out, ours = tmp_path / "ds", tmp_path / "ours"
    deepspeed_convert(zero2_dir, ds_out, max_shard_size=None, exclude_frozen_parameters=True)
    args = [str(zero2_dir), str(ours), "--no-shard", "--max_shard_size", "1KB", "-t", TAG]
    assert zero_to_fp32.main([*args, "--exclude_frozen_parameters"]) == 0
    assert weight_files(ours) == ["pytorch_model.bin"]
    a, b = load_weights(ds_out), load_weights(ours)
    assert "frozen.weight" not in b and list(a) == list(b)
    for key in a:
        assert_bitwise_equal(a[key], b[key], key)


@pytest.mark.distributed
def test_safetensors_refuses_tied_weights(zero2_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    assert zero_to_fp32.main([str(zero2_dir), str(out), "--safe_serialization"]) == 2
    err = capsys.readouterr().err
    assert "sq.weight" in err and "sq_tied.weight" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.distributed
def test_reader_uses_positional_reads_and_moments(zero3_dir: Path) -> None:
    with ZeroCheckpoint.open(zero3_dir) as ckpt:
        assert ckpt.tag == TAG and ckpt.has_moments()
        # every optimizer file was mapped to byte offsets: no fallback copy through the mmap
        assert all(f._base is not None for f in ckpt._optim)
        entries = ckpt.state_dict_entries()
        enc = entries["enc.weight"]
        assert [p.numel for p in enc.pieces] == [39, 38]  # ceil(77 / 2) on rank 0, rest on rank 1
        m, v = ckpt.read(enc, "exp_avg"), ckpt.read(enc, "exp_avg_sq")
        assert m.shape == (11, 7) and bool(torch.isfinite(m).all()) and bool((v > 0).any())


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.distributed
def test_missing_rank_files_are_named(
    zero2_dir: Path, zero3_dir: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    z2 = copy_tag(zero2_dir, tmp_path / "z2")
    (z2 / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    out = tmp_path / "out"
    assert zero_to_fp32.main([str(z2), str(out)]) == 2
    err = capsys.readouterr().err
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in err and "2 data-parallel rank" in err
    assert not out.exists()

    z3 = copy_tag(zero3_dir, tmp_path / "z3")
    (z3 / TAG / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    (z3 / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="missing 2 file") as info:
        convert_zero_checkpoint(z3, out)
    assert "zero_pp_rank_1_mp_rank_00_model_states.pt" in str(info.value)


@pytest.mark.distributed
def test_truncated_shard_fails_cleanly(zero3_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    z3 = copy_tag(zero3_dir, tmp_path / "z3")
    shard = z3 / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) * 6 // 10])
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    assert zero_to_fp32.main([str(z3), str(out)]) == 2
    err = capsys.readouterr().err
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in err and "truncated" in err
    assert os.listdir(out) == ["keep.txt"]  # nothing partial, the user's file untouched


@pytest.mark.distributed
def test_failure_midway_leaves_no_partial_output(
    zero2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real_read = ZeroCheckpoint.read

    def flaky(self, entry, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 6:
            raise CheckpointError("disk vanished")
        return real_read(self, entry, *args, **kwargs)

    monkeypatch.setattr(ZeroCheckpoint, "read", flaky)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="disk vanished"):
        convert_zero_checkpoint(zero2_dir, out, max_shard_size=400)
    assert calls["n"] == 6 and not out.exists()


@pytest.mark.distributed
def test_pickle_that_runs_code_is_refused(zero2_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    z2 = copy_tag(zero2_dir, tmp_path / "z2")
    evil = z2 / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": 2, "x": Exploit()}}, evil)
    assert zero_to_fp32.main([str(z2), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "refused to unpickle" in err and "system" in err
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_torch_file(evil)
    assert not marker.exists()


def test_tag_resolution_errors_name_what_exists(tmp_path: Path) -> None:
    (tmp_path / "ckpts" / "step-00000001").mkdir(parents=True)
    (tmp_path / "ckpts" / "step-00000001" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"no 'latest' file.*step-00000001"):
        resolve_checkpoint(tmp_path / "ckpts")
    with pytest.raises(CheckpointError, match=r"best: tag folder not found.*step-00000001"):
        resolve_checkpoint(tmp_path / "ckpts", tag="best")
    tag = tmp_path / "ckpts" / "step-00000001"
    assert resolve_checkpoint(tag).path == tag  # a tag folder given directly
    with pytest.raises(CheckpointError, match="not a complete PyTorch zip"):
        ZeroCheckpoint.open(tag)


def test_cli_help_and_clean_error_without_traceback(tmp_path: Path) -> None:
    tool = [sys.executable, str(REPO / "tools" / "zero_to_fp32.py")]
    help_text = subprocess.run([*tool, "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--safe_serialization", "--max_shard_size", "--exclude_frozen_parameters",
                 "--dtype {bf16,fp16,fp32}", "--no-shard", "-t TAG"):  # fmt: skip
        assert flag in help_text
    bad = subprocess.run([*tool, str(tmp_path / "nope"), str(tmp_path / "o")], capture_output=True,
                         text=True)  # fmt: skip
    assert bad.returncode == 2 and "no such file or folder" in bad.stderr
    assert "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------- writers


def _mixed_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    sd = {
        "w": torch.randn(3, 5, generator=g),
        "steps": torch.arange(4),
        "half": torch.randn(7, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 5),
        "mask": torch.tensor([True, False, True]),
        "ü.weight": torch.randn(2, 2, generator=g).half(),
    }
    return sd


def _metas(sd: dict[str, torch.Tensor]) -> dict[str, TensorMeta]:
    by_id: dict[int, TensorMeta] = {}
    return {k: by_id.setdefault(id(v), TensorMeta(tuple(v.shape), v.dtype)) for k, v in sd.items()}


def test_streaming_writers_write_the_bytes_torch_and_safetensors_write(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = _mixed_state_dict()
    sd["tied"] = sd["w"]
    (tmp_path / "ref").mkdir()
    (tmp_path / "ours").mkdir()
    torch.save(sd, tmp_path / "ref" / "pytorch_model.bin")
    write_torch_file(tmp_path / "ours" / "pytorch_model.bin", _metas(sd), sd.__getitem__)
    ref, ours = (tmp_path / d / "pytorch_model.bin" for d in ("ref", "ours"))
    assert ref.read_bytes() == ours.read_bytes()

    del sd["tied"]
    save_file(sd, tmp_path / "ref" / "model.safetensors", metadata={"format": "pt"})
    write_safetensors_file(tmp_path / "ours" / "model.safetensors", _metas(sd), sd.__getitem__,
                           {"format": "pt"})  # fmt: skip
    ref, ours = (tmp_path / d / "model.safetensors" for d in ("ref", "ours"))
    assert ref.read_bytes() == ours.read_bytes()


def test_shard_plan_matches_huggingface_split() -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    g = torch.Generator().manual_seed(0)
    sd = {f"t{i}": torch.empty(int(torch.randint(0, 60, (1,), generator=g))) for i in range(40)}
    sd["t7"] = torch.empty(0)
    sd["tie_a"] = sd["t3"]
    sd["tie_b"] = sd["t30"]
    for size in (64, 150, 1000, 10_000):
        ref = split_torch_state_dict_into_shards(sd, filename_pattern="m{suffix}.bin",
                                                 max_shard_size=size)  # fmt: skip
        ours = plan_shards(_metas(sd), "m.bin", size)
        assert ours.filename_to_tensors == ref.filename_to_tensors
        assert ours.tensor_to_filename == ref.tensor_to_filename
        assert ours.metadata == ref.metadata


def test_private_torch_names_we_rely_on() -> None:
    """serialization.py writes .bin files through four private torch names (no public API streams a
    zip checkpoint one tensor at a time). If torch renames or changes one, this fails first."""
    import inspect

    rebuild = torch._utils._rebuild_tensor_v2
    assert list(inspect.signature(rebuild).parameters)[:6] == [
        "storage", "storage_offset", "size", "stride", "requires_grad", "backward_hooks"
    ]  # fmt: skip
    names = torch.storage._dtype_to_storage_type_map()
    assert names[torch.float32] == "FloatStorage" and names[torch.bfloat16] == "BFloat16Storage"
    assert torch.serialization._get_storage_alignment() == 64
    with torch.serialization._open_zipfile_writer(io.BytesIO()) as zf:
        assert callable(zf.write_record)
