"""``load_pretrained(DIR)``: an exported model, ready to predict, in one call, without DeepSpeed.

The export's files are checked against its manifest, the model is built on the meta device from
the exported run config (the same ``GibletAutoencoder`` the trainer builds) and its weights are
assigned from ``model.safetensors``; nothing else is needed: no run directory, no store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from giblet_ds.config import RunConfig, load_config
from giblet_ds.config.saved_model import check_saved_design
from giblet_ds.model import GibletAutoencoder
from giblet_ds.pretrained import bundle
from giblet_ds.pretrained.bundle import BundleError, PredictionError
from giblet_ds.pretrained.features import StimulusFeatures
from giblet_ds.pretrained.settings import FeatureSettings
from giblet_ds.pretrained.window import predict_windows

__all__ = ["Prediction", "PretrainedModel", "load_pretrained"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Prediction:
    """Predicted BOLD for the TRs of one movie."""

    fmri: np.ndarray
    """float32 (T, V) z-scored units of the training target: row t is the volume acquired at
    (t + lag) x TR s, the response to stimulus TR t."""
    bottleneck: np.ndarray
    """float32 (T, bottleneck): TR t's own code (what the decoder reads)."""
    subject: int | None = None
    """The subject head ``fmri`` came from (``fmri_subjects[:, subject]``); None: the model's
    ``fmri`` output (the average subject of a model with subject heads, else its target)."""


@dataclass
class PretrainedModel:
    """An exported model: the network, its config, feature settings, mask and fMRI statistics."""

    path: Path
    model: GibletAutoencoder
    config: RunConfig
    features: FeatureSettings
    mask: np.ndarray = field(repr=False)
    """bool (X, Y, Z): the voxels of the prediction, in C order."""
    affine: np.ndarray = field(repr=False)
    stats: dict[str, np.ndarray] = field(repr=False)
    """``target_mean``, ``target_var`` (V,): the z-scored target on training TRs;
    ``subject_mean``, ``subject_std`` (S, V): each subject's raw training mean and std."""
    subjects: tuple[str, ...]
    target: str
    """'subject mean', or the one subject the run trained on."""
    manifest: dict[str, Any] = field(repr=False)
    codebooks: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_heads(self) -> int:
        """Subject heads of the model (``model.n_subjects``; 0: trained without them)."""
        return self.config.model.n_subjects

    def _check_head(self, subject: int | None) -> None:
        if subject is None:
            return
        if self.n_heads == 0:
            raise PredictionError(
                f"subject head {subject}: this model was trained without subject heads"
            )
        if not 0 <= subject < self.n_heads:
            raise PredictionError(
                f"subject head {subject}: this model has {self.n_heads} (0..{self.n_heads - 1})"
            )

    def predict(
        self,
        features: StimulusFeatures,
        *,
        rows: tuple[int, int] | None = None,
        batch_size: int = 16,
        subject: int | None = None,
    ) -> Prediction:
        """Predicted z-scored BOLD for TRs ``rows`` = [first, stop) of ``features`` (default: all),
        each TR with its temporal context (``model.context_trs``) cut at those rows' ends, as the
        evaluation cuts windows at a split's ends. ``subject``: the index of a subject head
        (a model with subject heads), whose own prediction is returned; None: the model's
        ``fmri`` output (the average subject, or the target of a model without heads).
        PredictionError when a value is not finite, or ``subject`` names no head."""
        self._check_head(subject)
        first, stop = rows if rows is not None else (0, features.n_trs)
        if not 0 <= first < stop <= features.n_trs:
            raise PredictionError(
                f"rows [{first}, {stop}) outside the movie's {features.n_trs} TRs"
            )
        fmri, codes = predict_windows(
            self.model,
            features,
            first=first,
            stop=stop,
            context_trs=self.config.model.context_trs,
            context_end=self.config.model.context_end,
            lag=self.features.lag,
            batch_size=batch_size,
            subject=subject,
        )
        bad = ~np.isfinite(fmri)
        if bad.any():
            tr, voxel = np.argwhere(bad)[0]
            raise PredictionError(
                f"the prediction is not finite at {int(bad.sum())} values (first: TR "
                f"{first + int(tr)}, voxel {int(voxel)}); nothing written. Check the weights "
                f"(tools/audit_weights.py {self.path / bundle.WEIGHTS}) and try --dtype fp32"
            )
        return Prediction(fmri=fmri, bottleneck=codes, subject=subject)

    def to_raw(self, fmri: np.ndarray, subject: int | None = None) -> np.ndarray:
        """z-scored predictions (T, V) in raw units: ``z x std + mean`` with each voxel's
        training std and mean of subject head ``subject`` (that subject's own), or, with None,
        averaged over the subjects (the one subject of a run that trained on one)."""
        self._check_head(subject)
        index = self.config.data.subject if subject is None else subject
        mean = self.stats["subject_mean"]
        std = self.stats["subject_std"]
        if index is not None:
            mean, std = mean[index], std[index]
        else:
            mean, std = mean.mean(axis=0), std.mean(axis=0)
        return (fmri * std + mean).astype(np.float32)


def load_pretrained(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    verify: bool = True,
) -> PretrainedModel:
    """Load the export at ``path`` (tools/export_model.py) onto ``device`` in ``dtype``
    (``fp32`` or ``bf16``). BundleError naming a missing or altered file; ``verify=False`` skips
    the checksums (sizes are still checked)."""
    from safetensors.torch import load_file

    folder = Path(path)
    manifest = bundle.verify_bundle(folder, checksums=verify)
    torch_dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if torch_dtype not in _DTYPES.values():
        raise BundleError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    config_path = folder / bundle.CONFIG
    check_saved_design(config_path)
    cfg = load_config(config_path)
    with torch.device("meta"):
        model = GibletAutoencoder(cfg.model)
    state = load_file(str(folder / bundle.WEIGHTS), device=str(device))
    expected = model.state_dict()
    wrong = [
        f"{name} {tuple(state[name].shape)} vs {tuple(t.shape)}"
        for name, t in expected.items()
        if name in state and tuple(state[name].shape) != tuple(t.shape)
    ]
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if wrong or missing or extra:
        raise BundleError(
            f"{folder / bundle.WEIGHTS} does not fit the model of {config_path}: "
            f"missing {missing[:4]}, unexpected {extra[:4]}, shapes {wrong[:4]}"
        )
    state = {name: t.to(torch_dtype) if t.is_floating_point() else t for name, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    features = FeatureSettings.from_dict(json.loads((folder / bundle.FEATURES).read_text()))
    stats_raw = load_file(str(folder / bundle.FMRI_STATS))
    stats = {name: t.numpy() for name, t in stats_raw.items()}
    import nibabel as nib

    img: Any = nib.load(str(folder / bundle.MASK))
    mask = np.asarray(img.dataobj) > 0
    if int(mask.sum()) != cfg.model.n_voxels:
        raise BundleError(
            f"{folder / bundle.MASK}: {int(mask.sum())} voxels, the model predicts "
            f"{cfg.model.n_voxels}; export the model again"
        )
    codebooks = None
    if (folder / bundle.CODEBOOKS).is_file():
        codebooks = dict(load_file(str(folder / bundle.CODEBOOKS)))
    source = manifest.get("source", {})
    return PretrainedModel(
        path=folder,
        model=model,
        config=cfg,
        features=features,
        mask=mask,
        affine=np.asarray(img.affine, np.float64),
        stats=stats,
        subjects=tuple(source.get("subjects", ())),
        target=str(source.get("target", "subject mean")),
        manifest=manifest,
        codebooks=codebooks,
    )
