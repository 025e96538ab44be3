"""Predict brain responses to a movie with an exported model, write them, contrast two movies.

``predict_movie``: features by the store builder's code (``compute_features``), then the model
over every TR with its temporal context. ``write_prediction``: a 4-D NIfTI on the mask's grid,
one volume per TR, volume i being the BOLD at (i + lag) x TR s of the movie, with a JSON sidecar
that says so. ``write_contrast``: the mean response to each of two movies, their difference and a
nilearn figure. ``check_subject``: whose brain is predicted (a subject's own head, the average
subject, or the one target of a model trained without subject heads).
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from giblet_ds.pretrained.bundle import PredictionError, staged_files
from giblet_ds.pretrained.extractors import Extractors, load_extractors
from giblet_ds.pretrained.features import StimulusFeatures, compute_features
from giblet_ds.pretrained.loading import Prediction, PretrainedModel

__all__ = [
    "UNITS",
    "MovieResult",
    "SubjectChoice",
    "check_subject",
    "extractors_for",
    "predict_movie",
    "write_contrast",
    "write_prediction",
]

UNITS = ("z", "raw")


@dataclass
class MovieResult:
    """One movie's features, prediction and the record of how they were made."""

    movie: Path
    features: StimulusFeatures
    prediction: Prediction
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SubjectChoice:
    """Whose brain a prediction is for (:func:`check_subject`)."""

    head: int | None
    """The subject head predicted through (``GibletOutput.fmri_subjects[:, head]``); None: the
    model's ``fmri`` output (the average subject, or the target of a model without heads)."""
    name: str | None
    """The subject's name as the store lists it (None: the average subject or the mean)."""
    label: str
    """What the console line and the sidecar say: ``subject sub-2 (its own subject head)``,
    ``average subject (subject mean; no --subject)``, or a headless model's target."""

    def record(self) -> dict[str, Any]:
        """The sidecar's fields: ``target``, ``subject``, ``subject_head``."""
        return {"target": self.label, "subject": self.name, "subject_head": self.head}


AVERAGE = "average subject"
"""The label of a heads model's ``fmri`` output; ``--subject mean`` names it too."""


def check_subject(model: PretrainedModel, subject: str | None) -> SubjectChoice:
    """The target ``--subject`` asks for. With subject heads: a subject's name (as
    ``model.subjects`` lists them) or its index picks that subject's own head; None (or
    ``mean``) the average subject, which predicts the subject mean. Without heads: only the
    target the model was trained on. PredictionError naming the valid choices otherwise."""
    n_heads = model.n_heads
    if n_heads == 0:
        return _headless(model, subject)
    # Names only when they are the heads' (an export whose store lists other subjects, e.g.
    # after tools/add_subject.py, is addressed by head index).
    names = list(model.subjects) if len(model.subjects) == n_heads else []
    if subject is None or (subject == "mean" and "mean" not in names):
        how = "no --subject" if subject is None else "--subject mean"
        return SubjectChoice(None, None, f"{AVERAGE} (subject mean; {how})")
    if subject in names:
        head = names.index(subject)
    elif subject.isdigit() and int(subject) < n_heads:
        head = int(subject)
    else:
        indices = f"an index 0..{n_heads - 1}"
        valid = f"{', '.join(names)} or {indices}" if names else indices
        raise PredictionError(
            f"--subject {subject}: not a subject of this model; valid: {valid}, or leave "
            f"--subject out (or pass mean) for the {AVERAGE}"
        )
    name = names[head] if names else None
    return SubjectChoice(head, name, f"subject {name or head} (its own subject head {head})")


def _headless(model: PretrainedModel, subject: str | None) -> SubjectChoice:
    index = model.config.data.subject
    trained = "mean" if index is None else model.subjects[index]
    label = model.target
    if subject is None or subject == trained or (index is not None and subject == str(index)):
        return SubjectChoice(None, None if index is None else trained, label)
    raise PredictionError(
        f"--subject {subject}: this model was trained without subject heads and predicts only "
        f"its training target ({label}): pass --subject {trained} or leave it out. To predict "
        "each subject, train with data.target=subjects (subject heads, model.n_subjects from "
        'the store; docs/design.md, "Subject heads") and export that run'
    )


