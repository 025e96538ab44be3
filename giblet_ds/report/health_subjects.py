"""The health report's per-subject section: every subject's own head, so that a failing subject
cannot hide behind a good subject mean.

From the val records (``fmri_r_reliable_by_subject``, data.target=subjects): each subject's r on
the reliable voxels at the latest validation, at the validation that chose ``best``, and its
highest. From an evaluation.json with per-subject rows (tools/evaluate.py, see
giblet_ds/evaluation/subjects.py): each subject's model r, per-subject ridge r, own noise ceiling
and model r / ceiling on the evaluated split, on the reliable voxels (all voxels when there are
none).

A subject is flagged (a warning, so the verdict cannot be HEALTHY) when its r is not finite,
below ``Thresholds.r_near_zero`` (0.02: no signal), or below half the median of the subjects' r
in the same column. The rule is applied to the latest validation (the run's state now) and to the
evaluation's model r (the checkpoint that was scored).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from giblet_ds.report import markdown as fmt
from giblet_ds.report.health_checks import Check, Thresholds
from giblet_ds.report.health_evaluation import EVALUATION_FILE
from giblet_ds.run.records import RunRecords, ValRecord, as_float

__all__ = ["flag_subjects", "subjects_section"]

RULE = (
    "a subject is flagged when its r is not finite, below {near_zero} (no signal), or below half "
    "the median of the subjects' r in the same column"
)


def flag_subjects(values: dict[str, float], near_zero: float) -> dict[str, str]:
    """Subject -> why it is flagged (see the module docstring); unflagged subjects are absent."""
    finite = [v for v in values.values() if math.isfinite(v)]
    median = statistics.median(finite) if finite else math.nan
    flags = {}
    for subject, r in values.items():
        if not math.isfinite(r):
            flags[subject] = "not finite"
        elif r < near_zero:
            flags[subject] = f"below {near_zero} (no signal)"
        elif median > 0 and r < median / 2:
            flags[subject] = f"below half the median of the subjects ({median:.4f})"
    return flags


def subjects_section(
    rec: RunRecords, evaluation: str | Path | None, th: Thresholds
) -> tuple[list[str], list[Check]]:
    """Markdown lines and checks; ([], []) for a run without subject heads and no per-subject
    evaluation (the report then has no such section)."""
    trained = (rec.config.get("data") or {}).get("target") == "subjects"
    file = Path(evaluation) if evaluation is not None else rec.run_dir / EVALUATION_FILE
    data = _read(file)
    rows = data.get("subjects") or []
    if not trained and not rows:
        return [], []
    lines = [RULE.format(near_zero=th.r_near_zero).capitalize() + ".", ""]
    val_lines, checks = _validation(rec, th) if trained else ([], [])
    lines += val_lines
    if rows:
        eval_lines, eval_checks = _evaluation(file, data, th)
        lines += eval_lines
        checks += eval_checks
    return lines, checks


def _by_subject(record: ValRecord) -> dict[str, float]:
    return {k: as_float(v) for k, v in (record.fmri_r_reliable_by_subject or {}).items()}


def _validation(rec: RunRecords, th: Thresholds) -> tuple[list[str], list[Check]]:
    scored = [v for v in rec.val if v.fmri_r_reliable_by_subject]
    if not scored:
        return ["No per-subject validation r in metrics.jsonl yet (no validation so far, or "
                "a run from before giblet-ds logged it).", ""], [
            Check("Subjects", "info", "subject heads trained; no per-subject validation r logged")
        ]  # fmt: skip
    last = scored[-1]
    best = next((v for v in reversed(scored) if v.is_best), None)
    latest = _by_subject(last)
    at_best = _by_subject(best) if best is not None else {}
    header = ["subject", f"latest (step {last.step})",
              f"at best (step {best.step})" if best is not None else "at best", "highest"]  # fmt: skip
    flags = flag_subjects(latest, th.r_near_zero)
    every = [(v.step, _by_subject(v)) for v in scored]
    table = []
    for subject, r in latest.items():
        history = [(values[subject], step) for step, values in every if subject in values]
        top = max((h for h in history if math.isfinite(h[0])), default=None)
        table.append([
            _name(subject, flags), fmt.num(r), fmt.num(at_best.get(subject, math.nan)),
            "-" if top is None else f"{fmt.num(top[0])} (step {top[1]})",
        ])  # fmt: skip
    n = last.fmri_n_reliable
    lines = [
        f"Validation r of each subject's own head against its own volumes, reliable voxels "
        f"({n:,} voxels); the subject mean's r, not these, chooses `best`:" if n else
        "Validation r of each subject's own head against its own volumes, reliable voxels; the "
        "subject mean's r, not these, chooses `best`:",
        "",
        *fmt.table(header, table),
        "",
    ]  # fmt: skip
    where = f"validation r at step {last.step}"
    return lines, _checks(latest, flags, where)


def _read(file: Path) -> dict[str, Any]:
    """An evaluation.json; {} when missing or unreadable (the evaluation section says so)."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _evaluation(file: Path, data: dict[str, Any], th: Thresholds) -> tuple[list[str], list[Check]]:
    rows: list[dict[str, Any]] = data["subjects"]
    sets = rows[0].get("sets", {})
    name = "reliable" if "reliable" in sets else "all"
    n = sets.get(name, {}).get("n_voxels")
    model = {row["subject"]: as_float(row["sets"].get(name, {}).get("model_r")) for row in rows}
    flags = flag_subjects(model, th.r_near_zero)
    table = []
    for row in rows:
        s = row["sets"].get(name, {})
        table.append([_name(row["subject"], flags),
                      *(fmt.num(as_float(s.get(key))) for key in
                        ("model_r", "ridge_r", "ceiling_r", "model_r_normalized"))])  # fmt: skip
    split = data.get("split")
    lines = [
        f"Held-out evaluation `{file}`: {split} split, {data.get('n_trs')} TRs, {name} voxels "
        f"({n:,}), prediction: {rows[0].get('prediction')}; ceiling: the subject's own:"
        if isinstance(n, int) else
        f"Held-out evaluation `{file}`: {split} split, {data.get('n_trs')} TRs, {name} voxels, "
        f"prediction: {rows[0].get('prediction')}; ceiling: the subject's own:",
        "",
        *fmt.table(["subject", "model r", "ridge r", "ceiling r", "model r / ceiling"], table),
        "",
    ]  # fmt: skip
    return lines, _checks(model, flags, f"{split} model r, {name} voxels")


def _name(subject: str, flags: dict[str, str]) -> str:
    return f"⚠️ {subject}" if subject in flags else subject


def _checks(values: dict[str, float], flags: dict[str, str], where: str) -> list[Check]:
    if flags:
        return [Check("Subjects", "warn", f"{subject}: {where} {fmt.num(values[subject])} is "
                      f"{why}") for subject, why in flags.items()]  # fmt: skip
    finite = [v for v in values.values() if math.isfinite(v)]
    return [Check("Subjects", "ok", f"{len(values)} subjects, {where} {min(finite):.4f} to "
                  f"{max(finite):.4f}; none flagged")]  # fmt: skip
