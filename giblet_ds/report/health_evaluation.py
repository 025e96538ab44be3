"""The health report's evaluation section: the held-out table written by tools/evaluate.py.

Reads ``evaluation.json`` (default: ``RUN_DIR/evaluation/evaluation.json``) and judges the model's
r against the ridge baseline and the ceiling on the same TRs and voxels (the reliable voxels when
there are some, else the whole mask).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from giblet_ds.report import markdown as fmt
from giblet_ds.report.health_checks import Check

__all__ = ["EVALUATION_FILE", "evaluation_section"]

EVALUATION_FILE = Path("evaluation") / "evaluation.json"

ROWS = (
    ("model r", "model_r"),
    ("ridge r (himalaya)", "ridge_r"),
    ("oracle r (planted truth)", "oracle_r"),
    ("ceiling r (sqrt reliability)", "ceiling_r"),
    ("model r / ceiling", "model_r_normalized"),
    ("ridge r / ceiling", "ridge_r_normalized"),
    ("model EV fraction", "model_ev_fraction"),
    ("fMRI term, training-mean constant", "constant_term"),
    ("fMRI term, model", "model_term"),
    ("fMRI term, ridge", "ridge_term"),
)


def _num(value: Any) -> str:
    return "n/a" if value is None else fmt.num(float(value))


def evaluation_section(
    run_dir: Path, path: str | Path | None = None
) -> tuple[list[str], list[Check]]:
    """Markdown lines and checks; a missing file is an info line, never an error."""
    file = Path(path) if path is not None else run_dir / EVALUATION_FILE
    if not file.is_file():
        return [f"No evaluation yet (`tools/evaluate.py {run_dir} --store STORE --out "
                f"{run_dir / EVALUATION_FILE.parent}`)."], [
            Check("Evaluation", "info", "no held-out evaluation (tools/evaluate.py) found")
        ]  # fmt: skip
    try:
        data = json.loads(file.read_text())
        sets: dict[str, dict[str, Any]] = data["sets"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        return [f"`{file}` is unreadable: {exc}"], [
            Check("Evaluation", "warn", f"{file} unreadable: {exc}")
        ]
    header = ["", *(f"{name} ({s['n_voxels']:,} voxels)" for name, s in sets.items())]
    rows = []
    for label, key in ROWS:
        values = [s.get(key) for s in sets.values()]
        if any(v is not None for v in values):
            rows.append([label, *(_num(v) for v in values)])
    fracs = [s.get("frac_r_gt_0p1") for s in sets.values()]
    if any(fracs):
        rows.append(["voxels with model r > 0.1 (shift null)",
                     *("n/a" if f is None else f"{100 * f['fraction']:.1f}% (null "
                       f"{100 * f['null_mean']:.1f}%)" for f in fracs)])  # fmt: skip
    lines = [
        f"`{file}`: split **{data.get('split')}**, {data.get('n_trs')} TRs, target "
        f"{data.get('target')}, checkpoint `{data.get('checkpoint')}`. Every number in a column "
        "uses the same TRs and voxels.",
        "",
        *fmt.table(header, rows),
    ]
    why = (data.get("ceiling") or {}).get("why")
    if why:
        lines += ["", f"Ceiling: {why}."]
    fwhm = data.get("target_smoothing_fwhm_mm") or 0.0
    if fwhm:
        lines += ["", f"Training targets were smoothed at FWHM {fwhm:g} mm inside the mask "
                  "(`data.smoothing_fwhm_mm`), for the network and the ridge alike: every r and "
                  "term in this table is against the unsmoothed fMRI, while the training and "
                  "validation losses above compare against the smoothed volumes."]  # fmt: skip
    # tools/evaluate.py records when the store was not the training store (report.store_match)
    other = (data.get("store_match") or {}).get("note")
    if other:
        lines += ["", f"**Warning**: {other}."]
    return lines, ([Check("Evaluation", "warn", other)] if other else []) + _checks(sets, fwhm)


def _checks(sets: dict[str, dict[str, Any]], fwhm: float = 0.0) -> list[Check]:
    name = "reliable" if "reliable" in sets else "all"
    s = sets[name]
    model, ridge, ceiling = s.get("model_r"), s.get("ridge_r"), s.get("ceiling_r")
    where = f"{s.get('split')} split, {name} voxels ({s.get('n_voxels'):,})"
    checks = []
    if model is not None and ridge is not None and math.isfinite(ridge):
        if model < ridge:
            same = f", fitted on the same targets smoothed at {fwhm:g} mm," if fwhm else ""
            checks.append(Check("Evaluation", "warn", f"the ridge baseline on the store's inputs"
                                f"{same} beats the model: r {model:.4f} vs {ridge:.4f} ({where})"))  # fmt: skip
        else:
            checks.append(Check("Evaluation", "ok", f"model r {model:.4f} >= ridge baseline "
                                f"{ridge:.4f} ({where})"))  # fmt: skip
    if model is not None and ceiling:
        checks.append(Check("Evaluation", "info", f"model r is {model / ceiling:.1%} of the "
                            f"ceiling {ceiling:.4f} ({where})"))  # fmt: skip
    constant, term = s.get("constant_term"), s.get("model_term")
    if constant is not None and term is not None and term >= constant:
        checks.append(Check("Evaluation", "warn", f"fMRI term {term:.4f} is no better than the "
                            f"training-mean constant's {constant:.4f} on the same TRs ({where})"))  # fmt: skip
    return checks
