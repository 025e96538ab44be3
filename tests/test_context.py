"""Temporal context (model.context_trs = k): windows from the store, the mixer, k = 1 unchanged,
counts and FLOPs, losses on TR t, and a bit-identical resume of a k > 1 run."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from giblet_ds.config import ModelConfig, load_config
from giblet_ds.errors import ConfigError
from giblet_ds.losses import reconstruction_targets
from giblet_ds.model import GibletAutoencoder, parameter_counts, train_flops_per_sample
from giblet_ds.model.context import CONTEXT_MASK, WINDOW_KEYS, current_tr
from giblet_ds.store import StoreDataset, open_store, write_synthetic_store
from giblet_ds.store import dataset as store_dataset
from giblet_ds.store.dataset import window_delays
from giblet_ds.train.hrf_start import mixer_start
from tests.tiny_sizes import TINY_SIZES
from tests.train_harness import losses_by_step, records, run_training

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "launch" / "configs" / "tiny.yaml"


def tiny_model_config(*overrides: str) -> ModelConfig:
    return load_config(TINY, overrides).model.with_input_sizes(TINY_SIZES)


def built(cfg: ModelConfig, seed: int = 0) -> GibletAutoencoder:
    torch.manual_seed(seed)
    model = GibletAutoencoder(cfg)
    model.init_weights()
    return model.eval()


def window_batch(cfg: ModelConfig, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs with a window axis of cfg.context_trs TRs (all real)."""
    g = torch.Generator().manual_seed(seed)
    assert cfg.frames_per_tr and cfg.frame_height and cfg.frame_width and cfg.n_codebooks
    assert cfg.code_frames and cfg.text_slots and cfg.text_dim
    k = cfg.context_trs
    return {
        "video": torch.rand(
            batch, k, cfg.frames_per_tr, cfg.frame_height, cfg.frame_width, 3, generator=g
        ),
        "audio_codes": torch.randint(
            0, cfg.codebook_size, (batch, k, cfg.n_codebooks, cfg.code_frames), generator=g
        ),
        "text": torch.randn(batch, k, cfg.text_slots, cfg.text_dim, generator=g),
        CONTEXT_MASK: torch.ones(batch, k, dtype=torch.bool),
    }


# --------------------------------------------------------------------------------- config


def test_context_trs_must_be_a_positive_integer() -> None:
    with pytest.raises(ConfigError, match=r"^model.context_trs must be an integer >= 1, got 0$"):
        ModelConfig(context_trs=0)
    with pytest.raises(ConfigError, match=r"tiny.yaml: model.context_trs must be an integer"):
        load_config(TINY, ["model.context_trs=2.5"])


def test_seed_compat_refuses_a_window_naming_the_fix() -> None:
    with pytest.raises(ConfigError) as err:
        ModelConfig(seed_compat=True, context_trs=4)
    assert str(err.value) == (
        "model.context_trs must be 1 with model.seed_compat (the old system saw one TR per "
        "sample), got 4; set model.context_trs=1 or model.seed_compat=false"
    )
    seed = load_config(ROOT / "launch" / "configs" / "giblet_3p5b_seed.yaml").model
    assert seed.seed_compat and seed.context_trs == 1


def test_context_end_is_stimulus_or_volume() -> None:
    with pytest.raises(
        ConfigError, match=r'^model.context_end must be "stimulus" or "volume", got \'fmri\'$'
    ):
        ModelConfig(context_end="fmri")
    assert load_config(TINY, ["model.context_end=volume"]).model.context_end == "volume"


def test_shipped_defaults() -> None:
    assert ModelConfig().context_trs == 12  # measured better than 8 (BENCHMARKS.md)
    assert ModelConfig().context_end == "volume"  # measured better (BENCHMARKS.md)
    assert load_config(ROOT / "launch" / "configs" / "small.yaml").model.context_end == "volume"
    assert load_config(ROOT / "launch" / "configs" / "small.yaml").model.context_trs == 12
    assert load_config(TINY).model.context_trs == 1


# --------------------------------------------------------------------------------- dataset


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 43 TRs, gap 3: train 0..21 (22), val 25..33 (9), test 37..42 (6) -- unequal on purpose.
    return write_synthetic_store(
        tmp_path_factory.mktemp("ctx") / "store.h5",
        n_trs=43,
        split_gap=3,
        n_subjects=3,
        split_fractions=(0.6, 0.25, 0.15),
    )


