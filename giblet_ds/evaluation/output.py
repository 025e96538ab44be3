"""Writing an evaluation: evaluation.json, NIfTI maps in the store's mask space, a figure, the table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from giblet_ds.evaluation.evaluate import EvaluationResult
from giblet_ds.report.brain_maps import plot_brain_map, save_voxel_map
from giblet_ds.store import load_mask

__all__ = ["format_table", "write_evaluation"]

ROWS: tuple[tuple[str, str, str], ...] = (
    ("model r", "model_r", "r"),
    ("ridge r (himalaya)", "ridge_r", "r"),
    ("oracle r (planted truth)", "oracle_r", "r"),
    ("ceiling r (sqrt reliability)", "ceiling_r", "r"),
    ("model r / ceiling", "model_r_normalized", "x"),
    ("ridge r / ceiling", "ridge_r_normalized", "x"),
    ("oracle r / ceiling", "oracle_r_normalized", "x"),
    ("model EV fraction (sum r^2 / sum rel)", "model_ev_fraction", "x"),
    ("fMRI term, training-mean constant", "constant_term", "t"),
    ("fMRI term, model", "model_term", "t"),
    ("fMRI term, ridge", "ridge_term", "t"),
)


def _cell(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:+.4f}" if kind == "r" else f"{value:.4f}"


def format_table(result: EvaluationResult) -> str:
    """One table: a column per voxel set, every row on the same TRs and voxels of its column."""
    sets = list(result.sets.values())
    note = result.store_match.get("note")
    head = [f"{s.name} ({s.n_voxels:,} vox)" for s in sets]
    width = max(14, *(len(h) + 2 for h in head))
    label_w = max(len(r[0]) for r in ROWS) + 2
    lines = [
        f"{result.split} split, {result.n_trs} TRs, target: {result.target} "
        f"(every number in a column: the same TRs and voxels)",
        *([f"WARNING: {note}"] if note else []),
        "".ljust(label_w) + "".join(h.rjust(width) for h in head),
    ]
    for label, key, kind in ROWS:
        values = [getattr(s, key) for s in sets]
        if all(v is None for v in values):
            continue
        lines.append(label.ljust(label_w) + "".join(_cell(v, kind).rjust(width) for v in values))
    fracs = [s.frac_r_gt_0p1 for s in sets]
    if any(fracs):
        cells = [
            "n/a" if f is None else f"{f['fraction']:.1%} (null {f['null_mean']:.1%})"
            for f in fracs
        ]
        lines.append(
            "voxels with model r > 0.1".ljust(label_w) + "".join(c.rjust(width) for c in cells)
        )
    if result.ceiling.get("why"):
        lines.append(f"ceiling: {result.ceiling.get('kind') or 'none'}: {result.ceiling['why']}")
    if "all" in result.sets and result.sets["all"].notes:
        lines.append("all voxels: " + "; ".join(result.sets["all"].notes))
    lines.append(
        f"reliable voxels: {result.reliable['rule']} ({result.reliable['threshold']}); "
        "null: circular time shifts of the prediction"
    )
    fwhm = result.target_smoothing_fwhm_mm
    if fwhm:
        alike = " and the ridge alike" if result.ridge else ""
        lines.append(
            f"training targets smoothed at FWHM {fwhm:g} mm (data.smoothing_fwhm_mm) for the "
            f"network{alike}; every r is against the unsmoothed fMRI"
        )
    lines.extend(_member_lines(result, [s.name for s in sets], label_w, width))
    lines.extend(_subject_lines(result, [s.name for s in sets], label_w, width))
    return "\n".join(lines)


def _member_lines(
    result: EvaluationResult, names: list[str], label_w: int, width: int
) -> list[str]:
    """A seed ensemble: each member's model r beside the ensemble's, per voxel set."""
    if not result.members:
        return []
    lines = [f"seed ensemble of {len(result.members)}: model r above is their averaged prediction"]
    for i, member in enumerate(result.members, start=1):
        cells = [_cell(member["sets"].get(name), "r") for name in names]
        lines.append(f"member {i} model r".ljust(label_w) + "".join(c.rjust(width) for c in cells))
    lines.extend(f"  member {i}: {m['checkpoint']}" for i, m in enumerate(result.members, 1))
    return lines


def _subject_lines(
    result: EvaluationResult, names: list[str], label_w: int, width: int
) -> list[str]:
    """Per subject: model r, ridge r, own ceiling and model r / ceiling, per voxel set."""
    if not result.subjects:
        return []
    kind = result.subjects[0]["prediction"]
    lines = [
        f"per subject (prediction: {kind}; ceiling: the subject's own, from its r with the mean "
        "of the others corrected for their noise)"
    ]
    for row in result.subjects:
        for label, key, cell in (("model r", "model_r", "r"), ("ridge r", "ridge_r", "r"),
                                 ("ceiling r", "ceiling_r", "r"),
                                 ("model r / ceiling", "model_r_normalized", "x")):  # fmt: skip
            values = [row["sets"].get(name, {}).get(key) for name in names]
            if all(v is None for v in values):
                continue
            lines.append(
                f"{row['subject']} {label}".ljust(label_w)
                + "".join(_cell(v, cell).rjust(width) for v in values)
            )
    return lines


def write_evaluation(result: EvaluationResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``evaluation.json``, ``<map>.nii.gz`` per voxel map, ``model_r.png`` (nilearn) and
    ``table.txt`` into ``out_dir``; returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mask, affine = load_mask(result.store)
    paths: dict[str, Path] = {}
    for name, values in result.maps.items():
        paths[name] = save_voxel_map(values, mask, affine, out / f"{name}.nii.gz")
    reliable = result.sets.get("reliable")
    title = f"model r, {result.split} ({result.n_trs} TRs): mean {result.sets['all'].model_r:+.3f}"
    if reliable is not None:
        title += f", reliable voxels {reliable.model_r:+.3f}"
    paths["figure"] = plot_brain_map(paths["model_r"], out / "model_r.png", title)
    if "model_r_normalized" in paths:
        paths["figure_normalized"] = plot_brain_map(
            paths["model_r_normalized"], out / "model_r_normalized.png",
            "model r / ceiling (where the ceiling > 0.1)", label="r / ceiling",
        )  # fmt: skip
    table = format_table(result)
    paths["table"] = out / "table.txt"
    paths["table"].write_text(table + "\n")
    data = result.to_dict()
    data["files"] = {k: p.name for k, p in paths.items()}
    paths["json"] = out / "evaluation.json"
    paths["json"].write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return paths


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