def extractors_for(
    model: PretrainedModel,
    *,
    with_text: bool,
    encodec_weights: str | Path | None = None,
    clip_weights: str | Path | None = None,
    allow_other_weights: bool = False,
    device: str = "cpu",
) -> Extractors:
    """The export's feature networks, built and checked (``load_extractors``)."""
    return load_extractors(
        model.features,
        codebooks=model.codebooks,
        codebooks_path=model.path,
        with_text=with_text,
        encodec_weights=encodec_weights,
        clip_weights=clip_weights,
        allow_other_weights=allow_other_weights,
        device=device,
    )


def predict_movie(
    model: PretrainedModel,
    movie: str | Path,
    extractors: Extractors,
    *,
    annotations: str | Path | None = None,
    batch_size: int = 16,
    subject: SubjectChoice | None = None,
) -> MovieResult:
    """Features of ``movie`` and the model's prediction for each of its whole TRs, for
    ``subject`` (default: ``check_subject(model, None)``, the average subject or the target)."""
    subject = subject if subject is not None else check_subject(model, None)
    clock = time.perf_counter()
    features = compute_features(movie, model.features, extractors, annotations=annotations)
    feature_s = time.perf_counter() - clock
    prediction = model.predict(features, batch_size=batch_size, subject=subject.head)
    seconds = {**features.seconds, "features": round(feature_s, 3),
               "model": round(time.perf_counter() - clock - feature_s, 3)}  # fmt: skip
    lag, tr = model.features.lag, model.features.tr
    record = {
        "movie": str(movie),
        "movie_fps": features.fps,
        "movie_size": list(features.frame_size),
        "n_trs": features.n_trs,
        "trs_available": features.trs_available,
        "tr_s": tr,
        "lag_trs": lag,
        "timing": f"volume i is the BOLD at (i + {lag}) x {tr} s of the movie: the response to "
        f"stimulus TR i ([i x {tr}, (i + 1) x {tr}) s) after the lag of {lag} TRs "
        f"({lag * tr:g} s); the first {lag} TR(s) of the movie have no predicted volume",
        "first_volume_time_s": lag * tr,
        "frame_sampling": f"{model.features.frames_per_tr} frames per TR, "
        f"{model.features.sample_step_s:.4f} s apart (the training movie's frame_skip / fps), "
        "the frame on screen at each time, area-resized",
        "annotations": features.annotations,
        "text_slots_empty": not bool(features.text_mask.any()),
        **subject.record(),
        "feature_weights": extractors.checks,
        "feature_weight_hashes": extractors.hashes,
        "random_weight_features": not all(model.features.pretrained.values()),
        "model_dtype": str(model.dtype).replace("torch.", ""),
        "seconds": seconds,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    return MovieResult(Path(movie), features, prediction, record)


def _units(model: PretrainedModel, prediction: Prediction, units: str) -> np.ndarray:
    if units not in UNITS:
        raise PredictionError(f"--units must be one of {UNITS}, got {units!r}")
    return prediction.fmri if units == "z" else model.to_raw(prediction.fmri, prediction.subject)


def _volume_4d(model: PretrainedModel, series: np.ndarray) -> np.ndarray:
    out = np.zeros((*model.mask.shape, series.shape[0]), np.float32)
    out[model.mask] = series.T
    return out


def _nifti(model: PretrainedModel, data: np.ndarray, path: Path, *, tr: float | None = None,
           toffset: float = 0.0) -> None:  # fmt: skip
    import nibabel as nib

    img = nib.Nifti1Image(data, model.affine)
    img.header.set_xyzt_units("mm", "sec")
    if tr is not None:
        img.header.set_zooms((*img.header.get_zooms()[:3], tr))
        img.header["toffset"] = toffset  # the first volume's time in the movie
    nib.save(img, str(path))


def sidecar_path(out: Path) -> Path:
    """``pred.nii.gz`` -> ``pred.json``."""
    name = out.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return out.with_name(name[: -len(suffix)] + ".json")
    return out.with_name(name + ".json")


def write_prediction(
    model: PretrainedModel,
    result: MovieResult,
    out: str | Path,
    *,
    units: str = "z",
    codes: str | Path | None = None,
) -> dict[str, Path]:
    """Write the prediction as a 4-D NIfTI ``out`` (volume i: BOLD at (i + lag) x TR s; header
    TR and ``toffset`` set), its JSON sidecar and, with ``codes`` (``.csv`` or ``.npy``), the
    per-TR bottleneck codes (T, bottleneck). All files appear together or not at all."""
    out = Path(out)
    if not out.name.endswith((".nii", ".nii.gz")):
        raise PredictionError(f"--out {out}: name the NIfTI to write (.nii.gz or .nii)")
    if codes is not None and Path(codes).suffix not in (".csv", ".npy"):
        raise PredictionError(f"--codes {codes}: must end in .csv or .npy")
    series = _units(model, result.prediction, units)
    record = {**result.record, "units": _units_text(units, result.record), "nifti": str(out)}
    finals = [out, sidecar_path(out)] + ([Path(codes)] if codes is not None else [])
    tr = model.features.tr
    with staged_files(finals) as temps:
        _nifti(model, _volume_4d(model, series), temps[0], tr=tr, toffset=model.features.lag * tr)
        if codes is not None:
            record["codes"] = {"path": str(codes), "shape": list(result.prediction.bottleneck.shape),
                               "meaning": "row i: stimulus TR i's bottleneck code"}  # fmt: skip
            _write_codes(result.prediction.bottleneck, temps[2], Path(codes).suffix)
        temps[1].write_text(json.dumps(record, indent=1) + "\n")
    return {"nifti": out, "sidecar": finals[1], **({"codes": finals[2]} if codes else {})}


def _write_codes(codes: np.ndarray, path: Path, suffix: str) -> None:
    if suffix == ".npy":
        with open(path, "wb") as handle:
            np.save(handle, codes)
        return
    header = "tr," + ",".join(f"code_{j}" for j in range(codes.shape[1]))
    rows = np.column_stack([np.arange(len(codes)), codes])
    np.savetxt(path, rows, delimiter=",", header=header, comments="",
               fmt=["%d"] + ["%.8g"] * codes.shape[1])  # fmt: skip


def _units_text(units: str, record: dict[str, Any]) -> str:
    if record.get("subject_head") is not None:
        who = f"subject {record['subject'] or record['subject_head']}"
        if units == "z":
            return f"z: {who}'s own z-scored units (z-scored per voxel on the training TRs)"
        return f"raw: z x std + mean with {who}'s own raw training std and mean of each voxel"
    if units == "z":
        return "z: the training target's z-scored units (each subject z-scored per voxel on the " \
            "training TRs, then averaged)"  # fmt: skip
    return "raw: z x std + mean with each voxel's raw training std and mean averaged over subjects"


def write_contrast(
    model: PretrainedModel,
    a: MovieResult,
    b: MovieResult,
    out_dir: str | Path,
    *,
    units: str = "z",
) -> dict[str, Path]:
    """Mean predicted response to ``a`` and to ``b`` over all their TRs, and ``a - b``, as 3-D
    NIfTI on the mask's grid (``a_mean``, ``b_mean``, ``difference``), a nilearn figure of the
    difference and ``contrast.json``."""
    from giblet_ds.report.brain_maps import plot_brain_map

    out_dir = Path(out_dir)
    if a.prediction.subject != b.prediction.subject:
        raise PredictionError(
            f"a contrast of two subjects' predictions ({a.record.get('target')} vs "
            f"{b.record.get('target')}): predict both movies for the same subject"
        )
    mean_a = _units(model, a.prediction, units).mean(axis=0)
    mean_b = _units(model, b.prediction, units).mean(axis=0)
    diff = (mean_a - mean_b).astype(np.float32)
    names = ["a_mean.nii.gz", "b_mean.nii.gz", "difference.nii.gz", "difference.png",
             "contrast.json"]  # fmt: skip
    finals = [out_dir / n for n in names]
    record = {
        "a": a.record,
        "b": b.record,
        "units": _units_text(units, a.record),
        "difference": "a_mean - b_mean: the mean over each movie's TRs of the predicted BOLD",
        "difference_range": [float(diff.min()), float(diff.max())],
        "mean_abs_difference": float(np.abs(diff).mean()),
    }
    with staged_files(finals) as temps:
        for temp, values in zip(temps[:3], (mean_a, mean_b, diff), strict=True):
            volume = np.zeros(model.mask.shape, np.float32)
            volume[model.mask] = values
            _nifti(model, volume, temp)
        plot_brain_map(temps[2], temps[3], f"predicted {a.movie.name} - {b.movie.name}",
                       label="difference")  # fmt: skip
        temps[4].write_text(json.dumps(record, indent=1) + "\n")
    return dict(zip(["a_mean", "b_mean", "difference", "figure", "json"], finals, strict=True))
