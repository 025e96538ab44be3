"""The health report's per-subject section on constructed metrics and evaluation files: each
subject's validation r and held-out scores, and a failing subject flagged whatever the mean says."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from giblet_ds.report.health import build_health_report
from giblet_ds.report.health_subjects import flag_subjects
from tests.test_tools_health import T0, _write_run

SUBJECTS = ("sub-01", "sub-02", "sub-03")


def _subject_run(run: Path, by_epoch: list[list[float | str]], best: tuple[bool, ...]) -> None:
    """A finished run of 3 epochs whose config trained subject heads and whose val records carry
    each subject's r (``by_epoch``), ``best``: which validation chose the checkpoint."""
    _write_run(run, train_losses=[[4.0, 3.8, 3.6, 3.4], [3.2, 3.0, 2.9, 2.7], [2.6, 2.5, 2.4, 2.3]],
               val=[(3.5, 0.05), (3.0, 0.12), (2.6, 0.2)], end="finished")  # fmt: skip
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = iter(zip(by_epoch, best, strict=True))
    for rec in lines:
        if rec["kind"] == "start":
            rec["config"]["data"]["target"] = "subjects"
        if rec["kind"] == "val":
            values, rec["is_best"] = next(vals)
            rec["fmri_r_reliable_by_subject"] = dict(zip(SUBJECTS, values, strict=True))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def _evaluation(run: Path, model: list[float], ridge: list[float]) -> None:
    def row(subject: str, m: float, r: float) -> dict[str, Any]:
        ceiling = 0.5
        cells = {"n_voxels": 120, "model_r": m, "ridge_r": r, "ceiling_r": ceiling,
                 "model_r_normalized": m / ceiling}  # fmt: skip
        return {"subject": subject, "prediction": "own head",
                "sets": {"all": {**cells, "n_voxels": 1000}, "reliable": cells}}  # fmt: skip

    sets = {"reliable": {"split": "test", "n_trs": 54, "n_voxels": 120, "model_r": 0.3,
                         "ridge_r": 0.25, "constant_term": 1.5, "model_term": 1.1}}  # fmt: skip
    (run / "evaluation").mkdir()
    (run / "evaluation" / "evaluation.json").write_text(json.dumps(
        {"split": "test", "n_trs": 54, "target": "subject mean", "checkpoint": "best",
         "sets": sets, "subjects": [row(s, m, r) for s, m, r in zip(SUBJECTS, model, ridge,
                                                                        strict=True)]}))  # fmt: skip


def _section(md: str) -> list[str]:
    start = md.index("### Per subject (subject heads)")
    return md[start : md.index("### Throughput")].splitlines()


def test_every_subject_listed_and_none_flagged(tmp_path: Path) -> None:
    run = tmp_path / "subjects"
    _subject_run(run, [[0.10, 0.12, 0.09], [0.30, 0.25, 0.22], [0.28, 0.26, 0.24]],
                 best=(True, True, False))  # fmt: skip
    _evaluation(run, model=[0.31, 0.27, 0.25], ridge=[0.27, 0.26, 0.2])
    report = build_health_report(run, now=T0 + 3600, audit=False)
    file = run / "evaluation" / "evaluation.json"
    assert _section(report.markdown()) == [
        "### Per subject (subject heads)",
        "",
        "A subject is flagged when its r is not finite, below 0.02 (no signal), or below half the "
        "median of the subjects' r in the same column.",
        "",
        "Validation r of each subject's own head against its own volumes, reliable voxels (7 "
        "voxels); the subject mean's r, not these, chooses `best`:",
        "",
        "| subject | latest (step 12) | at best (step 8) | highest |",
        "|---|---|---|---|",
        "| sub-01 | 0.2800 | 0.3000 | 0.3000 (step 8) |",
        "| sub-02 | 0.2600 | 0.2500 | 0.2600 (step 12) |",
        "| sub-03 | 0.2400 | 0.2200 | 0.2400 (step 12) |",
        "",
        f"Held-out evaluation `{file}`: test split, 54 TRs, reliable voxels (120), prediction: own "
        "head; ceiling: the subject's own:",
        "",
        "| subject | model r | ridge r | ceiling r | model r / ceiling |",
        "|---|---|---|---|---|",
        "| sub-01 | 0.3100 | 0.2700 | 0.5000 | 0.6200 |",
        "| sub-02 | 0.2700 | 0.2600 | 0.5000 | 0.5400 |",
        "| sub-03 | 0.2500 | 0.2000 | 0.5000 | 0.5000 |",
        "",
    ]
    assert [(c.level, c.note) for c in report.checks if c.component == "Subjects"] == [
        ("ok", "3 subjects, validation r at step 12 0.2400 to 0.2800; none flagged"),
        ("ok", "3 subjects, test model r, reliable voxels 0.2500 to 0.3100; none flagged"),
    ]
    assert report.verdict == "HEALTHY", report.markdown()


