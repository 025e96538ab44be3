"""Build settings: one frozen dataclass, from flags or a YAML, validated on construction.

Everything that changes the store's content is a field here and goes into ``settings_hash``;
``device`` only changes where the work runs and is left out of the hash.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from giblet_ds.errors import ConfigError
from giblet_ds.store.builder.confounds import check_confounds
from giblet_ds.store.builder.sheet import MAX_DROPPED_FRACTION, TEXT_COLUMNS
from giblet_ds.store.builder.splits import SPLIT_BY, min_real_gap

__all__ = ["BuildSettings", "DEFAULT_TR", "MASK_RULES", "load_settings_yaml"]

DEFAULT_TR = 1.5
"""Seconds; the TR a build uses when none is given and the NIfTI headers do not contradict it."""
MASK_RULES = ("intersection", "file")
ENCODEC_BANDWIDTHS = (1.5, 3.0, 6.0, 12.0, 24.0)


@dataclass(frozen=True)
class BuildSettings:
    """How raw files become a store (defaults reproduce the seed's features)."""

    tr: float | None = None
    """Repetition time in seconds: the length of one stimulus window. None (not given): 1.5 s
    (``DEFAULT_TR``) when the NIfTI headers say 1.5 s or nothing; headers that say another TR
    stop the build and ask for it (headers are often wrong, so they are never taken silently)."""
    lag: int = 3
    """Stimulus TR t is paired with fMRI volume t + lag (haemodynamic delay, in TRs)."""
    frame_skip: int = 4
    """Take every frame_skip-th frame of each TR window."""
    frames_per_tr: int | None = None
    """Frames stored per TR; None: ceil(tr * fps / frame_skip) from the file's real fps."""
    frame_height: int = 90
    """Stored frame height in pixels (area-filtered resize)."""
    frame_width: int = 160
    """Stored frame width in pixels."""
    encodec_bandwidth: float = 6.0
    """EnCodec 24 kHz bandwidth in kbps: 1.5/3/6/12/24 give 2/4/8/16/32 codebooks."""
    clip_model: str = "ViT-H-14"
    """open_clip model whose text tower embeds annotations (ViT-H-14: 1,024-d)."""
    clip_pretrained_tag: str | None = None
    """open_clip pretrained tag; None: the first tag open_clip lists for clip_model."""
    pretrained: bool = True
    """Use pretrained EnCodec and CLIP weights; False builds random weights (recorded)."""
    annotations_per_tr: int = 3
    """Text slots K per TR."""
    text_columns: tuple[str, ...] = TEXT_COLUMNS
    """Annotation columns joined into the embedded text."""
    mask_rule: str = "intersection"
    """'intersection': voxels valid in every subject; 'file': the --mask NIfTI."""
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    """Relative sizes of the contiguous train, val and test segments."""
    split_gap: int | None = None
    """TRs left out between splits; None: lag + 10 (the minimum a real build accepts)."""
    split_by: str = "time"
    """'time': every run is cut into contiguous train, val, test segments; 'run': whole runs go
    to a split (``split_runs``, or a seeded rule). Left out of the hash at 'time' (the old rule)."""
    split_runs: Mapping[str, tuple[str, ...]] | None = None
    """With split_by 'run': run ids per split, e.g. {train: [run-1], val: [run-2], test: [run-2]}
    (val and test may share one run, cut in time); None: shuffled with ``split_seed``."""
    split_seed: int = 0
    """Seed of the rule that assigns runs to splits when ``split_runs`` is None."""
    confounds: Mapping[str, Any] | None = None
    """fMRIPrep confounds regressed out of each subject's run before z-scoring, through nilearn's
    ``load_confounds``: ``{strategy: [motion, high_pass, compcor], motion: basic, ...}``
    (load_confounds' options; volume-dropping strategies refused). None: none (not hashed)."""
    audio_segment_s: float = 30.0
    """EnCodec encodes the audio in segments of this length (with 1 s of left context)."""
    device: str = field(default="cpu", metadata={"hashed": False})
    """Torch device for EnCodec and CLIP ('cpu', 'cuda'); not part of the settings hash."""
    max_dropped_fraction: float = field(default=MAX_DROPPED_FRACTION, metadata={"hashed": False})
    """Stop when more than this fraction of annotation rows would be dropped (no start or end
    time); the dropped rows are named and recorded either way. Not part of the settings hash."""

    def __post_init__(self) -> None:
        problems = []
        if self.tr is not None and not self.tr > 0:
            problems.append(f"tr must be > 0, got {self.tr}")
        if self.lag < 0:
            problems.append(f"lag must be >= 0, got {self.lag}")
        if self.frame_skip < 1:
            problems.append(f"frame_skip must be >= 1, got {self.frame_skip}")
        if self.frames_per_tr is not None and self.frames_per_tr < 1:
            problems.append(f"frames_per_tr must be >= 1 or null, got {self.frames_per_tr}")
        if self.frame_height < 1 or self.frame_width < 1:
            problems.append(
                f"frame_height and frame_width must be >= 1, got {self.frame_height}x"
                f"{self.frame_width}"
            )
        if float(self.encodec_bandwidth) not in ENCODEC_BANDWIDTHS:
            problems.append(
                f"encodec_bandwidth must be one of {ENCODEC_BANDWIDTHS}, got {self.encodec_bandwidth}"
            )
        if self.annotations_per_tr < 1:
            problems.append(f"annotations_per_tr must be >= 1, got {self.annotations_per_tr}")
        if not self.text_columns:
            problems.append("text_columns must name at least one column")
        if self.mask_rule not in MASK_RULES:
            problems.append(f"mask_rule must be one of {MASK_RULES}, got {self.mask_rule!r}")
        if len(self.split_fractions) != 3 or any(f <= 0 for f in self.split_fractions):
            problems.append(
                f"split_fractions must be three positive numbers, got {self.split_fractions}"
            )
        minimum = min_real_gap(self.lag)
        if self.split_gap is not None and self.split_gap < minimum:
            problems.append(
                f"split_gap must be >= lag + 10 = {minimum} TRs (HRF leakage), got {self.split_gap}"
            )
        if self.split_by not in SPLIT_BY:
            problems.append(f"split_by must be one of {SPLIT_BY}, got {self.split_by!r}")
        if self.split_runs is not None and self.split_by != "run":
            problems.append("split_runs needs split_by: run")
        problems += check_confounds(self.confounds)
        if not self.audio_segment_s > 0:
            problems.append(f"audio_segment_s must be > 0, got {self.audio_segment_s}")
        if not 0 <= self.max_dropped_fraction <= 1:
            problems.append(
                f"max_dropped_fraction must be in [0, 1], got {self.max_dropped_fraction}"
            )
        if problems:
            raise ConfigError("invalid build settings:\n  " + "\n  ".join(problems))

    @property
    def gap(self) -> int:
        """The split gap in effect."""
        return self.split_gap if self.split_gap is not None else min_real_gap(self.lag)

    def hashed(self) -> dict[str, Any]:
        """The settings that determine the store's content, as plain JSON values (``tr`` None
        counts as ``DEFAULT_TR``: the value such a build uses, so hashes match earlier stores)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("hashed", True):
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        out["split_gap"] = self.gap
        out["tr"] = self.tr if self.tr is not None else DEFAULT_TR
        if self.confounds is None:
            out.pop("confounds")
        else:
            out["confounds"] = {
                k: list(v) if isinstance(v, tuple) else v for k, v in sorted(self.confounds.items())
            }
        # Split-by-run keys only count when used: a split by time hashes as before they existed.
        if self.split_by == "time":
            for key in ("split_by", "split_runs", "split_seed"):
                out.pop(key)
        elif self.split_runs is not None:
            out["split_runs"] = {k: list(v) for k, v in sorted(self.split_runs.items())}
            out.pop("split_seed")
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "settings") -> BuildSettings:
        """Settings from a mapping; unknown keys are rejected with the list of valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"{source}: unknown build setting(s) {unknown}; valid keys: {names}")
        clean = dict(values)
        for key in ("text_columns", "split_fractions"):
            if key in clean and clean[key] is not None:
                clean[key] = tuple(clean[key])
        if isinstance(clean.get("split_runs"), Mapping):
            clean["split_runs"] = {
                str(k): tuple(str(r) for r in (v if isinstance(v, list | tuple) else [v]))
                for k, v in clean["split_runs"].items()
            }
        return cls(**clean)


def load_settings_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a settings YAML file (validated by ``BuildSettings.from_mapping``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"settings file {path} not found")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "save it as UTF-8"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of build settings, got {type(data).__name__}"
        )
    return data