def test_split_layout_of_the_fixture(store: Path) -> None:
    ds = {s: StoreDataset(store, s) for s in ("train", "val", "test")}
    assert [int(ds[s].indices[0]) for s in ds] == [0, 25, 37]
    assert [len(ds[s]) for s in ds] == [22, 9, 6]


def _rows(store: Path, key: str, rows: list[int]) -> np.ndarray:
    with h5py.File(store, "r") as handle:
        return np.stack([handle[key][r] for r in rows])


@pytest.mark.parametrize(
    ("split", "item", "real_rows"),
    [
        ("train", 0, [0]),  # the first TR of the movie: 3 padded rows
        ("train", 2, [0, 1, 2]),
        ("train", 3, [0, 1, 2, 3]),  # the first full window
        ("train", 21, [18, 19, 20, 21]),
        ("val", 0, [25]),  # never reaches back over the gap (22..24) into train rows
        ("val", 1, [25, 26]),
        ("val", 8, [30, 31, 32, 33]),
        ("test", 5, [39, 40, 41, 42]),
        ("test", 2, [37, 38, 39]),
    ],
)
def test_window_rows_and_padding(store: Path, split: str, item: int, real_rows: list[int]) -> None:
    k = 4
    sample = StoreDataset(store, split, context_trs=k)[item]
    n_pad = k - len(real_rows)
    assert sample[CONTEXT_MASK].tolist() == [False] * n_pad + [True] * len(real_rows)
    assert sample["video"].shape == (k, 2, 6, 10, 3)
    assert sample["audio_codes"].shape == (k, 2, 5) and sample["audio_codes"].dtype == torch.int64
    assert sample["text"].shape == (k, 2, 7) and sample["text_mask"].shape == (k, 2)
    assert sample["fmri"].shape == (23,)
    t = real_rows[-1]
    assert int(sample["index"]) == t
    expected = {
        "video": _rows(store, "video", real_rows).astype(np.float32) / np.float32(255.0),
        "audio_codes": _rows(store, "audio_codes", real_rows).astype(np.int64),
        "text": _rows(store, "text", real_rows),
        "text_mask": _rows(store, "text_mask", real_rows),
    }
    for key, value in expected.items():
        np.testing.assert_array_equal(sample[key][n_pad:].numpy(), value)
        assert not sample[key][:n_pad].any(), f"padding of {key} is not zero"
    # fMRI stays the volume paired with TR t (not the window)
    np.testing.assert_array_equal(
        sample["fmri"].numpy(), _rows(store, "fmri/mean", [t])[0].astype(np.float32)
    )


def test_a_window_longer_than_the_split_is_padded_every_time(store: Path) -> None:
    ds = StoreDataset(store, "test", context_trs=7)  # 6 test TRs
    masks = [ds[i][CONTEXT_MASK].tolist() for i in range(len(ds))]
    assert [sum(m) for m in masks] == [1, 2, 3, 4, 5, 6]
    assert all(m[: 7 - sum(m)] == [False] * (7 - sum(m)) for m in masks)


def test_one_tr_samples_are_unchanged(store: Path) -> None:
    ds = StoreDataset(store, "val")
    sample = ds[2]
    assert CONTEXT_MASK not in sample
    assert sample["video"].shape == (2, 6, 10, 3)
    np.testing.assert_array_equal(
        sample["video"].numpy(), _rows(store, "video", [27])[0].astype(np.float32) / 255.0
    )
    # the window's last TR is the one-TR sample, key by key, bit for bit
    last = current_tr(StoreDataset(store, "val", context_trs=3)[2], batched=False)
    assert set(last) == set(sample)
    for key in sample:
        assert torch.equal(last[key], sample[key]), key


def test_a_hole_in_a_split_starts_a_new_run() -> None:
    indices = np.array([3, 4, 5, 9, 10, 12], dtype=np.int64)
    assert store_dataset._run_starts(indices).tolist() == [3, 3, 3, 9, 9, 12]
    assert store_dataset._run_ends(indices).tolist() == [5, 5, 5, 10, 10, 12]


