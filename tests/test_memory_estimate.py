"""Memory estimate: DeepSpeed's ZeRO figures against hand formulas, activations, no allocation."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from giblet_ds.config import RunConfig, load_config
from giblet_ds.errors import ConfigError
from giblet_ds.losses import NormalizedLoss, TargetVariances
from giblet_ds.memory_estimate import (
    activation_bytes,
    batch_bytes,
    build_meta_model,
    estimate,
    format_estimate,
    largest_layer,
)
from giblet_ds.model import GibletAutoencoder
from tests.tiny_sizes import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "launch" / "configs"
P_DEFAULT = 3_513_060_994  # the default 3.5B preset (context_trs 12: a 24,576-weight mixer)
P_SEED = 3_500_188_290
VIDEO_IN = 10 * 90 * 160 * 3
LARGEST = VIDEO_IN * 4096  # encoder.video.blocks.0.linear, no bias


def config(name: str, *overrides: str) -> RunConfig:
    return load_config(CONFIGS / name, overrides)


def tiny(*overrides: str) -> RunConfig:
    return config("tiny.yaml", *TINY_OVERRIDES, *overrides)


# ---------------------------------------------------------------- ZeRO model states by hand


def zero_by_hand(p: int, largest: int, gpus: int, nodes: int) -> list[tuple[str, int, int]]:
    """(label, GPU bytes, CPU bytes per node) from DeepSpeed's documented formulas.

    ZeRO-2 keeps 16-bit params on every GPU (2 bytes each) and partitions 18 bytes per param over
    the N GPUs: 16-bit grads (2), fp32 grads (4), fp32 master params (4), Adam moments (8). (The
    ZeRO paper's 2 + 14/N leaves out the fp32 gradient copy that DeepSpeed's estimator counts.)
    ZeRO-3 partitions the 16-bit params too and gathers the largest layer whole (4 bytes per
    param: its 16-bit weights and gradients). CPU figures carry DeepSpeed's 1.5x buffer factor.
    """
    n = gpus * nodes
    layer = 4 * largest
    return [
        ("ZeRO-2", 2 * p + int(18 * p / n), int(p * 4 * gpus * 1.5)),
        ("ZeRO-2, offload optimizer to CPU", 2 * p, int(p * max(4 * n, 16) * 1.5)),
        ("ZeRO-3", layer + int(18 * p / n), int(largest * 4 * gpus * 1.5)),
        ("ZeRO-3, offload optimizer to CPU", layer + int(2 * p / n), int(p * 16 / nodes * 1.5)),
        ("ZeRO-3, offload optimizer + params to CPU", layer, int(p * 18 / nodes * 1.5)),
    ]


def test_zero_figures_match_the_hand_formulas_on_8_gpus() -> None:
    est = estimate(config("giblet_3p5b.yaml"), num_gpus=8, num_nodes=1)
    assert est.total_params == P_DEFAULT
    assert (est.largest_layer_name, est.largest_layer_params) == (
        "encoder.video.blocks.0.linear",
        1_769_472_000,
    )
    got = [(z.label, z.gpu_bytes, z.cpu_bytes) for z in est.zero]
    assert got == zero_by_hand(P_DEFAULT, LARGEST, 8, 1)
    # The headline figure: ZeRO-2 on 8 GPUs needs 2 x 3.513e9 + 18 x 3.513e9 / 8 bytes per GPU.
    assert est.zero[0].gpu_bytes == 7_026_121_988 + 7_904_387_236 == 14_930_509_224
    # No offload holds more per GPU than the ZeRO paper's lower bound 2 + 14 / N bytes per param.
    assert est.zero[0].gpu_bytes > 2 * P_DEFAULT + 14 * P_DEFAULT // 8


def test_zero_figures_on_two_nodes() -> None:
    est = estimate(config("giblet_3p5b_seed.yaml"), num_gpus=4, num_nodes=2)
    assert est.world_size == 8
    # seed_compat's first video layer has a bias
    assert est.largest_layer_params == LARGEST + 4096
    got = [(z.label, z.gpu_bytes, z.cpu_bytes) for z in est.zero]
    assert got == zero_by_hand(P_SEED, LARGEST + 4096, 4, 2)


def test_zero_figures_are_deepspeeds() -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    est = estimate(config("giblet_3p5b.yaml"), num_gpus=8, num_nodes=1)
    assert estimate_zero2_model_states_mem_needs(P_DEFAULT, 8, 1, cpu_offload=False) == (
        est.zero[0].cpu_bytes,
        est.zero[0].gpu_bytes,
    )
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        P_DEFAULT, LARGEST, 8, 1, cpu_offload=True, cpu_offload_params=True, zero_init=True
    )
    assert (cpu, gpu) == (est.zero[4].cpu_bytes, est.zero[4].gpu_bytes)


def test_largest_layer_is_the_module_with_most_own_parameters() -> None:
    model = build_meta_model(tiny().model)
    # 360 -> 16 video layer (5,760) is smaller than the audio code table (2 x 1024 x 3 = 6,144)
    assert largest_layer(model) == ("encoder.audio.codebook", 6_144)


# ------------------------------------------------------------------------------ activations


def test_activations_of_tiny_by_hand() -> None:
    # Per sample, bf16 (2 bytes). Blocks without dropout, where a ReLU output is the next
    # Linear's input (counted once); see the memory_estimate.activation_bytes docstring.
    blocks = sum(
        [
            720 + 72 + 40,  # video 360->16->8: input, then own (norm in, LN stats, ReLU out)
            30 + 40,  # audio 15->8
            28 + 40,  # text 14->8
            48 + 56 + 20,  # trunk 24->12->6 (the bottleneck: norm in + stats only)
            12 + 48,  # fMRI head 6->10, its output Linear reads the ReLU output
            12 + 56,  # decoder trunk 6->12
            24 + 64,  # video head 12->14
            24 + 44,  # audio head 12->9
            24 + 36,  # text head 12->7
        ]
    )
    assert blocks == 1_438
    loss = 4 * (23 + 180 + 14)  # fp32 MSE predictions
    audio = 8 * 10 + 2 * 10 * 3 + 4 * 10 * 1024  # indices, queries, fp32 log-softmax
    batch = 4 * 360 + 8 * 10 + 4 * 14 + 4 * 23
    assert batch == batch_bytes(tiny().model) == 1_668
    outside = loss + audio + batch
    assert outside == 43_636
    ckpt = 2 * (360 + 16 + 15 + 14 + 24 + 12 + 6 + 6 + 12 + 12 + 12) + 72 + 2 * (10 + 14 + 9 + 7)
    est = estimate(tiny(), num_gpus=1)
    assert est.activations.micro_batch_size == 2
    assert est.activations.without_checkpointing == 2 * (blocks + outside) == 90_148
    assert est.activations.with_checkpointing == 2 * (ckpt + outside) == 89_532
    assert not est.activation_checkpointing
    assert est.configured_activation_bytes == 90_148


def test_activations_of_tiny_with_a_context_window_by_hand() -> None:
    # k = 3: the per-TR stacks (video, audio, text and the trunk, one code per TR) run on 3 rows
    # per sample, the code indices and the stimulus part of the batch count 3 times, the mixer
    # saves its masked (3, 6) input of codes and the mask cast (3), all bf16. Everything after
    # the mixer (fMRI head, decoder) is as at k = 1.
    est = estimate(tiny("model.context_trs=3"), num_gpus=1)
    trunk = (24 + 8 + 24 + 2 * 24) + (12 + 8)  # 24->12 with its input, ReLU, stats; 12->6: 124
    per_tr_blocks = (720 + 72 + 40) + (30 + 40) + (28 + 40) + trunk  # 1,094, from the k = 1 case
    blocks = 1_438 + 2 * per_tr_blocks
    assert blocks == 3_626
    audio = 8 * 10 * 3 + 2 * 10 * 3 + 4 * 10 * 1024
    mixer = 2 * 3 * (6 + 1)
    batch = 3 * (4 * 360 + 4 * 14 + 8 * 10) + 4 * 23 + 3  # + the 3-byte window mask
    assert batch == batch_bytes(tiny("model.context_trs=3").model) == 4_823
    outside = 4 * (23 + 180 + 14) + audio + mixer + batch
    assert outside == 46_993
    ckpt = 2 * (3 * (360 + 16 + 15 + 14 + 24 + 12) + 6 + 6 + 12 + 12 + 12)
    recompute = 3 * 72  # the first video block, recomputed for 3 rows at once
    heads = 2 * (10 + 14 + 9 + 7)
    assert est.activations.without_checkpointing == 2 * (blocks + outside) == 101_238
    assert est.activations.with_checkpointing == 2 * (ckpt + recompute + heads + outside) == 100_062


def test_activations_of_tiny_with_subject_heads_by_hand() -> None:
    # 3 subjects, rank 8 on the fMRI head's 10-wide hidden layer, 23 voxels: the residual's
    # low-rank codes of 4 slots (bf16), the 3-byte subject-dropout mask, the loss's fp32
    # difference of the 3 subject predictions and the batch's 3 volumes (fp32).
    cfg = tiny("data.target=subjects", "model.n_subjects=3")
    assert batch_bytes(cfg.model) == 1_668 + 4 * 3 * 23 == 1_944
    subjects = 2 * 4 * 8 + 3 + 4 * 3 * 23 + 4 * 3 * 23
    assert subjects == 619
    est = estimate(cfg, num_gpus=1)
    assert est.activations.without_checkpointing == 2 * (1_438 + 43_636 + subjects) == 91_386
    assert est.activations.with_checkpointing == 89_532 + 2 * subjects
    # the parameters follow the model: 4 slots x (8 x (10 + 23) + 23) more than without heads
    assert est.total_params == estimate(tiny(), num_gpus=1).total_params + 4 * (8 * 33 + 23)


def test_activations_with_dropout_and_a_larger_batch() -> None:
    est = estimate(tiny("model.dropout=0.1", "optim.micro_batch_size=3"), num_gpus=1)
    # Every block now saves its input and a 1-byte mask per activated output.
    inputs = 2 * 489
    owns = 88 + 48 + 48 + 48 + 68 + 20 + 58 + 68 + 78 + 53 + 43
    heads = 2 * (10 + 14 + 9 + 7)
    assert est.activations.without_checkpointing == 3 * (inputs + owns + heads + 43_636)
    assert est.activations.with_checkpointing == 3 * (inputs + 88 + heads + 43_636)


def test_checkpointing_setting_picks_the_figure() -> None:
    est = estimate(config("giblet_3p5b.yaml"), num_gpus=8)
    assert est.activation_checkpointing
    assert est.configured_activation_bytes == est.activations.with_checkpointing
    assert est.activations.with_checkpointing < est.activations.without_checkpointing


def saved_bytes(cfg: RunConfig, batch_size: int) -> int:
    """Bytes autograd saves for backward in a real bf16 forward and loss (CPU), parameters
    excluded, each storage counted once."""
    model_cfg = cfg.model
    torch.manual_seed(0)
    model = GibletAutoencoder(model_cfg)
    model.init_weights()
    model.to(torch.bfloat16).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert model_cfg.frames_per_tr and model_cfg.frame_height and model_cfg.frame_width
    assert model_cfg.n_codebooks and model_cfg.code_frames and model_cfg.text_slots
    assert model_cfg.text_dim and model_cfg.n_voxels
    b = batch_size
    k = model_cfg.context_trs
    window = (b, k) if k > 1 else (b,)
    batch = {
        "video": torch.rand(
            *window, model_cfg.frames_per_tr, model_cfg.frame_height, model_cfg.frame_width, 3
        ),
        "audio_codes": torch.randint(
            0, model_cfg.codebook_size, (*window, model_cfg.n_codebooks, model_cfg.code_frames)
        ),
        "text": torch.randn(*window, model_cfg.text_slots, model_cfg.text_dim),
        "fmri": torch.randn(b, model_cfg.n_voxels),
    }
    if k > 1:
        batch["context_mask"] = torch.ones(b, k, dtype=torch.bool)
        batch["context_mask"][0, 0] = False  # padding at the start of a movie
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    n_subjects = model_cfg.n_subjects
    if n_subjects:
        batch["fmri_subjects"] = torch.randn(b, n_subjects, model_cfg.n_voxels)
    loss = NormalizedLoss(
        TargetVariances(1.0, 1.0, 1.0, 1.0, (1.0,) * n_subjects if n_subjects else None),
        cfg.loss.weights(),
        codebook_size=model_cfg.codebook_size,
    )
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(
            batch["video"].bfloat16(),
            batch["audio_codes"],
            batch["text"].bfloat16(),
            batch.get("context_mask"),
        )
        loss(out, batch)
    return sum(saved.values())


@pytest.mark.parametrize(
    ("dropout", "k", "subjects"), [(0.0, 1, 0), (0.2, 1, 0), (0.0, 4, 0), (0.2, 4, 0), (0.2, 4, 3)]
)
def test_activation_formula_is_close_to_what_autograd_saves(
    dropout: float, k: int, subjects: int
) -> None:
    # Wide enough that the blocks, not the audio logits, dominate. On CPU the kernels differ
    # from CUDA's in small ways (bf16 LayerNorm statistics and dropout masks), hence a band.
    heads = ["data.target=subjects", f"model.n_subjects={subjects}"] if subjects else []
    cfg = tiny(
        *heads,
        "model.n_voxels=400",
        f"model.dropout={dropout}",
        f"model.context_trs={k}",
        "model.codebook_size=16",
        "model.video_hidden=[256, 128]",
        "model.trunk_hidden=[192]",
        "model.bottleneck=96",
        "model.fmri_hidden=[160]",
        "model.decoder_hidden=[144]",
        "model.audio_hidden=[64]",
        "model.text_hidden=[48]",
    )
    est = activation_bytes(build_meta_model(cfg.model), 3).without_checkpointing
    measured = saved_bytes(cfg, 3)
    assert 0.85 < est / measured < 1.15, (est, measured)


# ---------------------------------------------------------------------------- no allocation


class NoAllocation(TorchDispatchMode):
    """Fails any op that would create a tensor off the meta device, before it runs."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        device = kwargs.get("device")
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if device is not None and torch.device(device).type != "meta":
            raise AssertionError(f"{func} would allocate on {device}")
        if device is None and not inputs:  # a factory without a device: the default (CPU)
            raise AssertionError(f"{func} would allocate on the default device")
        if any(not t.is_meta for t in inputs):
            raise AssertionError(f"{func} reads a real tensor")
        out = func(*args, **kwargs)
        assert all(t.is_meta for t in tree_leaves(out) if isinstance(t, torch.Tensor)), func
        return out


