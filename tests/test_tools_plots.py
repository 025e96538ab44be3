"""tools/plot_reconstructions.py on a checkpoint written by the real trainer."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from giblet_ds.checkpoint import convert_zero_checkpoint
from giblet_ds.store import load_mask, open_store
from tests.test_tools_common import build_real_run, load_tool

plot_reconstructions = load_tool("plot_reconstructions")


@pytest.fixture(scope="session")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp() / "real_run_fixture"
    base.mkdir(exist_ok=True)
    return build_real_run(base)


def _store(run: Path) -> Path:
    return run.parent / "real_run_store.h5"


def test_one_sample_from_a_trainer_tag(real_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots"
    args = ["--checkpoint", str(real_run), "--store", str(_store(real_run)), "--out", str(out),
            "--num-samples", "1", "--device", "cpu"]  # fmt: skip
    assert plot_reconstructions.main(args) == 0
    info = open_store(_store(real_run))
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 6  # 4 per sample + brain map + histogram
    video = next(out.glob("sample_*_video.png"))
    # two panels of 4 x (4 * H / W + 0.7) inches at 100 dpi: the frame keeps its aspect ratio
    assert Image.open(video).size == (800, round((4 * info.height / info.width + 0.7) * 100))
    with Image.open(next(out.glob("sample_*_audio.png"))) as audio:
        assert audio.size == (900, round((1.1 * info.n_q + 0.8) * 100))
    for name in pngs:
        assert (out / name).stat().st_size > 5_000, name
    mask, affine = load_mask(_store(real_run))
    img = nib.load(out / "voxel_r.nii.gz")
    assert img.shape == mask.shape
    np.testing.assert_allclose(img.affine, affine)
    data = np.asarray(img.dataobj)
    assert np.count_nonzero(data[~mask]) == 0 and np.count_nonzero(data[mask]) > 0
    metrics = json.loads((out / "metrics.json").read_text())
    # the run directory stands for its best tag; its r is the trainer's validation r there
    vals = [json.loads(line) for line in (real_run / "metrics.jsonl").read_text().splitlines()]
    best = [r for r in vals if r["kind"] == "val" and r["is_best"]][-1]
    assert metrics["fmri_r_mean"] == pytest.approx(best["fmri_r_mean"], abs=1e-5)
    assert metrics["checkpoint"].endswith("checkpoints/best")
    page = (out / "index.html").read_text()
    assert all(f'src="{name}"' in page for name in pngs) and "voxel_r.nii.gz" in page


def test_consolidated_weights_give_the_same_result(real_run: Path, tmp_path: Path) -> None:
    consolidated = tmp_path / "fp32"
    convert_zero_checkpoint(real_run / "checkpoints", consolidated, tag="best",
                            safe_serialization=True)  # fmt: skip
    out = tmp_path / "plots"
    args = ["--checkpoint", str(consolidated / "model.safetensors"), "--store",
            str(_store(real_run)), "--out", str(out), "--num-samples", "2",
            "--config", str(real_run / "checkpoints" / "best" / "run_config.yaml")]  # fmt: skip
    assert plot_reconstructions.main(args) == 0
    vals = [json.loads(line) for line in (real_run / "metrics.jsonl").read_text().splitlines()]
    best = [r for r in vals if r["kind"] == "val" and r["is_best"]][-1]
    got = json.loads((out / "metrics.json").read_text())
    assert got["fmri_r_mean"] == pytest.approx(best["fmri_r_mean"], abs=1e-5)
    assert len(list(out.glob("sample_*_fmri.png"))) == 2


def test_bad_inputs_exit_2(
    real_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = str(_store(real_run))
    lonely = tmp_path / "lonely.safetensors"
    save_file({"w": torch.zeros(2)}, lonely)
    for checkpoint, message in [
        (tmp_path / "missing", "no such file or folder"),
        (lonely, "no run config found"),
    ]:
        args = ["--checkpoint", str(checkpoint), "--store", store, "--out", str(tmp_path / "o")]
        assert plot_reconstructions.main(args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    args = ["--checkpoint", str(lonely), "--store", store, "--out", str(tmp_path / "o"),
            "--config", str(real_run / "config.resolved.yaml")]  # fmt: skip
    assert plot_reconstructions.main(args) == 2
    assert "does not match the model" in capsys.readouterr().err


def test_a_store_of_another_mask_is_refused_and_another_store_is_said(
    real_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same 23 voxels in another mask (seed 1) drew an r map in the wrong space with exit 0;
    refused now, nothing written. Same mask, other data (noise 0.5): printed and recorded in
    metrics.json and index.html. Consolidated weights have no metadata.json: the training store
    named in the run config tells."""
    from giblet_ds.store import mask_sha256, write_synthetic_store

    store = _store(real_run)
    other_mask = write_synthetic_store(tmp_path / "other_mask.h5", seed=1)
    assert open_store(other_mask).n_voxels == open_store(store).n_voxels
    weights = tmp_path / "fp32"
    convert_zero_checkpoint(real_run / "checkpoints" / "best", weights)
    config = ["--config", str(real_run / "checkpoints" / "best" / "run_config.yaml")]
    for checkpoint, extra in ((real_run, []), (weights, config)):
        args = ["--checkpoint", str(checkpoint), "--store", str(other_mask),
                "--out", str(tmp_path / "a"), "--num-samples", "1", "--device", "cpu", *extra]  # fmt: skip
        assert plot_reconstructions.main(args) == 2
        err = capsys.readouterr().err
        assert f"whose brain mask differs from that of {other_mask}" in err
        assert f"mask {mask_sha256(other_mask)[:12]} against the training mask" in err
        assert not (tmp_path / "a").exists()

    same_mask = write_synthetic_store(tmp_path / "same_mask.h5", noise=0.5)
    out = tmp_path / "b"
    args = ["--checkpoint", str(real_run), "--store", str(same_mask), "--out", str(out),
            "--num-samples", "1", "--device", "cpu"]  # fmt: skip
    assert plot_reconstructions.main(args) == 0
    printed = capsys.readouterr().out
    match = json.loads((out / "metrics.json").read_text())["store_match"]
    assert match["verdict"] == "other store, same mask"
    assert match["note"].startswith(f"OTHER STORE: {real_run}/checkpoints/best was trained on")
    assert f"WARNING: {match['note']}" in printed.splitlines()
    assert "<b>WARNING</b>: OTHER STORE:" in (out / "index.html").read_text()
