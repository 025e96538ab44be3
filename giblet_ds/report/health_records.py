"""Health sections computed from a run's metric records: status, progress, losses, fMRI r,
numerics, throughput and devices."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

from giblet_ds.report import markdown as fmt
from giblet_ds.report.health_checks import Check, Level, Thresholds
from giblet_ds.run.records import RunRecords, StartRecord, as_float

__all__ = [
    "devices",
    "epoch_table",
    "fmri_check",
    "loss_checks",
    "progress",
    "run_status",
    "skip_checks",
    "terms_table",
    "throughput",
]


def run_status(rec: RunRecords, now: float, th: Thresholds) -> tuple[str, str]:
    if rec.end and rec.last is rec.end[-1]:
        end = rec.end[-1]
        statuses = {
            "finished": "finished",
            "early_stopped": "early-stopped",
            "preempted": "preempted",
        }
        status = statuses.get(str(end.status), "crashed")
        return status, str(end.reason)
    step_time = fmt.median([as_float(r.step_time_s) for r in rec.train[-50:]])
    stale = th.stale_after_s or max(900.0, 20 * step_time if math.isfinite(step_time) else 0.0)
    mtimes = [p.stat().st_mtime for p in (rec.run.metrics, rec.run.log) if p.is_file()]
    last = max([t for t in [rec.last_time or math.nan, *mtimes] if math.isfinite(t)], default=0.0)
    silent = now - last
    if silent > stale:
        return "crashed", (
            f"no end record and nothing written for {fmt.duration(silent)} (> {fmt.duration(stale)}): "
            "the processes died (killed, OOM, node failure)"
        )
    return "running", f"last record {fmt.duration(silent)} ago"


def progress(rec: RunRecords, status: str, now: float) -> tuple[list[str], dict[str, Any]]:
    start = rec.start[-1] if rec.start else StartRecord()
    max_steps, spe = fmt.to_int(start.max_steps), fmt.to_int(start.steps_per_epoch)
    step = max([fmt.to_int(r.step) for r in rec.train + rec.val + rec.skip + rec.end] or [0])
    epoch = max([fmt.to_int(r.epoch) for r in rec.train + rec.val] or [0])
    step_time = fmt.median([as_float(r.step_time_s) for r in rec.train[-50:]])
    first = as_float(rec.start[0].time) if rec.start else math.nan
    elapsed = (rec.last_time or math.nan) - first
    epochs = (max_steps + spe - 1) // spe if spe else 0
    lines = [f"- **Step**: {step:,} / {max_steps:,}" + (f" ({100 * step / max_steps:.1f}%)" if max_steps else "")]  # fmt: skip
    if spe:
        lines.append(f"- **Epoch**: {epoch + 1} / {epochs} ({spe} optimizer steps per epoch)")
    lines.append(f"- **Wall time so far**: {fmt.duration(elapsed)}")
    if status == "running" and max_steps and math.isfinite(step_time):
        eta = (max_steps - step) * step_time
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(now + eta))
        lines.append(
            f"- **ETA**: {fmt.duration(eta)} of training steps (~{when}; validation extra)"
        )
    if len(rec.start) > 1:
        lines.append(f"- **Restarts**: resumed {len(rec.start) - 1} time(s)")
    cfg = rec.config
    optim, data = cfg.get("optim", {}), cfg.get("data", {})
    ws = start.world_size or "?"
    lines.append(
        f"- **Setup**: {ws} rank(s) on {start.device or '?'}; micro batch "
        f"{optim.get('micro_batch_size', '?')} x accumulation {optim.get('grad_accum_steps', '?')}"
        f" x {ws} ranks; lr {optim.get('lr', '?')}; store `{data.get('store', start.store or '?')}`"
    )
    return lines, {"step": step, "max_steps": max_steps, "step_time": step_time}


# ---------------------------------------------------------------------------------------------
# losses


def epoch_table(rec: RunRecords) -> list[str]:
    epochs = sorted({fmt.to_int(r.epoch) for r in rec.train + rec.val})
    rows = []
    for e in epochs:
        tr = [r for r in rec.train if fmt.to_int(r.epoch) == e]
        va = [r for r in rec.val if fmt.to_int(r.epoch) == e]
        v = va[-1] if va else None
        rows.append([
            str(e + 1),
            str(len(tr)),
            fmt.num(fmt.mean([as_float(r.loss) for r in tr])),
            fmt.num(as_float(v.loss)) if v else "-",
            fmt.num(as_float(v.fmri_r_mean)) if v else "-",
            fmt.num(as_float(v.fmri_r_median)) if v else "-",
            fmt.num(as_float(v.fmri_r_reliable)) if v else "-",
            fmt.num(as_float(tr[-1].lr), ".2e") if tr else "-",
            fmt.num(fmt.median([as_float(r.samples_per_s) for r in tr]), ".1f") if tr else "-",
        ])  # fmt: skip
    header = ["Epoch", "Steps logged", "Train loss (mean)", "Val loss", "fMRI r (mean)",
              "fMRI r (median)", "fMRI r (reliable voxels)", "LR (last)", "Samples/s"]  # fmt: skip
    return fmt.table(header, rows) if rows else ["No training step logged yet."]


def terms_table(rec: RunRecords) -> list[str]:
    last_train = rec.train[-20:]
    last_val = rec.val[-1] if rec.val else None
    names = sorted({k for r in last_train for k in (r.terms or {})}
                   | set(last_val.terms if last_val else {}))  # fmt: skip
    if not names:
        return []
    rows = []
    for n in names:
        tr = fmt.mean([as_float(r.terms.get(n)) for r in last_train])
        va = as_float(last_val.terms.get(n)) if last_val else math.nan
        rows.append([n, fmt.num(tr), fmt.num(va)])
    return [
        "",
        "Per-modality terms (each normalized so that predicting the training mean reads 1.0; "
        "train: mean of the last 20 logged steps, val: last validation):",
        "",
        *fmt.table(["Term", "Train", "Val"], rows),
    ]


def loss_checks(rec: RunRecords, th: Thresholds) -> list[Check]:
    checks = []
    vals = [as_float(r.loss) for r in rec.val]
    trains = fmt.finite([as_float(r.loss) for r in rec.train])
    if len(vals) >= 2 and math.isfinite(vals[0]):
        best = min(fmt.finite(vals), default=math.nan)
        gain = (vals[0] - best) / abs(vals[0]) if vals[0] else 0.0
        if gain < th.min_improvement:
            checks.append(Check("Loss", "warn", f"validation loss flat: first {vals[0]:.4f}, best "
                                f"{best:.4f} ({100 * gain:.2f}% better) over {len(vals)} validations"))  # fmt: skip
        else:
            checks.append(Check("Loss", "ok", f"validation loss {vals[0]:.4f} -> best {best:.4f} "
                                f"({100 * gain:.1f}% lower)"))  # fmt: skip
    elif len(trains) >= 10:
        k = max(1, len(trains) // 10)
        first, last = fmt.mean(trains[:k]), fmt.mean(trains[-k:])
        gain = (first - last) / abs(first) if first else 0.0
        level: Level = "warn" if gain < th.min_improvement else "ok"
        checks.append(Check("Loss", level, f"train loss {first:.4f} -> {last:.4f} "
                            f"({100 * gain:.1f}% lower; fewer than 2 validations)"))  # fmt: skip
    else:
        checks.append(Check("Loss", "info", "too few records to judge the loss trend"))
    if rec.val:
        final = rec.val[-1]
        fmri = as_float((final.terms or {}).get("fmri"))
        constant = as_float(final.fmri_constant_term)
        # Held-out TRs drift from the training mean: the constant itself scores above 1.0 there,
        # so the fMRI term is judged against the constant's score on the same TRs.
        if math.isfinite(fmri) and math.isfinite(constant):
            if fmri >= constant:
                checks.append(Check("Loss", "warn", f"val fMRI term {fmri:.4f}: no better than "
                                    f"the training-mean constant on the same TRs ({constant:.4f})"))  # fmt: skip
            else:
                checks.append(Check("Loss", "ok", f"val fMRI term {fmri:.4f} below the "
                                    f"training-mean constant's {constant:.4f} on the same TRs"))  # fmt: skip
        elif math.isfinite(fmri):
            checks.append(Check("Loss", "info", f"val fMRI term {fmri:.4f}; the constant's score "
                                "on the validation TRs was not logged (older run)"))  # fmt: skip
    return checks


def fmri_check(rec: RunRecords, th: Thresholds) -> Check:
    if not rec.val:
        return Check("fMRI correlation", "warn", "no validation yet: fMRI r unknown")
    last = rec.val[-1]
    r = as_float(last.fmri_r_mean)
    best = max(fmt.finite([as_float(v.fmri_r_mean) for v in rec.val]), default=math.nan)
    if not math.isfinite(r):
        return Check("fMRI correlation", "fail", f"fMRI r is {last.fmri_r_mean} at step "
                     f"{last.step}")  # fmt: skip
    note = (f"mean per-voxel r {r:.4f} at step {last.step} (best {best:.4f}); median "
            f"{fmt.num(as_float(last.fmri_r_median))}")  # fmt: skip
    reliable = as_float(last.fmri_r_reliable)
    if math.isfinite(reliable):
        note += f"; reliable voxels ({last.fmri_n_reliable or '?'}) r {reliable:.4f}"
    ceiling = as_float(last.fmri_noise_ceiling_r)
    normalized = as_float(last.fmri_r_normalized)
    if math.isfinite(ceiling) and math.isfinite(normalized):
        note += (f", ceiling there {ceiling:.4f} (Spearman-Brown, subject mean), "
                 f"normalized r {normalized:.3f}")  # fmt: skip
    if abs(r) < th.r_near_zero and not best >= th.r_near_zero:
        return Check("fMRI correlation", "warn", f"near zero: {note}. The model does not predict "
                     "held-out fMRI yet; do not wait it out: check the fMRI lag, the loss weights "
                     "and the fMRI term above")  # fmt: skip
    if abs(r) < th.r_near_zero:
        return Check("fMRI correlation", "warn", f"fell back near zero: {note}")
    return Check("fMRI correlation", "ok", note)


def skip_checks(rec: RunRecords) -> tuple[list[str], list[Check]]:
    skipped = int(max([as_float(r.skipped_steps) for r in rec.train] + [0.0, len(rec.skip)]))
    nonfinite_loss = [r for r in rec.train if not math.isfinite(as_float(r.loss))]
    lines, checks = [], []
    if rec.skip:
        shown = ", ".join(f"{r.step} ({'/'.join(map(str, r.terms))})"
                          for r in rec.skip[:10])  # fmt: skip
        more = f" and {len(rec.skip) - 10} more" if len(rec.skip) > 10 else ""
        lines.append(f"- Skipped steps (non-finite loss or gradient): {shown}{more}")
        checks.append(Check("Numerics", "warn", f"{skipped} skipped step(s), first at step "
                            f"{rec.skip[0].step}"))  # fmt: skip
    if nonfinite_loss:
        checks.append(Check("Numerics", "fail", f"{len(nonfinite_loss)} logged step(s) with a "
                            f"non-finite loss, first at step {nonfinite_loss[0].step}"))  # fmt: skip
    if not checks:
        checks.append(Check("Numerics", "ok", "no NaN/Inf and no skipped steps"))
    return lines, checks


# ---------------------------------------------------------------------------------------------
# throughput and devices


def throughput(rec: RunRecords) -> list[str]:
    recent = rec.train[-50:]
    if not recent:
        return ["No training step logged yet."]
    st = fmt.median([as_float(r.step_time_s) for r in recent])
    sps = fmt.median([as_float(r.samples_per_s) for r in recent])
    mfu = fmt.median([as_float(r.mfu) for r in recent])
    mem = [r.memory or {} for r in rec.train]
    rss = max(fmt.finite([as_float(m.get("rss_gb")) for m in mem]), default=math.nan)
    gpu = max(fmt.finite([as_float(m.get("gpu_max_allocated_gb")) for m in mem]), default=math.nan)
    lines = [
        f"- **Time per step**: {fmt.num(st, '.3f')} s (median of the last {len(recent)} logged steps)",
        f"- **Samples/s**: {fmt.num(sps, '.2f')}",
        f"- **MFU**: {fmt.num(100 * mfu, '.1f')}%" if math.isfinite(mfu) else "- **MFU**: - (device peak unknown)",
        f"- **Host RSS (rank 0, max)**: {fmt.num(rss, '.2f')} GB",
    ]  # fmt: skip
    if math.isfinite(gpu):
        lines.append(f"- **GPU memory allocated (rank 0, max)**: {gpu:.2f} GB")
    return lines


def devices(rec: RunRecords, th: Thresholds) -> tuple[list[str], list[Check]]:
    with_devices = [r for r in rec.train if r.devices]
    if not with_devices:
        return ["No device readings logged."], [Check("Devices", "info", "no device readings")]
    last = with_devices[-1].devices
    history = [d for r in with_devices[-100:] for d in r.devices]
    lines, checks = ["```"], []
    for d in last:
        idx = d.get("index")
        used, total = as_float(d.get("mem_used_gb")), as_float(d.get("mem_total_gb"))
        frac = used / total if total else math.nan
        if idx == "cpu" or "cpu_pct" in d:
            lines.append(f"CPU: {fmt.num(as_float(d.get('cpu_pct')), '.0f')}% busy, RAM "
                         f"{fmt.num(used, '.1f')} GB / {fmt.num(total, '.1f')} GB ({fmt.num(100 * frac, '.1f')}%)")  # fmt: skip
        else:
            temp = as_float(d.get("temp_c"))
            lines.append(f"GPU {idx}: {fmt.num(as_float(d.get('util_pct')), '.0f')}% util, "
                         f"{fmt.num(used, '.1f')} GB / {fmt.num(total, '.1f')} GB ({fmt.num(100 * frac, '.1f')}%)"
                         + (f" | Temp: {temp:.0f}°C" if math.isfinite(temp) else ""))  # fmt: skip
    lines.append("```")
    temps = fmt.finite([as_float(d.get("temp_c")) for d in history])
    fracs = fmt.finite([as_float(d.get("mem_used_gb")) / as_float(d.get("mem_total_gb"))
                     for d in history if as_float(d.get("mem_total_gb"))])  # fmt: skip
    utils = fmt.finite([as_float(d.get("util_pct")) for d in history])
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