def test_estimate_never_allocates_the_model() -> None:
    estimate(tiny(), num_gpus=8)  # imports deepspeed outside the guard
    with NoAllocation():
        est = estimate(config("giblet_3p5b.yaml"), num_gpus=8)
    assert est.total_params == P_DEFAULT
    model = build_meta_model(config("giblet_3p5b.yaml").model)
    assert all(p.is_meta for p in model.parameters())


def test_the_guard_catches_a_real_allocation() -> None:
    with pytest.raises(AssertionError, match="would allocate"), NoAllocation():
        torch.nn.Linear(3, 4)


# ------------------------------------------------------------------------ errors and output


def test_missing_input_sizes_are_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        estimate(config("small.yaml"))
    assert str(info.value) == (
        "model input sizes ['frames_per_tr', 'frame_height', 'frame_width', 'n_codebooks', "
        "'code_frames', 'text_slots', 'text_dim', 'n_voxels'] are null; the memory estimate needs "
        "them: set them in the model section (e.g. --set model.n_voxels=83138) or fill them from "
        "the store"
    )


def test_bad_gpu_counts() -> None:
    with pytest.raises(ConfigError, match=r"^num_gpus \(per node\) must be >= 1, got 0$"):
        estimate(tiny(), num_gpus=0)
    with pytest.raises(ConfigError, match=r"^num_nodes must be >= 1, got -1$"):
        estimate(tiny(), num_nodes=-1)