# A window ending at the volume: the fixture's lag is 3, so k = 5 holds rows t-1..t+3, laid out
# [t-1, t+1, t+2, t+3, t] (TR t always last). None: a padded slot.
@pytest.mark.parametrize(
    ("split", "item", "slots"),
    [
        ("train", 0, [None, 1, 2, 3, 0]),  # the movie's first TR: nothing before it
        ("train", 1, [0, 2, 3, 4, 1]),  # a full window
        ("train", 20, [19, 21, None, None, 20]),  # the split's end: 22..23 are the gap
        ("train", 21, [20, None, None, None, 21]),
        ("val", 0, [None, 26, 27, 28, 25]),  # not back over the gap into train
        ("val", 6, [30, 32, 33, None, 31]),  # not forward into the gap (34..36)
        ("val", 8, [32, None, None, None, 33]),
        ("test", 0, [None, 38, 39, 40, 37]),
        ("test", 5, [41, None, None, None, 42]),  # the movie's last TR
    ],
)
def test_volume_end_windows_and_padding_at_both_split_edges(
    store: Path, split: str, item: int, slots: list[int | None]
) -> None:
    k = 5
    ds = StoreDataset(store, split, context_trs=k, context_end="volume")
    assert ds.info.lag == 3 and ds.lead == 3
    sample = ds[item]
    real = [i for i, row in enumerate(slots) if row is not None]
    rows = [row for row in slots if row is not None]
    assert sample[CONTEXT_MASK].tolist() == [row is not None for row in slots]
    assert int(sample["index"]) == slots[-1]
    expected = {
        "video": _rows(store, "video", rows).astype(np.float32) / np.float32(255.0),
        "audio_codes": _rows(store, "audio_codes", rows).astype(np.int64),
        "text": _rows(store, "text", rows),
        "text_mask": _rows(store, "text_mask", rows),
    }
    padded = [i for i in range(k) if i not in real]
    for key, value in expected.items():
        assert sample[key].shape[0] == k
        np.testing.assert_array_equal(sample[key][real].numpy(), value)
        assert not sample[key][padded].any(), f"padding of {key} is not zero"
    np.testing.assert_array_equal(
        sample["fmri"].numpy(), _rows(store, "fmri/mean", [slots[-1]])[0].astype(np.float32)
    )


def test_window_lead_reaches_the_volume_but_keeps_tr_t() -> None:
    lead = store_dataset.window_lead
    assert [lead(k, "volume", 3) for k in (1, 2, 3, 4, 8, 12)] == [0, 1, 2, 3, 3, 3]
    assert [lead(k, "stimulus", 3) for k in (1, 8)] == [0, 0]
    assert lead(8, "volume", 0) == 0  # a store without lag: the two ends agree
    with pytest.raises(
        ValueError, match=r"^context_end must be one of \('stimulus', 'volume'\), got 'fmri'$"
    ):
        lead(8, "fmri", 3)
    slots = store_dataset.window_slots(np.arange(-4, 4), 8, 3)
    assert slots.tolist() == [0, 1, 2, 3, 7, 4, 5, 6]  # k = 8, lead 3: t-4..t-1, t+1..t+3, t
    with pytest.raises(ValueError, match=r"outside a window of 8 with lead 3"):
        store_dataset.window_slots(np.array([4]), 8, 3)


def test_volume_end_keeps_tr_t_and_a_short_window_never_drops_it(store: Path) -> None:
    one = StoreDataset(store, "val")[4]
    for k in (1, 2, 3, 7):
        sample = StoreDataset(store, "val", context_trs=k, context_end="volume")[4]
        last = current_tr(sample, batched=False)
        assert set(last) == set(one)
        for key in one:
            assert torch.equal(last[key], one[key]), (k, key)
    # k = 2 at the volume end: TR t and the next row (t + 1), TR t last
    two = StoreDataset(store, "val", context_trs=2, context_end="volume")[4]
    np.testing.assert_array_equal(two["text"].numpy(), _rows(store, "text", [30, 29]))


def test_a_volume_window_longer_than_the_split(store: Path) -> None:
    ds = StoreDataset(store, "test", context_trs=7, context_end="volume")  # 6 test TRs, lead 3
    masks = [[int(m) for m in ds[i][CONTEXT_MASK].tolist()] for i in range(len(ds))]
    # slots: t-3, t-2, t-1, t+1, t+2, t+3, t
    assert masks == [
        [0, 0, 0, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 0, 1],
        [1, 1, 1, 1, 0, 0, 1],
        [1, 1, 1, 0, 0, 0, 1],
    ]


