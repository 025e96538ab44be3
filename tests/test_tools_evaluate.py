"""tools/evaluate.py on a checkpoint written by the real trainer: files, same TRs and voxels,
numbers recomputed by hand from the store, the ridge cache, --roi, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from giblet_ds.errors import GibletError
from giblet_ds.evaluation.truth import find_ground_truth
from giblet_ds.store import load_mask, open_store
from tests.test_tools_common import load_tool

evaluate_tool = load_tool("evaluate")


@pytest.fixture(scope="module")
def run_and_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """3 subjects, 120 TRs (test split 17 TRs), 41 voxels; the tiny preset, 1 rank (~30 s)."""
    from giblet_ds.store import write_synthetic_store
    from tests.train_harness import run_training

    base = tmp_path_factory.mktemp("evaluate")
    store = write_synthetic_store(base / "store.h5", n_trs=120, n_voxels=41, n_subjects=3)
    run = base / "run"
    proc = run_training(run, store, world=1, sets=("train.evaluate_split=test",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, store


def test_evaluation_files_and_hand_checked_numbers(
    run_and_store: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, store = run_and_store
    out = tmp_path / "eval"
    cache = tmp_path / "cache"
    args = [str(run), "--store", str(store), "--out", str(out), "--device", "cpu",
            "--ridge-cache", str(cache), "--shifts", "20"]  # fmt: skip
    assert evaluate_tool.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("test split, 17 TRs, target: subject mean")
    for row in ("model r", "ridge r (himalaya)", "ceiling r (sqrt reliability)",
                "fMRI term, training-mean constant", "voxels with model r > 0.1"):  # fmt: skip
        assert row in printed
    data = json.loads((out / "evaluation.json").read_text())
    assert data["split"] == "test" and data["n_trs"] == 17
    # launch/train.py evaluated best on the test split when training ended: the same numbers
    at_end = json.loads((run / "evaluation-test" / "evaluation.json").read_text())
    for name in ("all", "reliable"):
        for key in ("model_r", "ridge_r", "ceiling_r", "constant_term", "model_term", "n_voxels"):
            assert at_end["sets"][name][key] == data["sets"][name][key], (name, key)
    assert data["checkpoint"].endswith("checkpoints/best")
    info = open_store(store)
    sets = data["sets"]
    assert set(sets) == {"all", "reliable"}
    for s in sets.values():  # one table: the same TRs everywhere
        assert s["split"] == "test" and s["n_trs"] == 17
    assert sets["all"]["n_voxels"] == 41 and sets["all"]["ceiling_r"] is None
    assert sets["reliable"]["ceiling_r"] is not None and sets["all"]["oracle_r"] is None

    # maps in the store's mask space; the table's r is the mean of the map over the set
    mask, affine = load_mask(store)
    maps = {}
    for name in ("model_r", "ridge_r", "ceiling_r", "model_r_normalized"):
        img = nib.load(out / f"{name}.nii.gz")
        np.testing.assert_allclose(img.affine, affine)
        maps[name] = np.asarray(img.dataobj)[mask]
    assert sets["all"]["model_r"] == pytest.approx(float(maps["model_r"].mean()), abs=1e-6)
    assert sets["all"]["ridge_r"] == pytest.approx(float(maps["ridge_r"].mean()), abs=1e-6)
    assert (out / "model_r.png").stat().st_size > 5_000

    # the constant's term by hand: test-TR subject mean against the training mean and variance
    with h5py.File(store, "r") as fh:
        y = fh["fmri/mean"][info.splits["test"].tolist()].astype(np.float64)
        mean = fh["stats/fmri/mean"][()].astype(np.float64)
        var = fh["stats/fmri/var"][()].astype(np.float64)
        subjects = fh["fmri/subjects"][:, info.splits["train"].tolist()].astype(np.float64)
    assert sets["all"]["constant_term"] == pytest.approx(
        ((y - mean) ** 2).mean() / var.mean(), rel=1e-5
    )
    # reliable voxels chosen on training TRs only: mean pairwise r of the 3 subjects > 0.1
    pairs = [(0, 1), (0, 2), (1, 2)]
    isc = np.mean([[np.corrcoef(subjects[i, :, v], subjects[j, :, v])[0, 1] for v in range(41)]
                   for i, j in pairs], axis=0)  # fmt: skip
    assert sets["reliable"]["n_voxels"] == int((isc > 0.1).sum())

    # second run: the ridge baseline comes from the cache, same numbers
    assert evaluate_tool.main([*args[:4], str(tmp_path / "again"), *args[5:]]) == 0
    again = json.loads((tmp_path / "again" / "evaluation.json").read_text())
    assert data["ridge"]["from_cache"] is False and again["ridge"]["from_cache"] is True
    assert again["sets"]["all"]["ridge_r"] == pytest.approx(sets["all"]["ridge_r"], abs=1e-7)
    assert len(list(cache.glob("ridge_*.npz"))) == 1


def test_roi_set_and_bad_input(run_and_store: tuple[Path, Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    run, store = run_and_store
    mask, affine = load_mask(store)
    roi = np.zeros(mask.shape, np.uint8)
    roi[tuple(np.argwhere(mask)[:10].T)] = 1
    nib.save(nib.Nifti1Image(roi, affine), str(tmp_path / "roi.nii.gz"))
    common = [str(run), "--store", str(store), "--device", "cpu", "--no-ridge", "--shifts", "5"]
    assert (
        evaluate_tool.main(
            [*common, "--out", str(tmp_path / "o"), "--roi", str(tmp_path / "roi.nii.gz")]
        )
        == 0
    )
    sets = json.loads((tmp_path / "o" / "evaluation.json").read_text())["sets"]
    assert sets["roi"]["n_voxels"] == 10 and sets["roi"]["ridge_r"] is None
    capsys.readouterr()
    # a ROI on another grid: named, exit 2, nothing written
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), str(tmp_path / "bad.nii.gz"))
    assert (
        evaluate_tool.main(
            [*common, "--out", str(tmp_path / "b"), "--roi", str(tmp_path / "bad.nii.gz")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "evaluate: error: --roi" in err and "not the store's mask grid" in err
    assert not (tmp_path / "b").exists()
    # a truth that does not belong to the store is refused, never silently used
    (tmp_path / "ground_truth.json").write_text(json.dumps({"fmri_sha256": {"x.nii.gz": "00"}}))
    np.savez(tmp_path / "ground_truth.npz", response=np.zeros(1))
    with pytest.raises(GibletError, match="not the store's input hashes"):
        find_ground_truth(open_store(store), tmp_path / "ground_truth.json")


def test_a_store_of_another_mask_is_refused_and_another_store_is_said(
    run_and_store: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same 41 voxels, another mask (seed 1): the model's outputs belong to other voxels, refused
    before anything is written (was exit 0 and a score). Same mask, other data (noise 0.5): a
    legitimate cross-store test, said on the console and in evaluation.json and table.txt."""
    from giblet_ds.store import mask_sha256, write_synthetic_store

    run, store = run_and_store
    meta = json.loads((run / "checkpoints" / "best" / "metadata.json").read_text())
    assert meta["mask_hash"] == mask_sha256(store)  # the trainer records the training mask
    sizes = dict(n_trs=120, n_voxels=41, n_subjects=3)
    other_mask = write_synthetic_store(tmp_path / "other_mask.h5", seed=1, **sizes)
    common = ["--device", "cpu", "--no-ridge", "--shifts", "5"]
    assert evaluate_tool.main([str(run), "--store", str(other_mask), "--out",
                               str(tmp_path / "a"), *common]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert f"whose brain mask differs from that of {other_mask}" in err
    assert f"mask {mask_sha256(other_mask)[:12]} against the training mask " in err
    assert f"{mask_sha256(store)[:12]})" in err and "Use the training store" in err
    assert not (tmp_path / "a").exists()

    same_mask = write_synthetic_store(tmp_path / "same_mask.h5", noise=0.5, **sizes)
    assert mask_sha256(same_mask) == mask_sha256(store)
    out = tmp_path / "b"
    assert evaluate_tool.main([str(run), "--store", str(same_mask), "--out", str(out),
                               *common]) == 0  # fmt: skip
    captured = capsys.readouterr()
    note = (
        f"OTHER STORE: {run}/checkpoints/best was trained on store "
        f"{open_store(store).build_hash[:12]} "
        f"(data.store={store}); {same_mask} (store {open_store(same_mask).build_hash[:12]}) has "
        "the same mask but other data: these are cross-store scores, not the model's held-out "
        "score"
    )
    assert f"WARNING: {note}" in captured.out.splitlines()
    assert f"WARNING: {note}" in (out / "table.txt").read_text().splitlines()
    match = json.loads((out / "evaluation.json").read_text())["store_match"]
    assert match["verdict"] == "other store, same mask" and match["note"] == note
    assert match["trained_store_hash"] == open_store(store).build_hash

    # the training store itself: nothing to say
    assert evaluate_tool.main([str(run), "--store", str(store), "--out", str(tmp_path / "c"),
                               *common]) == 0  # fmt: skip
    assert "WARNING" not in capsys.readouterr().out
    match = json.loads((tmp_path / "c" / "evaluation.json").read_text())["store_match"]
    assert match["verdict"] == "training store" and match["note"] == ""


def test_a_tag_without_a_mask_hash_is_checked_against_its_training_store(
    run_and_store: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tags written before metadata.json held mask_hash: the mask comes from the training store the
    run config names; when that store is gone too, the evaluation says the mask is unchecked."""
    import shutil

    from giblet_ds.store import write_synthetic_store

    run, store = run_and_store
    old = tmp_path / "old_run"
    shutil.copytree(run, old)
    for meta in (old / "checkpoints").glob("*/metadata.json"):
        body = json.loads(meta.read_text())
        body.pop("mask_hash", None)
        meta.write_text(json.dumps(body))
    sizes = dict(n_trs=120, n_voxels=41, n_subjects=3)
    other_mask = write_synthetic_store(tmp_path / "other_mask.h5", seed=1, **sizes)
    common = ["--device", "cpu", "--no-ridge", "--shifts", "5", "--no-verify"]
    assert evaluate_tool.main([str(old), "--store", str(other_mask), "--out",
                               str(tmp_path / "a"), *common]) == 2  # fmt: skip
    assert "whose brain mask differs" in capsys.readouterr().err

    moved = tmp_path / "moved.h5"
    shutil.copy(store, moved)  # the run config's data.store no longer exists
    config = tmp_path / "config.yaml"
    text = (old / "checkpoints" / "best" / "run_config.yaml").read_text()
    config.write_text(text.replace(str(store), str(tmp_path / "gone.h5")))
    out = tmp_path / "b"
    assert evaluate_tool.main([str(old), "--store", str(other_mask), "--out", str(out),
                               "--config", str(config), *common]) == 0  # fmt: skip
    match = json.loads((out / "evaluation.json").read_text())["store_match"]
    assert match["verdict"] == "other store, mask unchecked"
    assert "the training mask is unknown" in match["note"]
    assert "WARNING: OTHER STORE:" in capsys.readouterr().out
