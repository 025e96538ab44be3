"""The giblet model family: exact counts, shapes, architecture rules, init, checkpointing."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from giblet_ds.config import ModelConfig, load_config
from giblet_ds.losses import NormalizedLoss, TargetVariances
from giblet_ds.model import (
    PARAMETER_GROUPS,
    GibletAutoencoder,
    format_counts,
    numel,
    parameter_counts,
)
from giblet_ds.model.blocks import DenseBlock, DenseStack
from giblet_ds.model.encoder import AudioCodebook
from tests.tiny_sizes import TINY_SIZES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "launch" / "configs"

# Deliberately unequal sizes so that a swapped axis changes a count or a shape.


def tiny_config(*overrides: str) -> ModelConfig:
    return load_config(CONFIGS / "tiny.yaml", overrides).model.with_input_sizes(TINY_SIZES)


def meta_model(cfg: ModelConfig) -> GibletAutoencoder:
    with torch.device("meta"):
        return GibletAutoencoder(cfg)


def tiny_batch(cfg: ModelConfig, batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    assert cfg.frames_per_tr and cfg.frame_height and cfg.frame_width and cfg.n_codebooks
    assert cfg.code_frames and cfg.text_slots and cfg.text_dim and cfg.n_voxels
    return {
        "video": torch.rand(
            batch, cfg.frames_per_tr, cfg.frame_height, cfg.frame_width, 3, generator=g
        ),
        "audio_codes": torch.randint(
            0, cfg.codebook_size, (batch, cfg.n_codebooks, cfg.code_frames), generator=g
        ),
        "text": torch.randn(batch, cfg.text_slots, cfg.text_dim, generator=g),
        "fmri": torch.randn(batch, cfg.n_voxels, generator=g),
    }


# ------------------------------------------------------------------------------ hand formula


def hand_counts(cfg: ModelConfig) -> dict[str, int]:
    """Counts from REFERENCE.md's rules, written independently of the model code.

    A hidden layer i -> o is Linear (i*o, plus o bias in seed_compat) and a norm (2*o); a plain
    output Linear has i*o + o. Default audio: a (n_q, codebook, dim) embedding table in the encoder,
    the decoder's audio output is n_q*C*dim wide; seed_compat takes n_q*C raw floats in and out.
    """
    seed = cfg.seed_compat

    def hidden(i: int, widths: list[int]) -> int:
        total = 0
        for o in widths:
            total += i * o + (o if seed else 0) + 2 * o
            i = o
        return total

    def out(i: int, o: int) -> int:
        return i * o + o

    assert cfg.frames_per_tr and cfg.frame_height and cfg.frame_width and cfg.n_codebooks
    assert cfg.code_frames and cfg.text_slots and cfg.text_dim and cfg.n_voxels
    frame = cfg.frame_height * cfg.frame_width * 3
    text = cfg.text_slots * cfg.text_dim
    codes = cfg.n_codebooks * cfg.code_frames
    if seed:
        audio_enc = hidden(codes, cfg.audio_hidden)
        audio_out = codes
    else:
        table = cfg.n_codebooks * cfg.codebook_size * cfg.audio_embed_dim
        audio_enc = table + hidden(cfg.code_frames * cfg.audio_embed_dim, cfg.audio_hidden)
        audio_out = codes * cfg.audio_embed_dim
    fused = cfg.video_hidden[-1] + cfg.audio_hidden[-1] + cfg.text_hidden[-1]
    fmri_in = cfg.fmri_hidden[-1] if cfg.fmri_hidden else cfg.bottleneck
    width = cfg.decoder_hidden[-1]
    counts = {
        "encoder.video": hidden(cfg.frames_per_tr * frame, cfg.video_hidden),
        "encoder.audio": audio_enc,
        "encoder.text": hidden(text, cfg.text_hidden),
        "encoder.trunk": hidden(fused, [*cfg.trunk_hidden, cfg.bottleneck]),
        "encoder.fmri_head": hidden(cfg.bottleneck, cfg.fmri_hidden) + out(fmri_in, cfg.n_voxels),
        "decoder.trunk": hidden(cfg.bottleneck, cfg.decoder_hidden),
        "decoder.video": hidden(width, cfg.video_decoder_hidden)
        + out(cfg.video_decoder_hidden[-1], frame),
        "decoder.audio": hidden(width, cfg.audio_decoder_hidden)
        + out(cfg.audio_decoder_hidden[-1], audio_out),
        "decoder.text": hidden(width, cfg.text_decoder_hidden)
        + out(cfg.text_decoder_hidden[-1], text),
    }
    if cfg.context_trs > 1:  # the temporal mixer: one weight per delay and bottleneck dimension
        counts["encoder.temporal"] = cfg.context_trs * cfg.bottleneck
    if cfg.n_subjects:  # S + 1 slots (the average subject): r x (H + V) weights, V biases
        slots = cfg.n_subjects + 1
        r = cfg.subject_rank
        counts["encoder.subjects"] = slots * (r * (fmri_in + cfg.n_voxels) + cfg.n_voxels)
    counts["encoder"] = sum(v for k, v in counts.items() if k.startswith("encoder."))
    counts["decoder"] = sum(v for k, v in counts.items() if k.startswith("decoder."))
    counts["total"] = counts["encoder"] + counts["decoder"]
    return counts


# ------------------------------------------------------------------------------ exact counts


def test_seed_compat_3p5b_counts_exactly_the_seed() -> None:
    cfg = load_config(CONFIGS / "giblet_3p5b_seed.yaml").model
    counts = parameter_counts(meta_model(cfg))
    assert counts["total"] == 3_500_188_290
    assert counts["encoder"] == 3_235_947_138
    assert counts["decoder"] == 264_241_152
    assert counts == {
        "encoder.video": 1_779_979_264,
        "encoder.audio": 592_128,
        "encoder.text": 1_706_240,
        "encoder.trunk": 57_849_792,
        "encoder.fmri_head": 1_395_819_714,
        "decoder.trunk": 60_733_376,
        "decoder.video": 188_543_168,
        "decoder.audio": 9_188_224,
        "decoder.text": 5_776_384,
        "encoder": 3_235_947_138,
        "decoder": 264_241_152,
        "total": 3_500_188_290,
    }
    assert counts == hand_counts(cfg)


def test_default_3p5b_counts() -> None:
    cfg = load_config(CONFIGS / "giblet_3p5b.yaml").model
    assert cfg.context_trs == 12
    counts = parameter_counts(meta_model(cfg))
    assert counts == {
        "encoder.video": 1_779_972_096,
        "encoder.audio": 656_896,
        "encoder.text": 1_705_472,
        "encoder.trunk": 57_834_112,
        "encoder.temporal": 12 * 2_048,  # 24,576: one weight per delay and bottleneck dimension
        "encoder.fmri_head": 1_395_803_330,
        "decoder.trunk": 60_717_696,
        "decoder.video": 188_537_024,
        "decoder.audio": 22_035_456,
        "decoder.text": 5_774_336,
        "encoder": 3_235_996_482,
        "decoder": 277_064_512,
        "total": 3_513_060_994,
    }
    assert counts == hand_counts(cfg)


def test_one_tr_3p5b_counts_are_the_model_before_context() -> None:
    # k = 1 builds no mixer: the groups and the total of the one-TR model, unchanged.
    cfg = load_config(CONFIGS / "giblet_3p5b.yaml", ["model.context_trs=1"]).model
    counts = parameter_counts(meta_model(cfg))
    assert "encoder.temporal" not in counts
    assert counts["encoder"] == 3_235_971_906
    assert counts["total"] == 3_513_036_418
    assert counts == hand_counts(cfg)


@pytest.mark.parametrize("k", [2, 5, 16])
def test_counts_grow_with_k_only_by_the_mixer(k: int) -> None:
    base = parameter_counts(meta_model(tiny_config()))
    counts = parameter_counts(meta_model(tiny_config(f"model.context_trs={k}")))
    assert counts["encoder.temporal"] == k * 6  # the tiny bottleneck: 6 dimensions per TR
    assert counts["total"] == base["total"] + k * 6
    assert counts == hand_counts(tiny_config(f"model.context_trs={k}"))


def test_tiny_counts_pinned_and_by_hand() -> None:
    cfg = tiny_config()
    counts = parameter_counts(meta_model(cfg))
    # Worked by hand from tiny.yaml and TINY_SIZES (block i->o: i*o + 2o; output: i*o + o).
    assert counts == {
        "encoder.video": 360 * 16 + 32 + 16 * 8 + 16,  # 5,936
        "encoder.audio": 2 * 1024 * 3 + 15 * 8 + 16,  # 6,280
        "encoder.text": 14 * 8 + 16,  # 128
        "encoder.trunk": 24 * 12 + 24 + 12 * 6 + 12,  # 396
        "encoder.fmri_head": 6 * 10 + 20 + 10 * 23 + 23,  # 333
        "decoder.trunk": 6 * 12 + 24,  # 96
        "decoder.video": 12 * 14 + 28 + 14 * 180 + 180,  # 2,896
        "decoder.audio": 12 * 9 + 18 + 9 * 30 + 30,  # 426
        "decoder.text": 12 * 7 + 14 + 7 * 14 + 14,  # 210
        "encoder": 13_073,
        "decoder": 3_628,
        "total": 16_701,
    }
    assert counts == hand_counts(cfg)


def test_tiny_seed_compat_counts() -> None:
    cfg = dataclasses.replace(tiny_config(), seed_compat=True)
    counts = parameter_counts(meta_model(cfg))
    # From the default's 16,701: + 110 block biases (the sum of hidden widths), the code table and
    # the 15-wide audio input (6,280) become a 10-wide raw-code input (96), the audio output
    # 300 -> 100.
    assert counts["total"] == 16_701 + 110 - 6_280 + 96 - 300 + 100 == 10_427
    assert counts == hand_counts(cfg)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.fmri_hidden=[]"],
        ["model.trunk_hidden=[5, 9, 4]", "model.bottleneck=11"],
        ["model.audio_embed_dim=5", "model.codebook_size=16"],
        ["model.decoder_hidden=[3]", "model.video_hidden=[4]"],
    ],
)
def test_counts_follow_every_width(overrides: list[str]) -> None:
    cfg = tiny_config(*overrides)
    counts = parameter_counts(meta_model(cfg))
    assert counts == hand_counts(cfg)


def test_groups_cover_the_model_and_sum_to_the_total() -> None:
    for cfg in (
        tiny_config(),
        dataclasses.replace(tiny_config(), seed_compat=True),
        tiny_config("model.context_trs=4"),
    ):
        model = meta_model(cfg)
        counts = parameter_counts(model)
        # encoder.temporal is reported only when the model has a mixer (k > 1)
        assert ("encoder.temporal" in counts) == (cfg.context_trs > 1)
        assert sum(counts.get(g, 0) for g in PARAMETER_GROUPS) == counts["total"]
        assert counts["encoder"] + counts["decoder"] == counts["total"]
        # The code table is shared by the encoder and the decoder: counted once.
        assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_numel_reads_ds_numel_of_a_partitioned_parameter() -> None:
    param = nn.Parameter(torch.empty(0))
    param.ds_numel = 1_769_472_000  # type: ignore[attr-defined]
    assert numel(param) == 1_769_472_000
    assert numel(nn.Parameter(torch.empty(3, 4))) == 12


def test_format_counts_uses_thousands_separators() -> None:
    counts = parameter_counts(meta_model(load_config(CONFIGS / "giblet_3p5b_seed.yaml").model))
    lines = format_counts(counts).splitlines()
    # no encoder.temporal at k = 1, no encoder.subjects without subject heads
    assert len(lines) == len(PARAMETER_GROUPS) - 2 + 3
    assert lines[0] == "encoder.video        1,779,979,264"
    assert lines[-1] == "total                3,500,188,290"


def test_missing_input_sizes_are_named() -> None:
    cfg = load_config(CONFIGS / "tiny.yaml").model
    with pytest.raises(ValueError, match=r"model input sizes \['frames_per_tr'"):
        meta_model(cfg)


def test_meta_build_allocates_nothing() -> None:
    model = meta_model(load_config(CONFIGS / "giblet_3p5b.yaml").model)
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())


# ------------------------------------------------------------------------------- forward


def _built(cfg: ModelConfig, seed: int = 0) -> GibletAutoencoder:
    torch.manual_seed(seed)
    model = GibletAutoencoder(cfg)
    model.init_weights()
    return model


def test_forward_shapes_default() -> None:
    cfg = tiny_config()
    batch = tiny_batch(cfg)
    out = _built(cfg)(batch["video"], batch["audio_codes"], batch["text"])
    assert out.fmri.shape == (3, 23)
    assert out.video.shape == (3, 6 * 10 * 3)
    assert out.audio.shape == (3, 2, 5, 1024)
    assert out.text.shape == (3, 2 * 7)
    assert out.bottleneck.shape == (3, 6)
    assert all(t.dtype == torch.float32 for t in (out.fmri, out.video, out.audio, out.text))


def test_forward_shapes_seed_compat() -> None:
    cfg = dataclasses.replace(tiny_config(), seed_compat=True)
    batch = tiny_batch(cfg)
    out = _built(cfg)(batch["video"], batch["audio_codes"], batch["text"])
    assert out.fmri.shape == (3, 23)
    assert out.video.shape == (3, 180)
    assert out.audio.shape == (3, 2 * 5)
    assert out.text.shape == (3, 14)
    # The old system's bounded outputs: sigmoid video, sigmoid x 1023 codes.
    assert out.video.min() > 0 and out.video.max() < 1
    assert out.audio.min() > 0 and out.audio.max() < 1023


def test_default_audio_logits_score_the_shared_code_table() -> None:
    model = _built(tiny_config()).eval()
    codebook = model.encoder.audio.codebook
    assert isinstance(codebook, AudioCodebook)
    # Codes are embedded per codebook (offset: codebook 1's code 0 is not codebook 0's code 0).
    codes = torch.tensor([[[0, 1023, 5, 5, 0], [0, 1023, 5, 7, 0]]])
    emb = codebook(codes=codes)
    assert torch.equal(emb[0, 0, 0], codebook.weight[0, 0])
    assert torch.equal(emb[0, 1, 1], codebook.weight[1, 1023])
    queries = torch.randn(1, 2, 5, 3)
    logits = codebook(queries=queries)
    assert logits.shape == (1, 2, 5, 1024)
    expected = codebook.weight[1] @ queries[0, 1, 4]
    assert torch.allclose(logits[0, 1, 4], expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- default architecture


def test_no_linear_feeding_a_layernorm_has_a_bias() -> None:
    model = meta_model(load_config(CONFIGS / "giblet_3p5b.yaml").model)
    blocks = [m for m in model.modules() if isinstance(m, DenseBlock)]
    # video 3, audio 2, text 2, trunk 3 + bottleneck, fMRI 1, decoder trunk 4, heads 2 + 2 + 2
    assert len(blocks) == 22
    for block in blocks:
        assert isinstance(block.norm, nn.LayerNorm)
        assert block.linear.bias is None
    # Every norm of the model sits in a DenseBlock right after its Linear, and none is BatchNorm.
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm | nn.BatchNorm1d)]
    assert len(norms) == len(blocks)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    # Only output layers carry a bias, and no output layer feeds a norm.
    biased = {
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None
    }
    assert biased == {
        "encoder.fmri_head.out",
        "decoder.video.out",
        "decoder.audio.out",
        "decoder.text.out",
    }


def test_seed_compat_repeats_the_old_layers() -> None:
    model = meta_model(load_config(CONFIGS / "giblet_3p5b_seed.yaml").model)
    blocks = [m for m in model.modules() if isinstance(m, DenseBlock)]
    assert all(isinstance(b.norm, nn.BatchNorm1d) and b.linear.bias is not None for b in blocks)
    assert model.encoder.audio.codebook is None
    assert model.encoder.audio.mlp.blocks[0].linear.in_features == 8 * 112


def test_bottleneck_is_normalized_but_not_activated() -> None:
    model = meta_model(tiny_config())
    last = model.encoder.trunk.blocks[-1]
    assert last.linear.out_features == 6
    assert isinstance(last.norm, nn.LayerNorm)
    assert isinstance(last.activation, nn.Identity)
    assert all(isinstance(b.activation, nn.ReLU) for b in model.encoder.trunk.blocks[:-1])


# ----------------------------------------------------------------------------- init_weights


def test_init_weights_follows_its_docstring() -> None:
    cfg = tiny_config("model.video_hidden=[64, 8]")
    model = _built(cfg, seed=3)
    big = model.encoder.video.blocks[0].linear  # 360 -> 64, followed by ReLU: He init
    assert big.weight.numel() == 23_040
    assert big.weight.mean().abs() < 0.05 * math.sqrt(2 / 360)  # 7 standard errors
    assert big.weight.std().item() == pytest.approx(math.sqrt(2 / 360), rel=0.03)
    # Output layers start at zero (weights and bias): predictions start at the bias.
    for stack in (
        model.encoder.fmri_head,
        model.decoder.video,
        model.decoder.audio,
        model.decoder.text,
    ):
        assert stack.out is not None
        assert torch.count_nonzero(stack.out.weight) == 0
        assert torch.equal(stack.out.bias, torch.zeros_like(stack.out.bias))
    video_out = model.decoder.video.out
    assert video_out is not None and video_out.weight.numel() == 2_520
    # Norms: scale 1, shift 0.
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    # Code embeddings: std 1.
    codebook = model.encoder.audio.codebook
    assert codebook is not None
    assert codebook.weight.std().item() == pytest.approx(1.0, rel=0.03)


def test_init_weights_bottleneck_and_seed_compat_biases() -> None:
    cfg = tiny_config("model.trunk_hidden=[300]", "model.bottleneck=200")
    model = _built(cfg, seed=4)
    bottleneck = model.encoder.trunk.blocks[-1].linear  # 300 -> 200, no activation
    assert bottleneck.weight.std().item() == pytest.approx(math.sqrt(1 / 300), rel=0.03)
    seed = _built(dataclasses.replace(tiny_config(), seed_compat=True))
    for module in seed.modules():
        if isinstance(module, nn.Linear):
            assert module.bias is not None and not module.bias.any()
        if isinstance(module, nn.BatchNorm1d):
            assert not module.running_mean.any() and torch.equal(
                module.running_var, torch.ones_like(module.running_var)
            )
            assert int(module.num_batches_tracked) == 0


def test_init_weights_gathers_one_module_at_a_time() -> None:
    model = _built(tiny_config())
    seen: list[list[nn.Parameter]] = []

    def gather(params: list[nn.Parameter]) -> contextlib.nullcontext[None]:
        seen.append(params)
        return contextlib.nullcontext()

    model.init_weights(gather=gather)
    gathered = [p for params in seen for p in params]
    assert len(gathered) == len(list(model.parameters()))
    assert {id(p) for p in gathered} == {id(p) for p in model.parameters()}
    assert max(len(params) for params in seen) == 2  # a Linear or a norm: weight (+ bias)


def test_init_weights_is_seeded() -> None:
    a, b = _built(tiny_config(), seed=7), _built(tiny_config(), seed=7)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


# ------------------------------------------------------------------ activation checkpointing


def _loss_and_grads(model: GibletAutoencoder, batch: dict[str, torch.Tensor]):  # noqa: ANN202
    loss_fn = NormalizedLoss(
        TargetVariances(fmri=1.0, video=0.1, text=1.0, audio=1.0),
        {"fmri": 1.0, "video": 1.0, "audio": 1.0, "text": 1.0},
    )
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)  # the dropout masks
    out = model(batch["video"], batch["audio_codes"], batch["text"])
    loss = loss_fn(out, batch).total
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_is_bit_identical_with_dropout() -> None:
    cfg = tiny_config("model.dropout=0.3")
    model = _built(cfg, seed=11).train()
    # Output layers start at zero; give them values so every hidden layer gets a gradient.
    with torch.no_grad():
        for stack in model.stacks():
            if stack.out is not None:
                stack.out.weight.normal_(std=0.1)
    batch = tiny_batch(cfg, batch=4, seed=5)
    loss_plain, grads_plain = _loss_and_grads(model, batch)
    assert all(torch.count_nonzero(g) > 0 for g in grads_plain.values())

    calls = []

    def counting_checkpoint(fn, *args):  # noqa: ANN001, ANN202
        calls.append(fn)
        return checkpoint(fn, *args, use_reentrant=False)

    model.set_activation_checkpointing(counting_checkpoint)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, batch)
    blocks = [m for m in model.modules() if isinstance(m, DenseBlock)]
    assert len(calls) == len(blocks) == 11  # every block went through the checkpoint
    assert torch.equal(loss_plain, loss_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name in grads_plain:
        assert torch.equal(grads_plain[name], grads_ckpt[name]), name
    # Dropout was live: a different seed gives a different loss.
    torch.manual_seed(99)
    other = model(batch["video"], batch["audio_codes"], batch["text"]).fmri
    torch.manual_seed(1234)
    same = model(batch["video"], batch["audio_codes"], batch["text"]).fmri
    assert not torch.equal(other, same)


def test_checkpointing_with_functools_partial_and_off_in_eval() -> None:
    cfg = tiny_config("model.dropout=0.3")
    model = _built(cfg, seed=2)
    batch = tiny_batch(cfg, seed=1)
    model.set_activation_checkpointing(functools.partial(checkpoint, use_reentrant=False))
    assert all(s.checkpoint_fn is not None for s in model.stacks())
    loss, grads = _loss_and_grads(model.train(), batch)
    model.set_activation_checkpointing(None)
    assert all(s.checkpoint_fn is None for s in model.stacks())
    loss_plain, grads_plain = _loss_and_grads(model, batch)
    assert torch.equal(loss, loss_plain)
    assert all(torch.equal(grads[n], grads_plain[n]) for n in grads)

    # Eval / no_grad never calls the checkpoint function.
    def boom(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("checkpoint called outside training")

    model.set_activation_checkpointing(boom)
    model.eval()
    model(batch["video"], batch["audio_codes"], batch["text"])
    model.train()
    with torch.no_grad():
        model(batch["video"], batch["audio_codes"], batch["text"])
    assert sum(isinstance(m, DenseStack) for m in model.modules()) == len(list(model.stacks()))


# ----------------------------------------------------------------------------- import layers

LAYER_FILES = (
    sorted((ROOT / "giblet_ds" / "model").glob("*.py"))
    + sorted((ROOT / "giblet_ds" / "config").glob("*.py"))
    + [ROOT / "giblet_ds" / name for name in ("losses.py", "metrics.py", "errors.py")]
)


@pytest.mark.parametrize("path", LAYER_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_model_layer_never_imports_deepspeed_or_distributed(path: Path) -> None:
    assert banned_uses(path.read_text()) == []


def banned_uses(source: str) -> list[str]:
    """Imports or uses of deepspeed / torch.distributed in code (parsed: docstrings may name them
    to say they are not used)."""
    banned = ("deepspeed", "torch.distributed")
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names = [f"{node.value.id}.{node.attr}"]
        else:
            continue
        found += [
            f"{node.lineno}: {n}"
            for n in names
            if any(n == b or n.startswith(b + ".") for b in banned)
        ]
    return found


def test_the_import_check_catches_each_form() -> None:
    source = (
        '"""No deepspeed or torch.distributed here."""\n'
        "import torch\n"
        "import deepspeed\n"
        "from deepspeed.zero import Init\n"
        "from torch import distributed\n"
        "import torch.distributed as dist\n"
        "torch.distributed.barrier()\n"
    )
    assert banned_uses(source) == [
        "3: deepspeed",
        "4: deepspeed.zero.Init",
        "5: torch.distributed",
        "6: torch.distributed",
        "7: torch.distributed",
    ]


def test_importing_the_model_layer_loads_no_deepspeed() -> None:
    code = (
        "import sys, giblet_ds.config, giblet_ds.model, giblet_ds.losses, giblet_ds.metrics; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"