def test_stimulus_end_is_the_default_of_the_dataset(store: Path) -> None:
    a = StoreDataset(store, "train", context_trs=4)[5]
    b = StoreDataset(store, "train", context_trs=4, context_end="stimulus")[5]
    assert all(torch.equal(a[key], b[key]) for key in a)
    with pytest.raises(ValueError, match=r"^context_end must be one of"):
        StoreDataset(store, "train", context_trs=4, context_end="fmri")


def test_runs_read_their_configs_window_and_subject(store: Path) -> None:
    info = open_store(store)
    cfg = load_config(TINY, ["model.context_trs=3", "model.context_end=volume"])
    ds = StoreDataset.for_run(info, "val", cfg)
    assert (ds.context_trs, ds.context_end, ds.lead, ds.subject) == (3, "volume", 2, None)
    direct = StoreDataset(store, "val", context_trs=3, context_end="volume")[4]
    assert all(torch.equal(ds[4][key], direct[key]) for key in direct)
    np.testing.assert_array_equal(ds[4]["text"].numpy(), _rows(store, "text", [30, 31, 29]))
    one = StoreDataset.for_run(info, "train", load_config(TINY, ["data.subject=1"]))
    assert CONTEXT_MASK not in one[0] and one.subject == 1
    # the trainer, the evaluation and the figures build their data there and nowhere else
    for module in ("train/trainer.py", "evaluation/subjects.py", "report/reconstructions.py"):
        source = (ROOT / "giblet_ds" / module).read_text()
        assert "StoreDataset.for_run(" in source and "StoreDataset(" not in source, module


def test_windows_batch_with_the_default_collate(store: Path) -> None:
    loader = DataLoader(StoreDataset(store, "train", context_trs=3), batch_size=4)
    batch = next(iter(loader))
    assert batch["video"].shape == (4, 3, 2, 6, 10, 3)
    assert batch[CONTEXT_MASK].tolist() == [
        [False, False, True],
        [False, True, True],
        [True, True, True],
        [True, True, True],
    ]


def test_dataset_rejects_a_bad_context(store: Path) -> None:
    with pytest.raises(ValueError, match=r"^context_trs must be an integer >= 1, got 0$"):
        StoreDataset(store, "train", context_trs=0)


def test_the_mask_key_is_one_name_in_both_layers() -> None:
    assert store_dataset.CONTEXT_MASK == CONTEXT_MASK == "context_mask"
    assert WINDOW_KEYS == ("video", "audio_codes", "text", "text_mask")


# ----------------------------------------------------------------------------------- model


def test_one_tr_model_is_the_composition_it_always_was() -> None:
    # k = 1 builds no mixer and computes cat(video, audio, text) -> trunk -> heads, bit for bit.
    cfg = tiny_model_config("model.dropout=0.0")
    model = built(cfg)
    assert model.encoder.temporal is None
    assert not any("temporal" in name for name in model.state_dict())
    batch = {
        k: v[:, -1] for k, v in window_batch(tiny_model_config("model.context_trs=2"), 3).items()
    }
    out = model(batch["video"], batch["audio_codes"], batch["text"])
    enc = model.encoder
    features = torch.cat(
        [
            enc.video(batch["video"].flatten(1)),
            enc.audio(batch["audio_codes"]),
            enc.text(batch["text"].flatten(1)),
        ],
        dim=1,
    )
    bottleneck = enc.trunk(features)
    assert torch.equal(out.bottleneck, bottleneck)
    assert torch.equal(out.fmri, enc.fmri_head(bottleneck))
    assert torch.equal(out.video, model.decoder.video(model.decoder.trunk(bottleneck)))


