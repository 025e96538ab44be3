"""Export a model trained by the real trainer on a store built from raw files, load it without
DeepSpeed, predict new movies through the store builder's feature code, contrast two movies, and
refuse what would silently mean something else.

Sizes: a 12 s movie at 25 fps, TR 0.25 s, lag 1 (48 TRs: test 6), 3 subjects on
a 5 x 6 x 7 grid, a 3-TR window ending at the volume; a 2 s gray-ramp movie at 30 fps, 40 x 24.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from giblet_ds.store.builder.pipeline import BuildInputs, build_store
from giblet_ds.store.builder.settings import BuildSettings
from tests.test_tools_common import load_tool

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg (make setup)")

predict_tool = load_tool("predict")
export_tool = load_tool("export_model")

SETTINGS = BuildSettings(
    tr=0.25,
    lag=1,
    frame_height=9,
    frame_width=16,
    encodec_bandwidth=1.5,
    clip_model="ViT-S-32-alt",
    pretrained=False,
    annotations_per_tr=2,
    split_fractions=(0.5, 0.25, 0.25),
    audio_segment_s=5.0,
)


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def _make_raw(folder: Path) -> BuildInputs:
    import openpyxl

    video = folder / "movie.m4v"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x36:rate=25",
            "-f", "lavfi", "-i", "sine=frequency=330:sample_rate=44100",
            "-t", "12", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(video))  # fmt: skip
    book = openpyxl.Workbook()
    book.active.append(
        ["Start Time (s) ", "End Time (s)", "Scene Details - A Level", "Name - All", "Location "]
    )
    for k in range(9):
        book.active.append([1.3 * k, 1.3 * k + 0.9, f"scene {k}", "Sherlock" if k % 2 else None,
                            "Flat"])  # fmt: skip
    book.save(folder / "annotations.xlsx")
    rng = np.random.default_rng(5)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-6.0, -9.0, -12.0]
    paths = []
    for index in range(3):
        data = rng.normal(700.0 + 40 * index, 15.0, size=(5, 6, 7, 50)).astype(np.float32)
        data[0] = 0.0
        paths.append(folder / f"sub-{index + 1}.nii.gz")
        nib.save(nib.Nifti1Image(data, affine), str(paths[-1]))
    return BuildInputs(video=video, annotations=folder / "annotations.xlsx", fmri=tuple(paths))


def _gray_ramp(path: Path, fps: int = 30, seconds: float = 2.0) -> Path:
    """Frame n is uniformly gray at luma 16 + 3 n (RGB 3 n x 255 / 219): its pixels say which
    frame it is."""
    _ffmpeg("-f", "lavfi", "-i", f"color=c=black:size=40x24:rate={fps}",
            "-f", "lavfi", "-i", "sine=frequency=520:sample_rate=48000",
            "-vf", "geq=lum='16+3*N':cb=128:cr=128", "-t", str(seconds),
            "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv444p", "-c:a", "aac", str(path))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Raw files -> store -> 1-rank training (tiny preset, test evaluation at the end) -> export."""
    from giblet_ds.pretrained import export_model
    from tests.train_harness import REPO, run_training

    base = tmp_path_factory.mktemp("pretrained")
    raw = _make_raw(base)
    store = build_store(raw, base / "store.h5", SETTINGS, progress=False).path
    run = base / "run"
    sets = ("model.context_trs=3", "model.context_end=volume", "model.context_init=hrf",
            "train.epochs=1", "train.evaluate_split=test")  # fmt: skip
    # This checkout's giblet_ds, not the one the venv's editable install points at.
    proc = run_training(run, store, world=1, sets=sets, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = export_model(run, base / "model", training_video=raw.video)
    return {"base": base, "raw": raw, "store": store, "run": run, "model": out}


@pytest.fixture(scope="module")
def exported_subjects(exported: dict[str, Any]) -> dict[str, Any]:
    """The same store trained with subject heads (``data.target=subjects``), exported."""
    from giblet_ds.pretrained import export_model
    from tests.train_harness import REPO, run_training

    base = exported["base"]
    run = base / "run_subjects"
    sets = ("model.context_trs=3", "model.context_end=volume", "model.context_init=hrf",
            "train.epochs=1", "data.target=subjects")  # fmt: skip
    proc = run_training(run, exported["store"], world=1, sets=sets, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = export_model(run, base / "model_subjects", training_video=exported["raw"].video)
    return {**exported, "run": run, "model": out}


def _copy_with(src: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    """A copy of an export changed by ``edit(folder)`` with its manifest written again, as a
    differently made export would be (only the content differs, not the bookkeeping)."""
    from giblet_ds.pretrained import bundle

    shutil.copytree(src, dst)
    edit(dst)
    source = json.loads((dst / bundle.MANIFEST).read_text())["source"]
    bundle.write_manifest(dst)
    manifest = json.loads((dst / bundle.MANIFEST).read_text())
    (dst / bundle.MANIFEST).write_text(json.dumps({**manifest, "source": source}))
    return dst


def test_export_load_round_trip(exported: dict[str, Any]) -> None:
    import giblet_ds
    from giblet_ds.checkpoint import load_model
    from giblet_ds.config import load_config
    from giblet_ds.store import load_mask, open_store

    model = giblet_ds.load_pretrained(exported["model"])
    reference, cfg, location = load_model(exported["run"])
    assert location.path.name == "best"
    ref_state, state = reference.state_dict(), model.model.state_dict()
    assert list(state) == list(ref_state)
    for name, tensor in ref_state.items():  # bit-identical
        assert torch.equal(state[name], tensor) and state[name].dtype == tensor.dtype, name
    assert model.config == cfg == load_config(exported["run"] / "config.resolved.yaml")
    info = open_store(exported["store"])
    build = model.features.build_settings
    assert build == info.attrs["settings"]
    assert (build["tr"], build["lag"], build["frame_skip"], build["encodec_bandwidth"]) == (
        0.25, 1, 4, 1.5)  # fmt: skip
    assert build["text_columns"] == ["Scene Details - A Level", "Name - All", "Location"]
    assert (model.features.training_fps, model.features.frames_per_tr) == (25.0, 2)
    assert model.features.pretrained == {"encodec": False, "clip": False}
    assert model.features.store_build_hash == info.build_hash
    assert set(model.features.extractors) == {"encodec", "clip"}
    assert all(len(r["state_sha256"]) == 64 for r in model.features.extractors.values())
    mask, affine = load_mask(exported["store"])
    np.testing.assert_array_equal(model.mask, mask)
    np.testing.assert_array_equal(model.affine, affine)
    assert model.subjects == ("sub-1", "sub-2", "sub-3") and model.target == "subject mean"
    # raw units: z x std + mean, the subjects' raw training statistics averaged
    import h5py

    with h5py.File(exported["store"]) as fh:
        raw_mean, raw_std = fh["fmri/stats/mean"][()], fh["fmri/stats/std"][()]
    z = np.array([[0.0] * info.n_voxels, [2.0] * info.n_voxels], np.float32)
    np.testing.assert_allclose(model.to_raw(z)[0], raw_mean.mean(0), rtol=1e-6)
    np.testing.assert_allclose(
        model.to_raw(z)[1], raw_mean.mean(0) + 2 * raw_std.mean(0), rtol=1e-6
    )
    card = (exported["model"] / "README.md").read_text()
    assert "RANDOM-WEIGHT" in card and info.build_hash in card
    assert "ridge r (himalaya)" in card and "ceiling r" in card  # the run's test evaluation
    # bf16 on load: the same weights rounded, the config unchanged
    half = giblet_ds.load_pretrained(exported["model"], dtype="bf16")
    w = "encoder.fmri_head.out.weight"
    assert half.model.state_dict()[w].dtype == torch.bfloat16
    assert torch.equal(half.model.state_dict()[w], ref_state[w].to(torch.bfloat16))


def test_prediction_reproduces_the_evaluation(exported: dict[str, Any]) -> None:
    """The training movie through the export's feature path gives the store's features bit for
    bit, and the model on the test TRs gives what tools/evaluate.py scores."""
    import h5py

    from giblet_ds.checkpoint import load_model
    from giblet_ds.evaluation import predict_split
    from giblet_ds.metrics import voxel_r
    from giblet_ds.pretrained import load_pretrained
    from giblet_ds.pretrained.features import compute_features
    from giblet_ds.pretrained.predict import extractors_for
    from giblet_ds.store import open_store

    model = load_pretrained(exported["model"])
    extractors = extractors_for(model, with_text=True)
    raw = exported["raw"]
    features = compute_features(raw.video, model.features, extractors,
                                annotations=raw.annotations)  # fmt: skip
    info = open_store(exported["store"])
    with h5py.File(exported["store"]) as fh:
        np.testing.assert_array_equal(features.video[: info.n_trs], fh["video"][()])
        np.testing.assert_array_equal(features.audio_codes[: info.n_trs], fh["audio_codes"][()])
        np.testing.assert_array_equal(features.text[: info.n_trs], fh["text"][()])
        np.testing.assert_array_equal(features.text_mask[: info.n_trs], fh["text_mask"][()])
    test = info.splits["test"]
    ours = model.predict(features, rows=(int(test[0]), int(test[-1]) + 1)).fmri
    reference, cfg, _ = load_model(exported["run"])
    theirs, target = predict_split(reference, cfg, info, "test", device=torch.device("cpu"))
    assert ours.shape == theirs.shape == (6, info.n_voxels)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    scored = json.loads((exported["run"] / "evaluation-test" / "evaluation.json").read_text())
    r = voxel_r(torch.from_numpy(ours), torch.from_numpy(target)).numpy()
    assert scored["sets"]["all"]["model_r"] == pytest.approx(float(r.mean()), abs=1e-6)


def test_new_movie_other_rate_and_size_without_annotations(
    exported: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    movie = _gray_ramp(tmp_path / "ramp.mp4")  # 30 fps, 40 x 24: the training movie is 25 fps
    out = tmp_path / "pred" / "ramp.nii.gz"
    args = [str(exported["model"]), "--video", str(movie), "--out", str(out),
            "--codes", str(tmp_path / "pred" / "codes.csv")]  # fmt: skip
    assert predict_tool.main(args) == 0
    printed = capsys.readouterr()
    assert "every text slot is empty" in printed.out and "RANDOM-WEIGHT" in printed.err
    img = nib.load(str(out))
    assert img.shape == (5, 6, 7, 8)  # 2 s = 8 whole TRs of 0.25 s
    assert img.header.get_zooms()[3] == pytest.approx(0.25)
    assert float(img.header["toffset"]) == pytest.approx(0.25)  # volume 0: 1 TR after onset
    sidecar = json.loads((tmp_path / "pred" / "ramp.json").read_text())
    assert sidecar["text_slots_empty"] is True and sidecar["lag_trs"] == 1
    assert sidecar["movie_fps"] == 30.0 and sidecar["movie_size"] == [40, 24]
    assert sidecar["feature_weights"]["clip"].startswith("not used: no annotations")
    assert sidecar["feature_weights"]["encodec"].startswith("weights sha256 matches")
    codes = np.loadtxt(tmp_path / "pred" / "codes.csv", delimiter=",", skiprows=1)
    assert codes.shape == (8, 1 + 6) and codes[:, 0].tolist() == list(range(8))

    # frames are sampled at the training movie's instants (every 4 / 25 = 0.16 s), not every
    # 4th frame of this one: TR i's frame j is the one on screen at 0.25 i + 0.16 j
    from giblet_ds.pretrained import compute_features, load_pretrained
    from giblet_ds.pretrained.predict import extractors_for

    model = load_pretrained(exported["model"])
    features = compute_features(movie, model.features, extractors_for(model, with_text=False))
    level = features.video[..., 0].mean(axis=(2, 3))
    shown = np.rint(level * 219 / 255 / 3).astype(int)  # frame numbers
    expected = [[int(np.floor((0.25 * i + 0.16 * j) * 30 + 1e-6)) for j in range(2)]
                for i in range(8)]  # fmt: skip
    assert shown.tolist() == expected


def test_contrast(exported: dict[str, Any], tmp_path: Path) -> None:
    from giblet_ds.pretrained import load_pretrained
    from giblet_ds.pretrained.predict import extractors_for, predict_movie

    a = _gray_ramp(tmp_path / "a.mp4")
    b = tmp_path / "b.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=48x32:rate=24", "-f", "lavfi",
            "-i", "sine=frequency=200:sample_rate=24000", "-t", "1.6",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(b))  # fmt: skip
    out = tmp_path / "contrast"
    args = [str(exported["model"]), "--video", str(a), "--contrast", str(b), "--out", str(out)]
    assert predict_tool.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "a_mean.nii.gz",
        "b_mean.nii.gz",
        "contrast.json",
        "difference.nii.gz",
        "difference.png",
    ]
    model = load_pretrained(exported["model"])
    extractors = extractors_for(model, with_text=False)
    pa = predict_movie(model, a, extractors).prediction.fmri
    pb = predict_movie(model, b, extractors).prediction.fmri
    assert (len(pa), len(pb)) == (8, 6)
    read = {n: np.asarray(nib.load(str(out / f"{n}.nii.gz")).dataobj)[model.mask]
            for n in ("a_mean", "b_mean", "difference")}  # fmt: skip
    np.testing.assert_allclose(read["a_mean"], pa.mean(0), rtol=1e-6)
    np.testing.assert_allclose(read["b_mean"], pb.mean(0), rtol=1e-6)
    np.testing.assert_allclose(read["difference"], pa.mean(0) - pb.mean(0), atol=1e-6)
    assert np.abs(read["difference"]).max() > 0
    assert (out / "difference.png").stat().st_size > 5_000
    record = json.loads((out / "contrast.json").read_text())
    assert record["a"]["n_trs"] == 8 and record["b"]["n_trs"] == 6


def test_refusals(
    exported: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file, save_file

    from giblet_ds.pretrained import BundleError, PredictionError, load_pretrained

    model_dir = exported["model"]
    movie = _gray_ramp(tmp_path / "m.mp4", seconds=1.0)
    out = tmp_path / "out" / "p.nii.gz"

    def refused(args: list[str], words: str) -> None:
        assert predict_tool.main(args) == 2
        assert words in capsys.readouterr().err
        assert not out.exists() and not (tmp_path / "out" / "p.json").exists()
        assert not list(tmp_path.glob("out/.tmp-*"))

    # a model folder missing a file
    missing = tmp_path / "missing"
    shutil.copytree(model_dir, missing)
    (missing / "mask.nii.gz").unlink()
    with pytest.raises(BundleError, match="missing mask.nii.gz"):
        load_pretrained(missing)
    refused([str(missing), "--video", str(movie), "--out", str(out)], "missing mask.nii.gz")

    # feature weights other than the export's: refused, or recorded with --allow-other-weights
    def other_hash(folder: Path) -> None:
        data = json.loads((folder / "features.json").read_text())
        data["extractors"]["encodec"]["state_sha256"] = "0" * 64
        (folder / "features.json").write_text(json.dumps(data))

    other = _copy_with(model_dir, tmp_path / "other", other_hash)
    refused([str(other), "--video", str(movie), "--out", str(out)],
            "encodec: network weights sha256")  # fmt: skip
    assert predict_tool.main([str(other), "--video", str(movie), "--out", str(out),
                              "--allow-other-weights"]) == 0  # fmt: skip
    sidecar = json.loads((tmp_path / "out" / "p.json").read_text())
    assert sidecar["feature_weights"]["allow_other_weights"].startswith("true")
    assert sidecar["feature_weights"]["encodec"].startswith("DIFFERENT weights")
    out.unlink()
    (tmp_path / "out" / "p.json").unlink()

    # a movie with no video stream
    sound = tmp_path / "sound.m4a"
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=24000", "-t", "1", str(sound))
    refused([str(model_dir), "--video", str(sound), "--out", str(out)], "has no video stream")

    # a non-finite prediction
    def nan_head(folder: Path) -> None:
        state = load_file(str(folder / "model.safetensors"))
        state["encoder.fmri_head.out.bias"][3] = float("nan")
        save_file(state, str(folder / "model.safetensors"))

    broken = _copy_with(model_dir, tmp_path / "nan", nan_head)
    refused([str(broken), "--video", str(movie), "--out", str(out)],
            "the prediction is not finite at 4 values (first: TR 0, voxel 3)")  # fmt: skip

    # a subject of a model trained without subject heads
    refused([str(model_dir), "--video", str(movie), "--out", str(out), "--subject", "sub-2"],
            "--subject sub-2: this model was trained without subject heads and predicts only "
            "its training target (subject mean): pass --subject mean or leave it out. To "
            "predict each subject, train with data.target=subjects")  # fmt: skip

    headless = load_pretrained(model_dir)
    z = np.zeros((1, int(headless.mask.sum())), np.float32)
    with pytest.raises(PredictionError, match="subject head 0: this model was trained without"):
        headless.to_raw(z, subject=0)

    # export: an existing folder is never overwritten; a random-weight store needs its movie
    assert export_tool.main([str(exported["run"]), "--out", str(model_dir)]) == 2
    assert "exists" in capsys.readouterr().err
    assert export_tool.main([str(exported["run"]), "--out", str(tmp_path / "e")]) == 2
    assert "--training-video movie.m4v" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def _hand_windows(features: Any) -> list[torch.Tensor]:
    """The model's inputs for every TR of a 4-TR movie, written out by hand for a 3-TR window
    ending at the volume with lag 1: slot 0 row t-1, slot 1 row t+1 (the volume's own stimulus
    row), slot 2 row t; rows -1 and 4 are zero padding, masked."""
    assert features.n_trs == 4
    rows = [(None, 1, 0), (0, 2, 1), (1, 3, 2), (2, None, 3)]

    def take(array: np.ndarray) -> np.ndarray:
        pad = np.zeros_like(array[0])
        return np.stack([np.stack([pad if r is None else array[r] for r in w]) for w in rows])

    mask = np.array([[r is not None for r in w] for w in rows])
    return [
        torch.from_numpy(np.divide(take(features.video), 255.0, dtype=np.float32)),
        torch.from_numpy(take(features.audio_codes).astype(np.int64)),
        torch.from_numpy(take(features.text)),
        torch.from_numpy(mask),
    ]


def test_subject_heads(
    exported_subjects: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--subject predicts through that subject's own head, the default is the average subject,
    raw units are that subject's; an unknown subject is refused naming the valid ones."""
    import h5py

    from giblet_ds.pretrained import PredictionError, compute_features, load_pretrained
    from giblet_ds.pretrained.predict import check_subject, extractors_for, predict_movie

    model_dir = exported_subjects["model"]
    model = load_pretrained(model_dir)
    assert (model.n_heads, model.subjects) == (3, ("sub-1", "sub-2", "sub-3"))
    movie = _gray_ramp(tmp_path / "m.mp4", seconds=1.0)  # 4 TRs
    features = compute_features(movie, model.features, extractors_for(model, with_text=False))
    with torch.no_grad():
        hand = model.model(*_hand_windows(features))
    assert hand.fmri_subjects is not None
    assert hand.fmri_subjects.shape == (4, 3, int(model.mask.sum()))
    own = hand.fmri_subjects.numpy()
    average = hand.fmri.numpy()
    for head in range(3):  # bit-identical to the model's own per-subject output
        np.testing.assert_array_equal(model.predict(features, subject=head).fmri, own[:, head])
    np.testing.assert_array_equal(model.predict(features).fmri, average)
    assert np.abs(own[:, 1] - average).max() > 1e-4  # the heads are not the average subject
    with pytest.raises(PredictionError, match=r"subject head 3: this model has 3 \(0\.\.2\)"):
        model.predict(features, subject=3)

    # the tool: --subject by name or index, the default the average subject
    out = tmp_path / "out" / "p.nii.gz"
    sidecar = tmp_path / "out" / "p.json"

    def predicted(*extra: str) -> tuple[np.ndarray, dict[str, Any], str]:
        assert predict_tool.main([str(model_dir), "--video", str(movie), "--out", str(out),
                                  *extra]) == 0  # fmt: skip
        values = np.asarray(nib.load(str(out)).dataobj)[model.mask].T
        record = json.loads(sidecar.read_text())
        out.unlink()
        sidecar.unlink()
        return values, record, capsys.readouterr().out

    values, record, printed = predicted("--subject", "sub-2")
    np.testing.assert_array_equal(values, own[:, 1])
    assert (record["target"], record["subject"], record["subject_head"]) == (
        "subject sub-2 (its own subject head 1)", "sub-2", 1)  # fmt: skip
    assert "predicted for subject sub-2 (its own subject head 1) (z units)" in printed
    assert record["units"] == "z: subject sub-2's own z-scored units (z-scored per voxel on " \
        "the training TRs)"  # fmt: skip
    values, record, _ = predicted("--subject", "1")
    np.testing.assert_array_equal(values, own[:, 1])
    assert record["subject"] == "sub-2"
    values, record, printed = predicted()
    np.testing.assert_array_equal(values, average)
    assert (record["target"], record["subject"], record["subject_head"]) == (
        "average subject (subject mean; no --subject)", None, None)  # fmt: skip
    assert "predicted for average subject (subject mean; no --subject) (z units)" in printed

    # raw units: z x std + mean with that subject's own training statistics
    with h5py.File(exported_subjects["store"]) as fh:
        raw_mean, raw_std = fh["fmri/stats/mean"][()], fh["fmri/stats/std"][()]
    values, record, _ = predicted("--subject", "sub-3", "--units", "raw")
    np.testing.assert_array_equal(values, own[:, 2] * raw_std[2] + raw_mean[2])
    assert record["units"] == "raw: z x std + mean with subject sub-3's own raw training std " \
        "and mean of each voxel"  # fmt: skip
    values, _, _ = predicted("--units", "raw")
    np.testing.assert_allclose(values, average * raw_std.mean(0) + raw_mean.mean(0), rtol=1e-6)

    # an unknown subject: refused, naming the valid ones, nothing written
    for bad, index in (("sub-9", "sub-9"), ("3", "3")):
        assert predict_tool.main([str(model_dir), "--video", str(movie), "--out", str(out),
                                  "--subject", bad]) == 2  # fmt: skip
        assert (f"--subject {index}: not a subject of this model; valid: sub-1, sub-2, sub-3 "
                "or an index 0..2, or leave --subject out (or pass mean) for the average "
                "subject") in capsys.readouterr().err  # fmt: skip
        assert not out.exists() and not sidecar.exists()

    # contrast: both movies through the subject's head; two subjects are not contrasted
    contrast = tmp_path / "contrast"
    other = _gray_ramp(tmp_path / "b.mp4", fps=25, seconds=1.0)
    args = [str(model_dir), "--video", str(movie), "--contrast", str(other), "--out",
            str(contrast), "--subject", "sub-1", "--units", "raw"]  # fmt: skip
    assert predict_tool.main(args) == 0
    a_mean = np.asarray(nib.load(str(contrast / "a_mean.nii.gz")).dataobj)[model.mask]
    raw = (own[:, 0] * raw_std[0] + raw_mean[0]).mean(0)
    np.testing.assert_allclose(a_mean, raw, rtol=1e-6)
    assert json.loads((contrast / "contrast.json").read_text())["a"]["subject"] == "sub-1"
    from giblet_ds.pretrained.predict import write_contrast

    extractors = extractors_for(model, with_text=False)
    first = predict_movie(model, movie, extractors, subject=check_subject(model, "sub-1"))
    mean = predict_movie(model, movie, extractors)
    with pytest.raises(PredictionError, match="predict both movies for the same subject"):
        write_contrast(model, first, mean, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_import_stays_light() -> None:
    """``import giblet_ds`` pulls in no torch; ``giblet_ds.load_pretrained`` is a lazy attribute."""
    import sys

    code = (
        "import sys, giblet_ds; assert 'torch' not in sys.modules; "
        "f = giblet_ds.load_pretrained; assert 'torch' in sys.modules; print(f.__module__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "giblet_ds.pretrained.loading"