def test_format_estimate_table() -> None:
    est = estimate(config("giblet_3p5b.yaml"), num_gpus=8)
    text = format_estimate(est)
    lines = text.splitlines()
    assert lines[0] == "giblet model, default architecture: 3,513,060,994 parameters"
    assert "  encoder.video        1,779,972,096" in lines
    assert "  encoder.temporal            24,576" in lines
    assert "  total                3,513,060,994" in lines
    assert "largest layer: encoder.video.blocks.0.linear, 1,769,472,000 parameters" in lines
    assert "memory on 1 node x 8 GPUs per node = 8 GPUs" in lines
    row = next(line for line in lines if line.startswith("  ZeRO-2 "))
    # 14,930,457,000 bytes = 13.91 GiB; + activations as configured
    assert row.split()[1:3] == ["13.91", "GiB"]
    labels = [line.split("  ")[1].strip() for line in lines if line.startswith("  ZeRO-")]
    assert labels == [
        "ZeRO-2",
        "ZeRO-2, offload optimizer to CPU",
        "ZeRO-3",
        "ZeRO-3, offload optimizer to CPU",
        "ZeRO-3, offload optimizer + params to CPU",
    ]
    seed = format_estimate(dataclasses.replace(est, seed_compat=True, num_gpus=1, num_nodes=2))
    assert seed.splitlines()[0].startswith("giblet model, seed_compat architecture")
    assert "memory on 2 nodes x 1 GPU per node = 2 GPUs" in seed.splitlines()