def test_a_window_model_that_reads_only_tr_t_is_the_one_tr_model() -> None:
    # Equal up to float rounding, not bit for bit: the window model's encoders multiply B*k rows
    # at once and BLAS blocks a 12-row product differently from a 3-row one (~1e-7 apart).
    one = built(tiny_model_config())
    cfg = tiny_model_config("model.context_trs=4")
    window = GibletAutoencoder(cfg).eval()
    missing, unexpected = window.load_state_dict(one.state_dict(), strict=False)
    assert missing == ["encoder.temporal.weight"] and unexpected == []
    assert window.encoder.temporal is not None
    window.encoder.temporal.reset_parameters()  # the initial mixer: TR t alone
    batch = window_batch(cfg, 3)
    got = window(batch["video"], batch["audio_codes"], batch["text"], batch[CONTEXT_MASK])
    last = current_tr(batch)
    want = one(last["video"], last["audio_codes"], last["text"])
    for name, a, b in zip(want._fields, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    # and the mixer itself passes TR t's code through exactly
    assert window.encoder.temporal is not None
    codes = torch.randn(3, 4, 6)  # (B, k, bottleneck)
    assert torch.equal(window.encoder.temporal(codes), codes[:, -1])


def with_fmri_readout(model: GibletAutoencoder) -> GibletAutoencoder:
    """The model with random fMRI output weights (they start at zero, so every fMRI prediction
    starts equal and no gradient reaches the mixer before the first step)."""
    out = model.encoder.fmri_head.out
    assert out is not None
    with torch.no_grad():
        out.weight.copy_(torch.randn(out.weight.shape, generator=torch.Generator().manual_seed(3)))
    return model


def test_padded_rows_never_reach_the_output() -> None:
    cfg = tiny_model_config("model.context_trs=3")
    model = with_fmri_readout(built(cfg))
    assert model.encoder.temporal is not None
    with torch.no_grad():  # a mixer that reads every delay (the initial one reads TR t alone)
        model.encoder.temporal.weight.copy_(torch.linspace(0.1, 0.5, 3).unsqueeze(1))
    batch = window_batch(cfg, 2)
    batch[CONTEXT_MASK][0, :2] = False
    other = {k: v.clone() for k, v in batch.items()}
    other["video"][0, :2] = torch.rand_like(other["video"][0, :2])
    other["text"][0, :2] = 5.0
    other["audio_codes"][0, :2] = 7
    a = model(batch["video"], batch["audio_codes"], batch["text"], batch[CONTEXT_MASK])
    b = model(other["video"], other["audio_codes"], other["text"], other[CONTEXT_MASK])
    assert torch.equal(a.fmri, b.fmri)
    # ... while an unmasked change does reach the fMRI prediction (the mix of the k codes) ...
    c = model(other["video"], other["audio_codes"], other["text"], None)
    assert not torch.equal(a.fmri[0], c.fmri[0])
    assert torch.equal(a.fmri[1], c.fmri[1])  # all real: None means all real
    # ... but never TR t's own code, which the decoder reconstructs from
    assert torch.equal(a.bottleneck, c.bottleneck) and torch.equal(a.video, c.video)


def test_mixer_starts_as_tr_t_alone_and_every_delay_learns() -> None:
    cfg = tiny_model_config("model.context_trs=5")
    model = with_fmri_readout(built(cfg).train())
    assert model.encoder.temporal is not None
    start = torch.zeros(5, 6)  # (k, bottleneck)
    start[-1] = 0.2  # stored divided by k = 5: an effective weight of 1 on TR t
    assert torch.equal(model.encoder.temporal.weight, start)
    codes = torch.randn(2, 5, 6)
    assert torch.equal(model.encoder.temporal(codes), codes[:, -1])
    batch = window_batch(cfg, 3)
    out = model(batch["video"], batch["audio_codes"], batch["text"], batch[CONTEXT_MASK])
    out.fmri.square().sum().backward()
    grad = model.encoder.temporal.weight.grad
    assert grad is not None and bool((grad.abs().sum(dim=1) > 0).all())  # every delay learns


def test_mixer_start_sets_every_code_dimension_to_the_kernel() -> None:
    cfg = tiny_model_config("model.context_trs=3")
    torch.manual_seed(0)
    model = GibletAutoencoder(cfg)
    kernel = torch.tensor([0.25, 0.5, 0.25])
    model.init_weights(mixer_start=kernel)
    mixer = model.encoder.temporal
    assert mixer is not None
    assert torch.equal(mixer.weight * 3, kernel.unsqueeze(1).expand(3, 6))  # stored / k
    codes = torch.randn(2, 3, 6)
    torch.testing.assert_close(
        mixer(codes), 0.25 * codes[:, 0] + 0.5 * codes[:, 1] + 0.25 * codes[:, 2]
    )
    with pytest.raises(ValueError, match=r"start kernel for 3 window slots must have shape \(3,\)"):
        mixer.set_kernel(torch.ones(4))


def test_window_delays_place_each_row_behind_its_volume() -> None:
    # lag 3, k = 8 ending at the volume: rows t-4..t+3 in slots (t-4..t-1, t+1..t+3, t)
    assert window_delays(8, "volume", 3).tolist() == [7, 6, 5, 4, 2, 1, 0, 3]
    assert window_delays(8, "stimulus", 3).tolist() == [10, 9, 8, 7, 6, 5, 4, 3]
    assert window_delays(3, "volume", 3).tolist() == [2, 1, 3]  # the lead stops at k - 1
    assert window_delays(1, "volume", 3).tolist() == [3]


def test_mixer_start_is_nilearns_glover_hrf_at_the_window_delays() -> None:
    from nilearn.glm.first_level import glover_hrf

    tr = 1.5
    curve = glover_hrf(tr, oversampling=50, time_length=32.0)
    times = np.linspace(0.0, 32.0, len(curve))
    by_hand = np.interp(np.array([7, 6, 5, 4, 2, 1, 0, 3]) * tr, times, curve)
    start = mixer_start(tiny_model_config("model.context_trs=8"), lag=3, tr=tr)
    assert start is not None and start.dtype == torch.float32
    np.testing.assert_allclose(start.numpy(), by_hand / by_hand.sum(), rtol=1e-6)
    assert float(start.sum()) == pytest.approx(1.0, abs=1e-6)
    # the peak (~5 s after the stimulus) falls on TR t, 3 TRs = 4.5 s behind the volume
    assert int(start.argmax()) == 7 and float(start[6]) == 0.0  # the volume's own row: no response
    assert mixer_start(tiny_model_config("model.context_trs=1"), lag=3, tr=tr) is None
    current = tiny_model_config("model.context_trs=8", "model.context_init=current_tr")
    assert mixer_start(current, lag=3, tr=tr) is None


def test_the_default_window_start_is_pinned() -> None:
    # k = 12 ending at the volume, lag 3, TR 1.5 s: delays 11..4, 2, 1, 0, 3 TRs. Pinned values,
    # so a nilearn with another Glover (before 0.11: undershoot ratio 0.35) fails here.
    start = mixer_start(tiny_model_config("model.context_trs=12"), lag=3, tr=1.5)
    assert start is not None
    want = [-0.0532, -0.0850, -0.1167, -0.1275, -0.0850, 0.0400, 0.2419, 0.4401, 0.2484, 0.0245,
            0.0, 0.4726]  # fmt: skip
    np.testing.assert_allclose(start.numpy(), want, atol=6e-5)


@pytest.mark.parametrize(
    ("k", "end", "lag", "tr", "held"),
    [
        (2, "stimulus", 40, 1.5, "hold 0% of the HRF's positive lobe and 0% of its sum"),
        (8, "stimulus", 7, 1.0, "hold 24% of the HRF's positive lobe and 0% of its sum"),
        (5, "stimulus", 10, 0.8, "hold 8% of the HRF's positive lobe and 1% of its sum"),
    ],
)
def test_a_window_that_misses_the_response_starts_at_tr_t(
    caplog: pytest.LogCaptureFixture, k: int, end: str, lag: int, tr: float, held: str
) -> None:
    # Scaling a sliver of the response to sum 1 would start the mixer at weights in the thousands
    # (k 8, lag 7, TR 1 s: 2,346 before this check).
    cfg = tiny_model_config(f"model.context_trs={k}", f"model.context_end={end}")
    assert mixer_start(cfg, lag=lag, tr=tr) is None
    assert held in caplog.text and "the temporal mixer starts at TR t alone" in caplog.text


def test_init_weights_gathers_the_mixer_for_its_start() -> None:
    # ZeRO-3: the start is written inside the gather of the mixer's own weight (modifier rank 0).
    cfg = tiny_model_config("model.context_trs=3")
    torch.manual_seed(0)
    model = GibletAutoencoder(cfg)
    mixer = model.encoder.temporal
    assert mixer is not None
    seen: list[list[torch.nn.Parameter]] = []
    inside: list[torch.Tensor] = []

    class Gather:
        def __init__(self, params: list[torch.nn.Parameter]) -> None:
            seen.append(params)
            self.params = params

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: object) -> None:
            if len(self.params) == 1 and self.params[0] is mixer.weight:
                inside.append(mixer.weight.detach().clone())

    kernel = torch.tensor([0.3, 0.1, 0.6])
    model.init_weights(gather=Gather, mixer_start=kernel)
    assert any(len(params) == 1 and params[0] is mixer.weight for params in seen)
    torch.testing.assert_close(inside[-1] * 3, kernel.unsqueeze(1).expand(3, 6))  # while gathered


