"""The training health report: what a person used to write by hand, computed from the run directory.

Reads RUN_DIR/metrics.jsonl, config.resolved.yaml, checkpoints/ and the store named in the config,
and writes markdown: status, progress and ETA, a loss table per epoch, throughput, device health,
normalization status, parameter counts, checkpoints, a weight audit of the newest checkpoint, and
warnings. It is honest by construction: the verdict is HEALTHY only when no check warns, and a
near-zero fMRI r or a flat loss always warns, whatever the epoch.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from giblet_ds.checkpoint_tools.run_records import RunRecords, as_float, read_metrics
from giblet_ds.errors import GibletError

__all__ = ["Check", "HealthReport", "build_health_report", "Thresholds"]

Level = Literal["ok", "info", "warn", "fail"]
_ICON = {"ok": "✅ OK", "info": "ℹ️ INFO", "warn": "⚠️ WARN", "fail": "❌ FAIL"}
_RANK = {"ok": 0, "info": 0, "warn": 1, "fail": 2}


@dataclass(frozen=True)
class Thresholds:
    """Where the report starts to warn."""

    r_near_zero: float = 0.02  # |mean per-voxel r| below this: the model predicts no signal
    min_improvement: float = 0.01  # relative loss decrease below this over the run: flat
    stale_after_s: float | None = None  # silence before a running run counts as crashed
    hot_c: float = 85.0
    mem_full: float = 0.97
    low_util_pct: float = 50.0


@dataclass
class Check:
    component: str
    level: Level
    note: str


@dataclass
class HealthReport:
    run_dir: Path
    status: str  # running | finished | early-stopped | crashed
    checks: list[Check] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)  # markdown sections in order

    @property
    def verdict(self) -> str:
        worst = max((_RANK[c.level] for c in self.checks), default=0)
        return ("HEALTHY", "NEEDS ATTENTION", "UNHEALTHY")[worst]

    def markdown(self) -> str:
        return "\n".join(self.blocks).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# helpers


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _median(values: Sequence[float]) -> float:
    vals = _finite(values)
    return statistics.median(vals) if vals else math.nan


def _mean(values: Sequence[float]) -> float:
    vals = _finite(values)
    return statistics.fmean(vals) if vals else math.nan


def _num(x: float, fmt: str = ".4f") -> str:
    return "-" if not math.isfinite(x) else format(x, fmt)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _int(value: Any) -> int:
    x = as_float(value)
    return int(x) if math.isfinite(x) else 0


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.2f} TB"


# ---------------------------------------------------------------------------------------------
# status and progress


def _status(rec: RunRecords, now: float, th: Thresholds) -> tuple[str, str]:
    if rec.end and rec.last is rec.end[-1]:
        end = rec.end[-1]
        status = {"finished": "finished", "early_stopped": "early-stopped"}.get(
            str(end.get("status")), "crashed"
        )
        return status, str(end.get("reason", ""))
    step_time = _median([as_float(r.get("step_time_s")) for r in rec.train[-50:]])
    stale = th.stale_after_s or max(900.0, 20 * step_time if math.isfinite(step_time) else 0.0)
    mtimes = [p.stat().st_mtime for p in (rec.run_dir / "metrics.jsonl", rec.run_dir / "train.log")
              if p.is_file()]  # fmt: skip
    last = max([t for t in [rec.last_time or math.nan, *mtimes] if math.isfinite(t)], default=0.0)
    silent = now - last
    if silent > stale:
        return "crashed", (
            f"no end record and nothing written for {_duration(silent)} (> {_duration(stale)}): "
            "the processes died (killed, OOM, node failure)"
        )
    return "running", f"last record {_duration(silent)} ago"


def _progress(rec: RunRecords, status: str, now: float) -> tuple[list[str], dict[str, Any]]:
    start = rec.start[-1] if rec.start else {}
    max_steps, spe = _int(start.get("max_steps")), _int(start.get("steps_per_epoch"))
    step = max([_int(r.get("step")) for r in rec.train + rec.val + rec.skip + rec.end] or [0])
    epoch = max([_int(r.get("epoch")) for r in rec.train + rec.val] or [0])
    step_time = _median([as_float(r.get("step_time_s")) for r in rec.train[-50:]])
    first = as_float(rec.start[0].get("time")) if rec.start else math.nan
    elapsed = (rec.last_time or math.nan) - first
    epochs = (max_steps + spe - 1) // spe if spe else 0
    lines = [f"- **Step**: {step:,} / {max_steps:,}" + (f" ({100 * step / max_steps:.1f}%)" if max_steps else "")]  # fmt: skip
    if spe:
        lines.append(f"- **Epoch**: {epoch + 1} / {epochs} ({spe} optimizer steps per epoch)")
    lines.append(f"- **Wall time so far**: {_duration(elapsed)}")
    if status == "running" and max_steps and math.isfinite(step_time):
        eta = (max_steps - step) * step_time
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(now + eta))
        lines.append(f"- **ETA**: {_duration(eta)} of training steps (~{when}; validation extra)")
    if len(rec.start) > 1:
        lines.append(f"- **Restarts**: resumed {len(rec.start) - 1} time(s)")
    cfg = rec.config
    optim, data = cfg.get("optim", {}), cfg.get("data", {})
    ws = start.get("world_size", "?")
    lines.append(
        f"- **Setup**: {ws} rank(s) on {start.get('device', '?')}; micro batch "
        f"{optim.get('micro_batch_size', '?')} x accumulation {optim.get('grad_accum_steps', '?')}"
        f" x {ws} ranks; lr {optim.get('lr', '?')}; store `{data.get('store', start.get('store', '?'))}`"
    )
    return lines, {"step": step, "max_steps": max_steps, "step_time": step_time}


# ---------------------------------------------------------------------------------------------
# losses


def _epoch_table(rec: RunRecords) -> list[str]:
    epochs = sorted({_int(r.get("epoch")) for r in rec.train + rec.val})
    rows = []
    for e in epochs:
        tr = [r for r in rec.train if _int(r.get("epoch")) == e]
        va = [r for r in rec.val if _int(r.get("epoch")) == e]
        v = va[-1] if va else {}
        rows.append([
            str(e + 1),
            str(len(tr)),
            _num(_mean([as_float(r.get("loss")) for r in tr])),
            _num(as_float(v.get("loss"))) if v else "-",
            _num(as_float(v.get("fmri_r_mean"))) if v else "-",
            _num(as_float(v.get("fmri_r_median"))) if v else "-",
            _num(as_float(v.get("fmri_r_frac_gt_0p1")), ".3f") if v else "-",
            _num(as_float(tr[-1].get("lr")), ".2e") if tr else "-",
            _num(_median([as_float(r.get("samples_per_s")) for r in tr]), ".1f") if tr else "-",
        ])  # fmt: skip
    header = ["Epoch", "Steps logged", "Train loss (mean)", "Val loss", "fMRI r (mean)",
              "fMRI r (median)", "Voxels r>0.1", "LR (last)", "Samples/s"]  # fmt: skip
    return _table(header, rows) if rows else ["No training step logged yet."]


def _terms_table(rec: RunRecords) -> list[str]:
    last_train = rec.train[-20:]
    last_val = rec.val[-1] if rec.val else {}
    names = sorted({k for r in last_train for k in (r.get("terms") or {})}
                   | set(last_val.get("terms") or {}))  # fmt: skip
    if not names:
        return []
    rows = []
    for n in names:
        tr = _mean([as_float((r.get("terms") or {}).get(n)) for r in last_train])
        va = as_float((last_val.get("terms") or {}).get(n)) if last_val else math.nan
        rows.append([n, _num(tr), _num(va)])
    return [
        "",
        "Per-modality terms (each normalized so that predicting the training mean reads 1.0; "
        "train: mean of the last 20 logged steps, val: last validation):",
        "",
        *_table(["Term", "Train", "Val"], rows),
    ]


def _loss_checks(rec: RunRecords, th: Thresholds) -> list[Check]:
    checks = []
    vals = [as_float(r.get("loss")) for r in rec.val]
    trains = _finite([as_float(r.get("loss")) for r in rec.train])
    if len(vals) >= 2 and math.isfinite(vals[0]):
        best = min(_finite(vals), default=math.nan)
        gain = (vals[0] - best) / abs(vals[0]) if vals[0] else 0.0
        if gain < th.min_improvement:
            checks.append(Check("Loss", "warn", f"validation loss flat: first {vals[0]:.4f}, best "
                                f"{best:.4f} ({100 * gain:.2f}% better) over {len(vals)} validations"))  # fmt: skip
        else:
            checks.append(Check("Loss", "ok", f"validation loss {vals[0]:.4f} -> best {best:.4f} "
                                f"({100 * gain:.1f}% lower)"))  # fmt: skip
    elif len(trains) >= 10:
        k = max(1, len(trains) // 10)
        first, last = _mean(trains[:k]), _mean(trains[-k:])
        gain = (first - last) / abs(first) if first else 0.0
        level: Level = "warn" if gain < th.min_improvement else "ok"
        checks.append(Check("Loss", level, f"train loss {first:.4f} -> {last:.4f} "
                            f"({100 * gain:.1f}% lower; fewer than 2 validations)"))  # fmt: skip
    else:
        checks.append(Check("Loss", "info", "too few records to judge the loss trend"))
    if rec.val:
        terms = rec.val[-1].get("terms") or {}
        fmri = as_float(terms.get("fmri"))
        if math.isfinite(fmri) and fmri >= 0.99:
            checks.append(Check("Loss", "warn", f"val fMRI term {fmri:.4f}: no better than "
                                "predicting the training mean (1.0)"))  # fmt: skip
    return checks


def _fmri_check(rec: RunRecords, th: Thresholds) -> Check:
    if not rec.val:
        return Check("fMRI correlation", "warn", "no validation yet: fMRI r unknown")
    last = rec.val[-1]
    r = as_float(last.get("fmri_r_mean"))
    best = max(_finite([as_float(v.get("fmri_r_mean")) for v in rec.val]), default=math.nan)
    if not math.isfinite(r):
        return Check("fMRI correlation", "fail", f"fMRI r is {last.get('fmri_r_mean')} at step "
                     f"{last.get('step')}")  # fmt: skip
    note = (f"mean per-voxel r {r:.4f} at step {last.get('step')} (best {best:.4f}); median "
            f"{_num(as_float(last.get('fmri_r_median')))}; voxels with r>0.1: "
            f"{_num(100 * as_float(last.get('fmri_r_frac_gt_0p1')), '.1f')}%")  # fmt: skip
    ceiling = as_float(last.get("fmri_noise_ceiling_r"))
    if math.isfinite(ceiling):
        note += f"; noise ceiling (leave-one-subject-out ISC) {ceiling:.4f}"
    if abs(r) < th.r_near_zero and not best >= th.r_near_zero:
        return Check("fMRI correlation", "warn", f"near zero: {note}. The model does not predict "
                     "held-out fMRI yet; do not wait it out: check the fMRI lag, the loss weights "
                     "and the fMRI term above")  # fmt: skip
    if abs(r) < th.r_near_zero:
        return Check("fMRI correlation", "warn", f"fell back near zero: {note}")
    return Check("fMRI correlation", "ok", note)


def _skip_checks(rec: RunRecords) -> tuple[list[str], list[Check]]:
    skipped = int(max([as_float(r.get("skipped_steps")) for r in rec.train] + [0.0, len(rec.skip)]))
    nonfinite_loss = [r for r in rec.train if not math.isfinite(as_float(r.get("loss")))]
    lines, checks = [], []
    if rec.skip:
        shown = ", ".join(f"{r.get('step')} ({'/'.join(map(str, r.get('terms') or []))})"
                          for r in rec.skip[:10])  # fmt: skip
        more = f" and {len(rec.skip) - 10} more" if len(rec.skip) > 10 else ""
        lines.append(f"- Skipped steps (non-finite loss or gradient): {shown}{more}")
        checks.append(Check("Numerics", "warn", f"{skipped} skipped step(s), first at step "
                            f"{rec.skip[0].get('step')}"))  # fmt: skip
    if nonfinite_loss:
        checks.append(Check("Numerics", "fail", f"{len(nonfinite_loss)} logged step(s) with a "
                            f"non-finite loss, first at step {nonfinite_loss[0].get('step')}"))  # fmt: skip
    if not checks:
        checks.append(Check("Numerics", "ok", "no NaN/Inf and no skipped steps"))
    return lines, checks


# ---------------------------------------------------------------------------------------------
# throughput and devices


def _throughput(rec: RunRecords) -> list[str]:
    recent = rec.train[-50:]
    if not recent:
        return ["No training step logged yet."]
    st = _median([as_float(r.get("step_time_s")) for r in recent])
    sps = _median([as_float(r.get("samples_per_s")) for r in recent])
    mfu = _median([as_float(r.get("mfu")) for r in recent])
    mem = [r.get("memory") or {} for r in rec.train]
    rss = max(_finite([as_float(m.get("rss_gb")) for m in mem]), default=math.nan)
    gpu = max(_finite([as_float(m.get("gpu_max_allocated_gb")) for m in mem]), default=math.nan)
    lines = [
        f"- **Time per step**: {_num(st, '.3f')} s (median of the last {len(recent)} logged steps)",
        f"- **Samples/s**: {_num(sps, '.2f')}",
        f"- **MFU**: {_num(100 * mfu, '.1f')}%" if math.isfinite(mfu) else "- **MFU**: - (device peak unknown)",
        f"- **Host RSS (rank 0, max)**: {_num(rss, '.2f')} GB",
    ]  # fmt: skip
    if math.isfinite(gpu):
        lines.append(f"- **GPU memory allocated (rank 0, max)**: {gpu:.2f} GB")
    return lines


def _devices(rec: RunRecords, th: Thresholds) -> tuple[list[str], list[Check]]:
    with_devices = [r for r in rec.train if r.get("devices")]
    if not with_devices:
        return ["No device readings logged."], [Check("Devices", "info", "no device readings")]
    last = with_devices[-1]["devices"]
    history = [d for r in with_devices[-100:] for d in r["devices"]]
    lines, checks = ["```"], []
    for d in last:
        idx = d.get("index")
        used, total = as_float(d.get("mem_used_gb")), as_float(d.get("mem_total_gb"))
        frac = used / total if total else math.nan
        if idx == "cpu" or "cpu_pct" in d:
            lines.append(f"CPU: {_num(as_float(d.get('cpu_pct')), '.0f')}% busy, RAM "
                         f"{_num(used, '.1f')} GB / {_num(total, '.1f')} GB ({_num(100 * frac, '.1f')}%)")  # fmt: skip
        else:
            temp = as_float(d.get("temp_c"))
            lines.append(f"GPU {idx}: {_num(as_float(d.get('util_pct')), '.0f')}% util, "
                         f"{_num(used, '.1f')} GB / {_num(total, '.1f')} GB ({_num(100 * frac, '.1f')}%)"
                         + (f" | Temp: {temp:.0f}°C" if math.isfinite(temp) else ""))  # fmt: skip
    lines.append("```")
    temps = _finite([as_float(d.get("temp_c")) for d in history])
    fracs = _finite([as_float(d.get("mem_used_gb")) / as_float(d.get("mem_total_gb"))
                     for d in history if as_float(d.get("mem_total_gb"))])  # fmt: skip
    utils = _finite([as_float(d.get("util_pct")) for d in history])
    if temps:
        hot = max(temps)
        checks.append(Check("Device temperature", "warn" if hot >= th.hot_c else "ok",
                            f"max {hot:.0f}°C over the last {len(with_devices[-100:])} readings"))  # fmt: skip
    if fracs:
        top = max(fracs)
        checks.append(Check("Device memory", "warn" if top >= th.mem_full else "ok",
                            f"max {100 * top:.1f}% used"))  # fmt: skip
    if utils:
        avg = statistics.fmean(utils)
        low = avg < th.low_util_pct
        checks.append(Check("GPU utilization", "warn" if low else "ok", f"mean {avg:.0f}%"
                            + (": the input pipeline or communication is the bottleneck" if low
                               else "")))  # fmt: skip
    return lines, checks


# ---------------------------------------------------------------------------------------------
# store, parameters, checkpoints, weights


def _store(rec: RunRecords) -> tuple[list[str], list[Check]]:
    start = rec.start[-1] if rec.start else {}
    path_str = (rec.config.get("data") or {}).get("store") or start.get("store")
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

        info = open_store(path)
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
    hash_ok = start.get("store_hash") in (None, info.build_hash)
    if not hash_ok:
        checks.append(Check("Data / normalization", "fail", "the store changed since the run "
                            f"started (hash {start.get('store_hash')} -> {info.build_hash})"))  # fmt: skip
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
    lines += _table(["Target", "Mean var", "Min var", "Constant elements", "Usable"], rows)
    if bad:
        checks.append(
            Check("Data / normalization", "fail", f"zero mean or non-finite variance in {bad}")
        )
    if not checks:
        checks.append(Check("Data / normalization", "ok", "training-split statistics present and "
                            "usable; store unchanged since the run started"))  # fmt: skip
    return lines, checks


def _params(rec: RunRecords) -> list[str]:
    counts = (rec.start[-1].get("param_counts") or {}) if rec.start else {}
    if not counts:
        return ["No parameter counts logged."]
    total = counts.get("total")
    rows = [[k, f"{int(v):,}"] for k, v in counts.items() if k != "total"]
    if total is not None:
        rows.append(["**total**", f"**{int(total):,}**"])
    return _table(["Module", "Parameters"], rows)


def _checkpoints(rec: RunRecords, status: str) -> tuple[list[str], Path | None, list[Check]]:
    ckpt_dir = rec.run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        return ["No checkpoints folder."], None, [Check("Checkpoints", "info", "none saved yet")]
    latest = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else None
    rows, newest, checks = [], None, []
    tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir())
    for tag in tags:
        files = [p for p in tag.rglob("*") if p.is_file()]
        complete = (tag / "complete").is_file()
        step = (tag / "complete").read_text().strip() if complete else "-"
        marks = [
            m for m, ok in (("latest", tag.name == latest), ("best", tag.name == "best")) if ok
        ]
        rows.append([f"`{tag.name}`", step, _size(sum(p.stat().st_size for p in files)),
                     str(len(files)), "yes" if complete else "**no**", ", ".join(marks)])  # fmt: skip
    if latest and (ckpt_dir / latest).is_dir():
        newest = ckpt_dir / latest
    if latest and not (ckpt_dir / latest).is_dir():
        checks.append(Check("Checkpoints", "fail", f"`latest` names {latest}, which is missing"))
    incomplete = [r[0] for r in rows if r[4] != "yes"]
    if incomplete and status != "running":  # a running run may be mid-save
        checks.append(Check("Checkpoints", "warn", f"incomplete tag(s) {', '.join(incomplete)} "
                            "(a save was interrupted; resume uses the previous complete tag)"))  # fmt: skip
    if not checks:
        checks.append(Check("Checkpoints", "ok" if newest else "info",
                            f"{len(tags)} tag(s); latest {latest or 'none'}"))  # fmt: skip
    table = _table(["Tag", "Step", "Size", "Files", "Complete", ""], rows) if rows else ["None."]
    return table, newest, checks


def _weights(tag_dir: Path | None, moments: bool) -> tuple[list[str], list[Check]]:
    if tag_dir is None:
        return ["No complete checkpoint to audit."], []
    from giblet_ds.checkpoint_tools.audit import audit_path

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


# ---------------------------------------------------------------------------------------------
# assembly


def build_health_report(
    run_dir: str | Path,
    *,
    now: float | None = None,
    audit: bool = True,
    audit_moments: bool = False,
    thresholds: Thresholds | None = None,
) -> HealthReport:
    """Everything in the module docstring. Raises CheckpointError when RUN_DIR is no run."""
    th = thresholds or Thresholds()
    now = time.time() if now is None else now
    rec = read_metrics(run_dir)
    status, reason = _status(rec, now, th)
    report = HealthReport(rec.run_dir, status)
    progress, _ = _progress(rec, status, now)
    skip_lines, checks = _skip_checks(rec)
    checks = _loss_checks(rec, th) + [_fmri_check(rec, th)] + checks
    if status == "crashed":
        checks.insert(0, Check("Run", "fail", f"crashed: {reason}"))
    elif status == "running":
        checks.insert(0, Check("Run", "ok", f"running: {reason}"))
    else:
        checks.insert(0, Check("Run", "ok", f"{status}: {reason}"))
    dev_lines, dev_checks = _devices(rec, th)
    store_lines, store_checks = _store(rec)
    ckpt_lines, newest, ckpt_checks = _checkpoints(rec, status)
    weight_lines, weight_checks = _weights(newest, audit_moments) if audit else (["Skipped."], [])
    report.checks = checks + dev_checks + store_checks + ckpt_checks + weight_checks
    if rec.bad_lines:
        report.checks.append(Check("Run", "info", f"unreadable metrics.jsonl line(s) {rec.bad_lines} "
                                   "skipped (a write cut short)"))  # fmt: skip

    b = report.blocks
    name = rec.run_dir.resolve().name
    b += [f"# Training health report: `{name}`", "",
          f"Generated {time.strftime('%Y-%m-%d %H:%M', time.localtime(now))} from `{rec.run_dir}`.", "",
          f"## Status: {status.upper()} — {report.verdict}", "", f"{reason}", "",
          "### Progress", "", *progress, "",
          "### Loss per epoch", "", *_epoch_table(rec), *_terms_table(rec), "",
          "### Throughput", "", *_throughput(rec), "",
          "### Device health", "", *dev_lines, "",
          "### Normalization status", "", *store_lines, "",
          "### Model", "", *_params(rec), "",
          "### Checkpoints", "", *ckpt_lines, "",
          "### Weight audit (newest checkpoint)", "", *weight_lines, ""]  # fmt: skip
    warn = [c for c in report.checks if c.level in ("warn", "fail")]
    b += ["### Warnings", ""]
    b += [f"- {_ICON[c.level]} **{c.component}**: {c.note}" for c in warn] or ["None."]
    b += skip_lines + [""]
    b += ["### Health summary", ""]
    b += _table(["Component", "Status", "Notes"],
                [[c.component, _ICON[c.level], c.note.replace("|", "/")] for c in report.checks])  # fmt: skip
    b += ["", f"**Overall**: {report.verdict} ({status})", ""]
    return report
