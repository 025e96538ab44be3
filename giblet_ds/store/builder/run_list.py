"""``--runs runs.yaml``: runs listed by hand, for data that is not in BIDS.

    runs:
      - id: run-1                      # unique; the /runs table's run id
        video: stimuli/part1.m4v       # paths relative to this file
        annotations: stimuli/part1.xlsx   # optional (no sheet: empty text slots)
        fmri: {sub-01: nii/s1_r1.nii.gz, sub-02: nii/s2_r1.nii.gz}

Unknown keys are refused with the valid ones; every run must list the same subjects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from giblet_ds.errors import StoreError
from giblet_ds.store.builder.inputs import RunInputs

__all__ = ["read_runs_yaml"]

_KEYS = ("id", "video", "annotations", "fmri")


def read_runs_yaml(path: str | Path) -> tuple[RunInputs, ...]:
    """The runs a runs.yaml lists, in its order; StoreError naming the file and the run."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise StoreError(path, "runs file not found", dataset="--runs")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise StoreError(path, f"not a readable YAML file: {err}", dataset="--runs") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or not data["runs"]:
        raise StoreError(path, "expected a mapping with a non-empty list `runs`", dataset="--runs")
    return tuple(_run(path, i, entry) for i, entry in enumerate(data["runs"]))


def _run(path: Path, index: int, entry: Any) -> RunInputs:
    where = f"runs[{index}]"
    if not isinstance(entry, dict):
        raise StoreError(path, f"{where}: expected a mapping of {list(_KEYS)}", dataset="--runs")
    unknown = sorted(set(entry) - set(_KEYS))
    if unknown:
        raise StoreError(
            path, f"{where}: unknown key(s) {unknown}; valid keys: {list(_KEYS)}", dataset="--runs"
        )
    missing = [k for k in ("id", "video", "fmri") if not entry.get(k)]
    if missing:
        raise StoreError(path, f"{where}: missing {missing}", dataset="--runs")
    fmri = entry["fmri"]
    if not isinstance(fmri, dict) or not fmri:
        raise StoreError(
            path, f"{where} ({entry['id']}): fmri must map subject id -> NIfTI", dataset="--runs"
        )
    base = path.parent

    def resolve(value: Any) -> Path:
        candidate = Path(str(value)).expanduser()
        return candidate if candidate.is_absolute() else base / candidate

    return RunInputs(
        run_id=str(entry["id"]),
        video=resolve(entry["video"]),
        annotations=resolve(entry["annotations"]) if entry.get("annotations") else None,
        fmri=tuple(resolve(p) for p in fmri.values()),
        subjects=tuple(str(s) for s in fmri),
    )