def test_a_window_of_the_wrong_length_is_named() -> None:
    cfg = tiny_model_config("model.context_trs=3")
    model = built(cfg)
    batch = window_batch(tiny_model_config("model.context_trs=2"), 2)
    with pytest.raises(ValueError, match=r"video must be \(B, 3, \.\.\.\) for model.context_trs=3"):
        model(batch["video"], batch["audio_codes"], batch["text"], batch[CONTEXT_MASK])


def test_flops_count_the_per_tr_encoders_and_trunk_k_times() -> None:
    cfg = tiny_model_config("model.context_trs=3")
    with torch.device("meta"):
        counts = parameter_counts(GibletAutoencoder(cfg))
    per_tr = 5_936 + 6_280 + 128 + 396  # encoder video, audio, text, trunk (tiny: test_model)
    assert counts["encoder.temporal"] == 3 * 6  # k x bottleneck
    assert counts["total"] == 16_701 + 18
    assert train_flops_per_sample(counts, 3) == 6 * (16_701 + 18 + 2 * per_tr) == 253_194
    assert train_flops_per_sample(counts) == 6 * counts["total"]


def test_losses_reconstruct_tr_t() -> None:
    cfg = tiny_model_config("model.context_trs=3")
    batch = window_batch(cfg, 2)
    batch["fmri"] = torch.randn(2, 23)
    targets = reconstruction_targets(batch)
    assert torch.equal(targets["video"], batch["video"][:, -1, -1].flatten(1))
    assert torch.equal(targets["audio"], batch["audio_codes"][:, -1])
    assert torch.equal(targets["text"], batch["text"][:, -1].flatten(1))
    assert torch.equal(targets["fmri"], batch["fmri"])


