"""Health sections read from disk: the store's normalizers, parameter counts, checkpoint tags and
the weight audit of the newest one."""

from __future__ import annotations

from pathlib import Path

from giblet_ds.errors import GibletError
from giblet_ds.report import markdown as fmt
from giblet_ds.report.health_checks import Check, Level
from giblet_ds.run.layout import BEST_TAG, RunDir
from giblet_ds.run.records import RunRecords, StartRecord

__all__ = ["checkpoints", "params", "store", "weights"]


def store(rec: RunRecords) -> tuple[list[str], list[Check]]:
    start = rec.start[-1] if rec.start else StartRecord()
    path_str = (rec.config.get("data") or {}).get("store") or start.store
    if not path_str:
        return ["No store named in the config."], [
            Check("Data / normalization", "info", "no store")
        ]
    path = Path(path_str)
    if not path.is_absolute() and not path.exists():
        path = rec.run_dir / path
    if not path.is_file():
        return [f"Store `{path_str}` not found here: normalization not checked."], [
            Check("Data / normalization", "info", f"store {path_str} not available")
        ]
    try:
        from giblet_ds.store import load_target_stats, open_store
        from giblet_ds.store.run_splits import with_split_runs

        # a leave-one-run-out fold reports the splits and statistics it trained with
        split_runs = (rec.config.get("data") or {}).get("split_runs")
        info = with_split_runs(open_store(path), split_runs)
        stats = load_target_stats(path, info=info)
    except (GibletError, OSError) as exc:
        return [f"Store `{path}` unreadable: {exc}"], [
            Check("Data / normalization", "fail", f"store unreadable: {exc}")
        ]
    sizes = info.split_sizes
    lines = [
        f"- **Store**: `{path}` (schema {info.schema_version}, build hash `{info.build_hash[:12]}`)",
        f"- **TRs**: {info.n_trs:,}; splits " + ", ".join(f"{k} {v:,}" for k, v in sizes.items())
        + f"; gap {info.split_gap} TRs between splits; fMRI lag {info.lag} TRs",
        f"- **fMRI**: {info.n_voxels:,} voxels in a stored mask {info.mask_shape}, "
        f"{info.n_subjects} subject(s), z-scored per subject with training-TR statistics",
    ]  # fmt: skip
    checks = []
    hash_ok = start.store_hash in (None, info.build_hash)
    if not hash_ok:
        checks.append(Check("Data / normalization", "fail", "the store changed since the run "
                            f"started (hash {start.store_hash} -> {info.build_hash})"))  # fmt: skip
    rows, bad = [], []
    for modality, values in sorted(stats.items()):
        var = values.get("var")
        if var is not None:
            finite = bool((var == var).all()) and bool((abs(var) != float("inf")).all())
            # The loss divides by the mean over elements, so constant elements (letterbox pixels,
            # padded text slots) are fine as long as the mean is positive.
            positive = float(var.mean()) > 0
            constant = int((var == 0).sum())
            rows.append([modality, f"{float(var.mean()):.4g}", f"{float(var.min()):.4g}",
                         f"{constant:,} of {var.size:,}",
                         "yes" if finite and positive else "**no**"])  # fmt: skip
            if not (finite and positive):
                bad.append(modality)
        elif "counts" in values:
            counts = values["counts"]
            used = int((counts > 0).sum())
            rows.append([modality, f"{used:,} of {counts.size:,} codes used", "-", "-", "yes"])
    lines += ["", "Loss denominators (`/stats/<modality>/var`, training TRs only):", ""]
    lines += fmt.table(["Target", "Mean var", "Min var", "Constant elements", "Usable"], rows)
    if bad:
        checks.append(
            Check("Data / normalization", "fail", f"zero mean or non-finite variance in {bad}")
        )
    if not checks:
        checks.append(Check("Data / normalization", "ok", "training-split statistics present and "
                            "usable; store unchanged since the run started"))  # fmt: skip
    return lines, checks


def params(rec: RunRecords) -> list[str]:
    counts = rec.start[-1].param_counts if rec.start else {}
    if not counts:
        return ["No parameter counts logged."]
    total = counts.get("total")
    rows = [[k, f"{int(v):,}"] for k, v in counts.items() if k != "total"]
    if total is not None:
        rows.append(["**total**", f"**{int(total):,}**"])
    return fmt.table(["Module", "Parameters"], rows)


def checkpoints(rec: RunRecords, status: str) -> tuple[list[str], Path | None, list[Check]]:
    run = RunDir(rec.run_dir)
    if not run.checkpoints.is_dir():
        return ["No checkpoints folder."], None, [Check("Checkpoints", "info", "none saved yet")]
    latest = run.latest_tag()
    rows, newest, checks = [], None, []
    tags = run.tags()
    for tag in tags:
        files = [p for p in run.tag_dir(tag).rglob("*") if p.is_file()]
        step = run.completed_step(tag)
        complete = run.is_complete(tag)
        marks = [m for m, ok in (("latest", tag == latest), ("best", tag == BEST_TAG)) if ok]
        rows.append([f"`{tag}`", "-" if step is None else str(step),
                     fmt.size(sum(p.stat().st_size for p in files)), str(len(files)),
                     "yes" if complete else "**no**", ", ".join(marks)])  # fmt: skip
    if latest and run.tag_dir(latest).is_dir():
        newest = run.tag_dir(latest)
    if latest and not run.tag_dir(latest).is_dir():
        checks.append(Check("Checkpoints", "fail", f"`latest` names {latest}, which is missing"))
    incomplete = [r[0] for r in rows if r[4] != "yes"]
    if incomplete and status != "running":  # a running run may be mid-save
        checks.append(Check("Checkpoints", "warn", f"incomplete tag(s) {', '.join(incomplete)} "
                            "(a save was interrupted; resume uses the previous complete tag)"))  # fmt: skip
    if not checks:
        checks.append(Check("Checkpoints", "ok" if newest else "info",
                            f"{len(tags)} tag(s); latest {latest or 'none'}"))  # fmt: skip
    table = fmt.table(["Tag", "Step", "Size", "Files", "Complete", ""], rows) if rows else ["None."]
    return table, newest, checks


def weights(tag_dir: Path | None, moments: bool) -> tuple[list[str], list[Check]]:
    if tag_dir is None:
        return ["No complete checkpoint to audit."], []
    from giblet_ds.checkpoint.audit import audit_path

    try:
        report = audit_path(tag_dir, moments=moments)
    except GibletError as exc:
        return [f"Audit of `{tag_dir.name}` failed: {exc}"], [
            Check("Model weights", "fail", f"{tag_dir.name} unreadable: {exc}")
        ]
    n = sum(len(s.tensors) for s in report.sections)
    errors, warns = report.count("error"), report.count("warn")
    lines = [f"Audit of `{tag_dir.name}` ({n} tensors{', Adam moments included' if moments else ''}): "
             f"{errors} error(s), {warns} warning(s)."]  # fmt: skip
    for f in report.findings[:15]:
        lines.append(f"- {f.severity.upper()} [{f.check}] {f.message}")
    if len(report.findings) > 15:
        lines.append(f"- ... {len(report.findings) - 15} more (run tools/audit_weights.py)")
    level: Level = "fail" if errors else ("warn" if warns else "ok")
    note = "no NaN/Inf, no dead or exploding tensors" if level == "ok" else (
        f"{errors} error(s), {warns} warning(s) in {tag_dir.name}")  # fmt: skip
    return lines, [Check("Model weights", level, note)]
