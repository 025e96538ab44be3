"""The training health report: what a person used to write by hand, computed from the run directory.

Reads the run's metric records, its config, its checkpoint tags and the store named in the config,
and writes markdown: status, progress and ETA, a loss table per epoch, throughput, device health,
normalization status, parameter counts, checkpoints, a weight audit of the newest checkpoint, and
warnings. It is honest by construction: the verdict is HEALTHY only when no check warns, and a
near-zero fMRI r or a flat loss always warns, whatever the epoch; with subject heads a failing
subject warns however good the subject mean is. The sections live in :mod:`health_records` (from
metrics), :mod:`health_disk` (from files), :mod:`health_evaluation` and :mod:`health_subjects`.
"""

from __future__ import annotations

import time
from pathlib import Path

from giblet_ds.report import health_disk as disk
from giblet_ds.report import health_records as records
from giblet_ds.report import markdown as fmt
from giblet_ds.report.health_checks import ICON, Check, HealthReport, Thresholds
from giblet_ds.report.health_evaluation import evaluation_section
from giblet_ds.report.health_subjects import subjects_section
from giblet_ds.run.records import read_metrics

__all__ = ["Check", "HealthReport", "Thresholds", "build_health_report"]


def build_health_report(
    run_dir: str | Path,
    *,
    now: float | None = None,
    audit: bool = True,
    audit_moments: bool = False,
    thresholds: Thresholds | None = None,
    evaluation: str | Path | None = None,
) -> HealthReport:
    """Everything in the module docstring. Raises CheckpointError when RUN_DIR is no run.
    ``evaluation``: an evaluation.json of tools/evaluate.py (default: RUN_DIR/evaluation/)."""
    th = thresholds or Thresholds()
    now = time.time() if now is None else now
    rec = read_metrics(run_dir)
    status, reason = records.run_status(rec, now, th)
    report = HealthReport(rec.run_dir, status)
    progress, _ = records.progress(rec, status, now)
    skip_lines, checks = records.skip_checks(rec)
    checks = records.loss_checks(rec, th) + [records.fmri_check(rec, th)] + checks
    if status == "crashed":
        checks.insert(0, Check("Run", "fail", f"crashed: {reason}"))
    elif status == "running":
        checks.insert(0, Check("Run", "ok", f"running: {reason}"))
    elif status == "preempted":
        checks.insert(0, Check("Run", "info", f"preempted: {reason}; it saved a complete tag at "
                               "the step it stopped: launch the same command to resume"))  # fmt: skip
    else:
        checks.insert(0, Check("Run", "ok", f"{status}: {reason}"))
    dev_lines, dev_checks = records.devices(rec, th)
    store_lines, store_checks = disk.store(rec)
    ckpt_lines, newest, ckpt_checks = disk.checkpoints(rec, status)
    weight_lines, weight_checks = (
        disk.weights(newest, audit_moments) if audit else (["Skipped."], [])
    )
    eval_lines, eval_checks = evaluation_section(rec.run_dir, evaluation)
    subject_lines, subject_checks = subjects_section(rec, evaluation, th)
    report.checks = [*checks, *eval_checks, *subject_checks, *dev_checks, *store_checks,
                     *ckpt_checks, *weight_checks]  # fmt: skip
    if rec.bad_lines:
        report.checks.append(Check("Run", "info", f"unreadable metrics.jsonl line(s) {rec.bad_lines} "
                                   "skipped (a write cut short)"))  # fmt: skip

    b = report.blocks
    name = rec.run_dir.resolve().name
    b += [f"# Training health report: `{name}`", "",
          f"Generated {time.strftime('%Y-%m-%d %H:%M', time.localtime(now))} from `{rec.run_dir}`.", "",
          f"## Status: {status.upper()} — {report.verdict}", "", f"{reason}", "",
          "### Progress", "", *progress, "",
          "### Loss per epoch", "", *records.epoch_table(rec), *records.terms_table(rec), "",
          "### Held-out evaluation (model, ridge, ceiling, oracle)", "", *eval_lines, "",
          *(["### Per subject (subject heads)", "", *subject_lines] if subject_lines else []),
          "### Throughput", "", *records.throughput(rec), "",
          "### Device health", "", *dev_lines, "",
          "### Normalization status", "", *store_lines, "",
          "### Model", "", *disk.params(rec), "",
          "### Checkpoints", "", *ckpt_lines, "",
          "### Weight audit (newest checkpoint)", "", *weight_lines, ""]  # fmt: skip
    warn = [c for c in report.checks if c.level in ("warn", "fail")]
    b += ["### Warnings", ""]
    b += [f"- {ICON[c.level]} **{c.component}**: {c.note}" for c in warn] or ["None."]
    b += skip_lines + [""]
    b += ["### Health summary", ""]
    b += fmt.table(["Component", "Status", "Notes"],
                [[c.component, ICON[c.level], c.note.replace("|", "/")] for c in report.checks])  # fmt: skip
    b += ["", f"**Overall**: {report.verdict} ({status})", ""]
    return report