# ---------------------------------------------------------------------------------- resume


@pytest.mark.distributed
def test_window_run_resumes_bit_for_bit_and_loads_for_evaluation(
    store: Path, tmp_path: Path
) -> None:
    from giblet_ds.checkpoint.loading import load_model

    sets = (  # a window ending at the volume (rows t..t+2, TR t last): the trainer passes the end
        "model.context_trs=3",
        "model.context_end=volume",
        "train.max_steps=6",
        "checkpoint.save_every_steps=2",
        "checkpoint.keep_last=5",
        "train.val_every_steps=3",
    )
    reference = tmp_path / "reference"
    result = run_training(reference, store, world=1, sets=sets)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    killed = run_training(
        run_dir, store, world=1, sets=sets, env={"GIBLET_FAULT_KILL_AT_STEP": "3"}
    )
    assert killed.returncode != 0
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-00000002"
    resumed = run_training(run_dir, store, world=1, sets=sets)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert records(run_dir, "start")[-1]["start_step"] == 2
    assert records(run_dir, "start")[-1]["param_counts"]["encoder.temporal"] == 18
    assert losses_by_step(run_dir) == losses_by_step(reference)
    assert losses_by_step(run_dir, "val") == losses_by_step(reference, "val")
    model, cfg, _ = load_model(run_dir / "checkpoints" / "step-00000006", verify=False)
    assert cfg.model.context_trs == 3 and cfg.model.context_end == "volume"
    assert model.encoder.temporal is not None
    trained = model.encoder.temporal.weight * 3  # stored divided by k
    start = mixer_start(cfg.model, lag=3, tr=1.5)  # the synthetic store's lag and TR
    assert start is not None and trained.shape == (3, 6)
    assert records(run_dir, "start")[-1]["mixer_start"] == start.tolist()  # the trainer passed it
    assert not torch.equal(trained, start.unsqueeze(1).expand(3, 6))  # and training moved it
