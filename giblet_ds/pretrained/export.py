"""``export_model``: a trained checkpoint -> a folder that needs nothing else to predict with.

Reads the checkpoint (any form ``load_model`` takes), the run config beside it and the store it
was trained on, and writes weights, config, feature settings (with the feature networks' weight
hashes), mask, fMRI statistics, the held-out evaluation and a model card into a staging folder
that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from giblet_ds.checkpoint.loading import load_model
from giblet_ds.config import cross_check
from giblet_ds.errors import GibletError
from giblet_ds.pretrained import bundle
from giblet_ds.pretrained.card import render_card
from giblet_ds.pretrained.extractors import text_tower_sha256, training_codebooks
from giblet_ds.pretrained.settings import FeatureSettings
from giblet_ds.run.manifest import read_metadata
from giblet_ds.run.resolver import find_run_config
from giblet_ds.store import export_mask_nifti, load_target_stats, open_store
from giblet_ds.store.builder.hashing import file_sha256
from giblet_ds.store.reader import open_read_only
from giblet_ds.store.run_splits import with_split_runs

__all__ = ["export_model"]


def export_model(
    checkpoint: str | Path,
    out: str | Path,
    *,
    store: str | Path | None = None,
    training_video: str | Path | None = None,
    evaluation: str | Path | None = None,
    verify: bool = True,
) -> Path:
    """Write the export of ``checkpoint`` (a run directory stands for its ``best`` tag) to the
    new folder ``out``; returns it.

    ``store``: the training store (default: ``data.store`` of the run config); it must be the
    store the checkpoint was trained on (build hash). ``training_video``: the training movie,
    needed when the store was built with random feature weights (EnCodec's codebooks came from
    k-means on its first 30 s; checked against the store's SHA-256 of it). ``evaluation``: a
    ``tools/evaluate.py`` output folder (default: the run's ``evaluation-test`` when it scored
    this checkpoint). GibletError for any mismatch; ``out`` is never left half-written.
    """
    out = Path(out)
    if out.exists():
        raise GibletError(f"--out {out} exists; choose a new folder (nothing is overwritten)")
    model, cfg, location = load_model(checkpoint, verify=verify)
    config_path = find_run_config(location.path)
    info = open_store(store if store is not None else cfg.data.store)
    metadata = read_metadata(location.path) if location.kind == "tag" else None
    if metadata is not None and metadata.store_hash and metadata.store_hash != info.build_hash:
        raise GibletError(
            f"{info.path} (build hash {info.build_hash[:12]}) is not the store "
            f"{location.path} was trained on ({metadata.store_hash[:12]}); pass --store with "
            "the training store"
        )
    # a leave-one-run-out fold (data.split_runs) sees the store with its own runs' splits: its
    # training statistics and split sizes, as it was trained
    info = with_split_runs(info, cfg.data.split_runs)
    cross_check(cfg, store_sizes=info.model_input_sizes())
    features = FeatureSettings.from_store(info)
    codebooks, extractors = _extractor_records(
        features, info.attrs, training_video, first_run=info.runs.ids[0]
    )
    features = FeatureSettings.from_dict({**features.to_dict(), "extractors": extractors})
    subject = cfg.data.subject
    target = "subject mean" if subject is None else f"subject {info.subjects[subject]}"
    source: dict[str, Any] = {
        "checkpoint": str(location.path),
        "checkpoint_name": location.path.name,
        "step": metadata.step if metadata is not None else None,
        "store": str(info.path),
        "store_build_hash": info.build_hash,
        "subjects": list(info.subjects),
        "target": target,
        "n_trs": info.n_trs,
        "splits": info.split_sizes,
        "split_runs": cfg.data.split_runs,
        "target_smoothing_fwhm_mm": cfg.data.smoothing_fwhm_mm,
    }
    eval_json, table = _find_evaluation(evaluation, location, config_path)

    with bundle.staged_output(out, is_dir=True) as stage:
        from safetensors.torch import save_file

        state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
        save_file(state, str(stage / bundle.WEIGHTS))
        shutil.copyfile(config_path, stage / bundle.CONFIG)
        (stage / bundle.FEATURES).write_text(json.dumps(features.to_dict(), indent=1) + "\n")
        export_mask_nifti(info.path, stage / bundle.MASK)
        save_file(_fmri_stats(info, subject), str(stage / bundle.FMRI_STATS))
        if codebooks is not None:
            save_file(codebooks, str(stage / bundle.CODEBOOKS))
        if eval_json is not None:
            (stage / bundle.EVALUATION).write_text(json.dumps(eval_json, indent=1) + "\n")
        summary = {
            "n_voxels": info.n_voxels,
            "context_trs": cfg.model.context_trs,
            "context_end": cfg.model.context_end,
        }
        card = render_card(
            source=source, features=features, model_summary=summary,
            evaluation=eval_json, table=table,
        )  # fmt: skip
        (stage / bundle.CARD).write_text(card)
        for file in stage.iterdir():
            file.chmod(0o644)  # safetensors writes 0600; an export is meant to be shared
        bundle.write_manifest(stage)
        manifest_path = stage / bundle.MANIFEST
        manifest = json.loads(manifest_path.read_text())
        manifest["source"] = source
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def _extractor_records(
    features: FeatureSettings,
    attrs: dict[str, Any],
    training_video: str | Path | None,
    *,
    first_run: str = "run-1",
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Codebooks (random EnCodec only) and, per extractor, its weight hash and source. A store
    of many runs fitted its codebooks on the first run's movie (``RUN:video``)."""
    records: dict[str, Any] = {}
    codebooks = None
    if features.pretrained["encodec"]:
        file = features.weight_files.get("encodec")
        records["encodec"] = {
            "state_sha256": None,
            "source": f"pretrained, file {file['name']}" if file else "pretrained (package)",
        }
    else:
        hashes = attrs["input_hashes"]
        expected = hashes["video"] if "video" in hashes else hashes[f"{first_run}:video"]
        if training_video is None:
            raise GibletError(
                "--training-video: the store was built with random feature weights, whose "
                "EnCodec codebooks come from k-means on the training movie's first 30 s; pass "
                f"--training-video {expected['name']} (sha256 {expected['sha256'][:16]}...)"
            )
        path = Path(training_video)
        if not path.is_file():
            raise GibletError(f"--training-video {path}: file not found")
        digest = file_sha256(path)
        if digest != expected["sha256"]:
            raise GibletError(
                f"--training-video {path}: sha256 {digest[:16]}... is not the store's training "
                f"movie {expected['name']} ({expected['sha256'][:16]}...)"
            )
        codebooks, digest = training_codebooks(features, path)
        records["encodec"] = {
            "state_sha256": digest,
            "source": f"random weights (seed 0), codebooks by k-means on the first 30 s of "
            f"{expected['name']}",
        }
    if features.pretrained["clip"]:
        file = features.weight_files.get("clip")
        records["clip"] = {
            "state_sha256": None,
            "source": f"pretrained, file {file['name']}"
            if file
            else f"pretrained (open_clip tag {features.clip_tag})",
        }
    else:
        records["clip"] = {
            "state_sha256": text_tower_sha256(features),
            "source": "random weights (seed 0)",
        }
    return codebooks, records


def _fmri_stats(info: Any, subject: int | None) -> dict[str, torch.Tensor]:
    """The target's training mean and variance and each subject's raw training mean and std."""
    target = load_target_stats(info.path, subject=subject, info=info)["fmri"]
    with open_read_only(info.path) as handle:
        mean = np.asarray(handle["fmri/stats/mean"][()], np.float32)
        std = np.asarray(handle["fmri/stats/std"][()], np.float32)
    return {
        "target_mean": torch.from_numpy(np.asarray(target["mean"], np.float32)),
        "target_var": torch.from_numpy(np.asarray(target["var"], np.float32)),
        "subject_mean": torch.from_numpy(mean),
        "subject_std": torch.from_numpy(std),
    }


def _find_evaluation(
    evaluation: str | Path | None, location: Any, config_path: Path
) -> tuple[dict[str, Any] | None, str | None]:
    """evaluation.json and table.txt of this checkpoint: the given folder, else the run's
    ``evaluation-test`` when it scored this very checkpoint."""
    if evaluation is not None:
        folder = Path(evaluation)
        if not (folder / "evaluation.json").is_file():
            raise GibletError(f"--evaluation {folder}: no evaluation.json (tools/evaluate.py's)")
    else:
        folder = config_path.parent / "evaluation-test"
        if location.run is not None:
            folder = location.run.evaluation("test")
        if not (folder / "evaluation.json").is_file():
            return None, None
    data = json.loads((folder / "evaluation.json").read_text())
    if Path(data.get("checkpoint", "")).resolve() != location.path.resolve():
        if evaluation is not None:
            raise GibletError(
                f"--evaluation {folder}: scores {data.get('checkpoint')}, not {location.path}"
            )
        return None, None
    table = (folder / "table.txt").read_text() if (folder / "table.txt").is_file() else None
    return data, table