def test_a_failing_subject_is_a_warning_beside_a_good_mean(tmp_path: Path) -> None:
    # The subject mean's r is fine (the same records as a HEALTHY run); sub-03 learned nothing on
    # validation and sub-02's test r is not finite.
    run = tmp_path / "subjects"
    _subject_run(run, [[0.10, 0.12, 0.01], [0.30, 0.25, 0.02], [0.30, 0.28, 0.05]],
                 best=(True, True, True))  # fmt: skip
    _evaluation(run, model=[0.31, math.nan, 0.10], ridge=[0.27, 0.26, 0.2])
    report = build_health_report(run, now=T0 + 3600, audit=False)
    md = report.markdown()
    section = _section(md)
    assert "| ⚠️ sub-03 | 0.0500 | 0.0500 | 0.0500 (step 12) |" in section
    assert "| ⚠️ sub-02 | - | 0.2600 | 0.5000 | - |" in section
    # the median of the finite test r (0.31, 0.10) is 0.205: 0.10 is below half of it
    assert "| ⚠️ sub-03 | 0.1000 | 0.2000 | 0.5000 | 0.2000 |" in section
    assert "| sub-01 | 0.3100 | 0.2700 | 0.5000 | 0.6200 |" in section
    warnings = md[md.index("### Warnings") : md.index("### Health summary")].splitlines()
    assert [line for line in warnings if "**Subjects**" in line] == [
        "- ⚠️ WARN **Subjects**: sub-03: validation r at step 12 0.0500 is below half the median "
        "of the subjects (0.2800)",
        "- ⚠️ WARN **Subjects**: sub-02: test model r, reliable voxels - is not finite",
        "- ⚠️ WARN **Subjects**: sub-03: test model r, reliable voxels 0.1000 is below half the "
        "median of the subjects (0.2050)",
    ]
    assert report.verdict == "NEEDS ATTENTION"
    assert "## Status: FINISHED — NEEDS ATTENTION" in md


def test_flag_rule() -> None:
    assert flag_subjects({"a": 0.3, "b": 0.2, "c": 0.1}, 0.02) == {}  # 0.1 is half the median
    assert flag_subjects({"a": 0.3, "b": 0.2, "c": 0.099}, 0.02) == {
        "c": "below half the median of the subjects (0.2000)"
    }
    assert flag_subjects({"a": 0.01, "b": math.nan, "c": -0.2}, 0.02) == {
        "a": "below 0.02 (no signal)",
        "b": "not finite",
        "c": "below 0.02 (no signal)",
    }
    assert flag_subjects({"only": 0.3}, 0.02) == {}  # one subject is its own median


def test_a_mean_target_run_has_no_subject_section(tmp_path: Path) -> None:
    run = tmp_path / "mean"
    _write_run(run, train_losses=[[4.0, 3.8, 3.6, 3.4], [3.2, 3.0, 2.9, 2.7]],
               val=[(3.5, 0.15), (3.0, 0.2)], end="finished")  # fmt: skip
    report = build_health_report(run, now=T0 + 3600, audit=False)
    assert "### Per subject" not in report.markdown()
    assert not [c for c in report.checks if c.component == "Subjects"]


def test_subject_heads_without_logged_subject_r_say_so(tmp_path: Path) -> None:
    # A run from before the val records carried fmri_r_reliable_by_subject.
    run = tmp_path / "old"
    _write_run(run, train_losses=[[4.0, 3.8, 3.6, 3.4]], val=[(3.5, 0.15)], end="finished")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lines[0]["config"]["data"]["target"] = "subjects"
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    report = build_health_report(run, now=T0 + 3600, audit=False)
    assert (
        "No per-subject validation r in metrics.jsonl yet (no validation so far, or a run "
        "from before giblet-ds logged it)." in _section(report.markdown())
    )
    assert [(c.level, c.note) for c in report.checks if c.component == "Subjects"] == [
        ("info", "subject heads trained; no per-subject validation r logged")
    ]
