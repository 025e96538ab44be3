"""Offline pretrained weights (issue 10): ``--encodec-weights FILE`` and ``--clip-weights FILE``.

Networks with random weights stand in for the real checkpoints (nothing is downloaded): saved to
files, loaded by the build, they must give exactly the codes and embeddings the same networks give
in memory; another file gives other features; a truncated, mismatched or wrong file is an error
that names it and leaves no store.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from giblet_ds.errors import StoreError
from giblet_ds.store import open_store
from giblet_ds.store.builder import audio, text
from giblet_ds.store.builder.pipeline import BuildInputs, build_store
from giblet_ds.store.builder.settings import BuildSettings
from tests.test_store_build import SETTINGS, _make_raw

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg (make setup)")
PRETRAINED = BuildSettings(**{**SETTINGS.__dict__, "pretrained": True})


def _encodec(seed: int) -> Any:
    """EnCodec 24 kHz with random weights and random (initialized) codebooks."""
    from encodec import EncodecModel

    torch.manual_seed(seed)
    model = EncodecModel.encodec_model_24khz(pretrained=False)
    model.set_target_bandwidth(SETTINGS.encodec_bandwidth)
    # Codebooks by k-means on 4 s of a noisy chirp, as a trained model's would be spread out.
    t = np.arange(4 * 24000) / 24000
    rng = np.random.default_rng(seed)
    sound = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.05 * rng.standard_normal(len(t))
    audio.init_random_codebooks(model, sound.astype(np.float32))
    return model.eval()


def _clip_tower(seed: int) -> Any:
    import open_clip
    from open_clip.model import _build_text_tower

    config = open_clip.get_model_config(SETTINGS.clip_model)
    torch.manual_seed(seed)
    return _build_text_tower(config["embed_dim"], config["text_cfg"]).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("weights")
    enc_a, enc_b = _encodec(11), _encodec(12)
    tower_a, tower_b = _clip_tower(21), _clip_tower(22)
    torch.save(enc_a.state_dict(), folder / "encodec_a.th")
    torch.save({"state_dict": enc_b.state_dict()}, folder / "encodec_b.pt")  # a wrapped one
    torch.save(tower_a.state_dict(), folder / "clip_a.pt")
    # A CustomTextCLIP-style whole-model file holds the tower under "text.".
    save_file(
        {f"text.{k}": v.contiguous() for k, v in tower_b.state_dict().items()},
        str(folder / "clip_b.safetensors"),
    )
    return {
        "folder": folder,
        "encodec": (enc_a, enc_b),
        "clip": (tower_a, tower_b),
        "raw": _make_raw(tmp_path_factory.mktemp("raw")),
    }


def _cli() -> Any:
    spec = importlib.util.spec_from_file_location(
        "build_store_cli", Path(__file__).resolve().parents[1] / "tools" / "build_store.py"
    )
    assert spec is not None and spec.loader is not None
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def _args(raw: BuildInputs, out: Path) -> list[str]:
    return [
        "--video", str(raw.video), "--annotations", str(raw.annotations),
        "--fmri", *map(str, raw.fmri), "--out", str(out), "--quiet",
        "--tr", "0.5", "--lag", "1", "--frame-height", "9", "--frame-width", "16",
        "--encodec-bandwidth", "1.5", "--clip-model", "ViT-S-32-alt",
        "--annotations-per-tr", "2", "--split-fractions", "0.5", "0.25", "0.25",
        "--audio-segment-s", "5",
    ]  # fmt: skip


def _embed(tower: Any, texts: list[str]) -> np.ndarray:
    import open_clip

    tokenizer = open_clip.get_tokenizer(SETTINGS.clip_model)
    with torch.inference_mode():
        out = torch.nn.functional.normalize(tower(tokenizer(texts)).float(), dim=-1)
    return out.numpy()


def test_build_with_weight_files_matches_the_networks_in_memory(
    files: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import h5py

    raw, folder = files["raw"], files["folder"]
    out = tmp_path / "store.h5"
    code = _cli().main(
        [
            *_args(raw, out),
            "--encodec-weights",
            str(folder / "encodec_a.th"),
            "--clip-weights",
            str(folder / "clip_a.pt"),
        ]  # fmt: skip
    )
    assert code == 0, capsys.readouterr().err
    info = open_store(out)
    assert info.pretrained == {"encodec": True, "clip": True} and info.attrs["warning"] == ""
    records = info.attrs["weight_files"]
    for role, name in (("encodec", "encodec_a.th"), ("clip", "clip_a.pt")):
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert records[role]["name"] == name and records[role]["sha256"] == digest
        assert records[role]["checksum"] == "not published (any state dict)"
        assert info.attrs["input_hashes"][f"{role}-weights"]["sha256"] == digest
    assert info.attrs["clip_pretrained_tag"] == "file:clip_a.pt"

    # The same networks in memory give exactly the stored codes and embeddings.
    wave = audio.decode_audio(raw.video)
    codes = audio.encode_audio(wave, files["encodec"][0], segment_s=SETTINGS.audio_segment_s)
    expected_codes = audio.codes_per_tr(codes, SETTINGS.tr, info.n_trs)
    annotations, _ = text.read_annotations(raw.annotations, SETTINGS.text_columns)
    embeddings = _embed(files["clip"][0], [a.text for a in annotations])
    expected_text, expected_mask = text.annotations_per_tr(
        annotations, embeddings, tr=SETTINGS.tr, n_trs=info.n_trs, slots=2
    )
    with h5py.File(out, "r") as handle:
        np.testing.assert_array_equal(handle["audio_codes"][()], expected_codes)
        np.testing.assert_array_equal(handle["text_mask"][()], expected_mask)
        np.testing.assert_allclose(handle["text"][()], expected_text, atol=1e-6)
    assert len(np.unique(expected_codes[:, 0])) > 5  # real variety, not all one code


def test_other_files_give_other_features(files: dict[str, Any]) -> None:
    folder = files["folder"]
    wave = audio.decode_audio(files["raw"].video)[: 3 * 24000]
    model_a, record_a = audio.load_encodec(1.5, True, folder / "encodec_a.th")
    model_b, record_b = audio.load_encodec(1.5, True, folder / "encodec_b.pt")
    codes_a, codes_b = (audio.encode_audio(wave, m, segment_s=5.0) for m in (model_a, model_b))
    np.testing.assert_array_equal(codes_b, audio.encode_audio(wave, files["encodec"][1]))
    assert (codes_a[0] != codes_b[0]).mean() > 0.5 and record_a["sha256"] != record_b["sha256"]
    texts = ["Sherlock enters", "John sits; Flat"]
    encode_a, dim, _, _ = text.load_text_encoder("ViT-S-32-alt", True, weights=folder / "clip_a.pt")
    encode_b, _, tag, _ = text.load_text_encoder(
        "ViT-S-32-alt", True, weights=folder / "clip_b.safetensors"
    )
    assert dim == 256 and tag == "file:clip_b.safetensors"
    np.testing.assert_allclose(encode_b(texts), _embed(files["clip"][1], texts), atol=1e-6)
    assert not np.allclose(encode_a(texts), encode_b(texts), atol=1e-2)


def test_wrong_or_truncated_files_are_clear_errors_and_leave_no_store(
    files: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw, folder = files["raw"], files["folder"]
    out = tmp_path / "store.h5"
    truncated = tmp_path / "encodec_cut.th"
    data = (folder / "encodec_a.th").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    cli = _cli()
    cases = [
        (["--encodec-weights", str(truncated), "--clip-weights", str(folder / "clip_a.pt")],
         "encodec_cut.th [--encodec-weights]: not a readable weight file"),
        (["--encodec-weights", str(folder / "clip_a.pt"), "--clip-weights", str(folder / "clip_a.pt")],
         "clip_a.pt [--encodec-weights]: weights do not fit the network the build uses: missing"),
        (["--encodec-weights", str(folder / "encodec_a.th"),
          "--clip-weights", str(folder / "encodec_a.th")],
         "encodec_a.th [--clip-weights]: weights do not fit the network the build uses: missing"),
        (["--encodec-weights", str(tmp_path / "nothing.th"), "--clip-weights", str(folder / "clip_a.pt")],
         "nothing.th [--encodec-weights]: input file not found"),
        (["--encodec-weights", str(folder / "encodec_a.th"), "--no-pretrained"],
         "weight files and --no-pretrained exclude each other"),
    ]  # fmt: skip
    for flags, message in cases:
        assert cli.main([*_args(raw, out), *flags]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("error: ") and message in err, (message, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["encodec_cut.th"]
    # A file under the package's own name must match the checksum that name publishes.
    named = tmp_path / "copied" / "encodec_24khz-d7cc33bc.th"
    named.parent.mkdir()
    shutil.copy(folder / "encodec_a.th", named)
    for weights in (named, named.parent):  # the file, or a folder holding it
        with pytest.raises(StoreError) as caught:
            audio.load_encodec(6.0, True, weights)
        assert "checksum does not match the one the package publishes" in str(caught.value)
        assert "(expected sha256 d7cc33bc..." in str(caught.value)


def test_weight_files_change_the_build_hash(files: dict[str, Any]) -> None:
    from giblet_ds.store.builder.pipeline import hash_inputs

    raw, folder = files["raw"], files["folder"]
    a = hash_inputs(
        BuildInputs(raw.video, raw.annotations, raw.fmri, None, folder / "encodec_a.th")
    )
    b = hash_inputs(
        BuildInputs(raw.video, raw.annotations, raw.fmri, None, folder / "encodec_b.pt")
    )
    assert a["encodec-weights"]["sha256"] != b["encodec-weights"]["sha256"]
    assert {k: v for k, v in a.items() if k != "encodec-weights"} == {
        k: v for k, v in b.items() if k != "encodec-weights"
    }


def test_build_store_api_accepts_weight_files(files: dict[str, Any], tmp_path: Path) -> None:
    raw, folder = files["raw"], files["folder"]
    inputs = BuildInputs(
        raw.video, raw.annotations, raw.fmri,
        encodec_weights=folder / "encodec_b.pt", clip_weights=folder / "clip_b.safetensors",
    )  # fmt: skip
    result = build_store(inputs, tmp_path / "b.h5", PRETRAINED, progress=False)
    info = open_store(result.path)
    assert info.attrs["weight_files"]["clip"]["name"] == "clip_b.safetensors"
    assert set(result.peak_rss_mb) >= {"video", "audio", "text", "fmri_mask", "fmri"}