# ------------------------------------------------------------------------------------ tool


def load_tool() -> Any:
    spec = importlib.util.spec_from_file_location(
        "estimate_memory", ROOT / "tools" / "estimate_memory.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    tool = load_tool()
    sets = [arg for size in TINY_OVERRIDES for arg in ("--set", size)]
    assert tool.main(["--config", str(CONFIGS / "tiny.yaml"), *sets, "--num-gpus", "2"]) == 0
    out = capsys.readouterr().out
    expected = format_estimate(estimate(tiny(), num_gpus=2))
    assert out == "model input sizes: all set in the config\n" + expected + "\n"


def test_tool_exits_2_on_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    tool = load_tool()
    # tiny.yaml names no store (small.yaml names demo_out/store.h5, which may exist)
    assert tool.main(["--config", str(CONFIGS / "tiny.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model input sizes ['frames_per_tr'")
    assert tool.main(["--set", "optim.lr=0"]) == 2
    assert capsys.readouterr().err.endswith("optim.lr must be > 0, got 0.0\n")
    assert tool.main(["--num-gpus", "0"]) == 2
    assert capsys.readouterr().err == "error: num_gpus (per node) must be >= 1, got 0\n"


def test_tool_runs_as_a_script() -> None:
    out = subprocess.run(
        [sys.executable, "tools/estimate_memory.py", "--config", "launch/configs/giblet_3p5b.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    expected = format_estimate(estimate(config("giblet_3p5b.yaml"), num_gpus=8))
    assert out.stdout == "model input sizes: all set in the config\n" + expected + "\n"
