"""The markdown table of bench/gpu_check.py's JSON report."""

from __future__ import annotations

import re
from typing import Any

GIB = 2**30


def _num(value: Any, fmt: str = ".3g", scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return format(value * scale, fmt)


_ERROR = re.compile(r"Error\b|error:|Exception\b")


def _stage_line(stage: dict[str, Any]) -> str:
    note = stage.get("error") or stage.get("reason") or ""
    lines = (stage.get("stderr_tail") or "").strip().splitlines()
    # the exception's own line says more than whatever the process printed after it
    tail = [line for line in lines if _ERROR.search(line)][-1:] or lines[-1:]
    if stage["status"] == "failed" and tail:
        note += f" (stderr: {tail[0].strip()[:200]})"
    return f"| {stage['name']} | {stage['status']} | {stage['seconds']:.1f} | {note} |"


def markdown(report: dict[str, Any]) -> str:
    """Environment, the ceilings, one row per training run, then every stage's status."""
    stages = {s["name"]: s for s in report["stages"]}
    env = stages.get("environment", {}).get("result") or {}
    bw = stages.get("bandwidth", {}).get("result") or {}
    lines = [f"# gpu_check ({report['mode']} mode, {report['config']}), {report['started']}", ""]
    if env:
        device = env.get("device", "?")
        if env.get("gpu_memory_gib"):
            device += f" ({env['gpu_memory_gib']:.1f} GiB)"
        lines.append(
            f"{device}; driver {env.get('driver') or '-'}, CUDA {env.get('torch_cuda_build') or '-'}, "
            f"torch {env.get('torch')}, DeepSpeed {env.get('deepspeed')}, NCCL "
            f"{env.get('nccl') or '-'}, Python {env.get('python')}, {env.get('cpu_count')} CPUs"
        )
    if bw:
        lines.append(
            f"copy bandwidth {bw['bandwidth_bytes_per_s'] / 1e12:.3f} TB/s (read + write of "
            f"{bw['copy_bytes'] / GIB:.2f} GiB); {bw['matmul_dtype']} {bw['matmul_n']}^3 matmul "
            f"{bw['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s"
        )
    lines.append(f"floor per step: {report['floor_formula']}, w = {report['weight_bytes']}")
    lines += [
        "",
        "| run | ZeRO | act. ckpt | steps | median s/step | samples/s | MFU | MFU vs matmul "
        "| peak alloc GiB | peak reserved GiB | predicted GiB | peak RSS GB | floor s | measured/floor |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stage in report["stages"]:
        if not stage["name"].startswith("train_"):
            continue
        r = {**stage.get("plan", {}), **(stage.get("result") or {})}
        peaks = r.get("peaks") or {}
        lines.append(
            f"| {stage['name']} ({stage['status']}) | {r.get('zero_stage', '-')} "
            f"| {'on' if r.get('activation_checkpointing') else 'off'} "
            f"| {r.get('train_records', '-')}/{r.get('steps', '-')} "
            f"| {_num(r.get('median_step_s'), '.4f')} | {_num(r.get('samples_per_s'), '.2f')} "
            f"| {_num(r.get('mfu'), '.3g')} | {_num(r.get('mfu_vs_measured_matmul'), '.3g')} "
            f"| {_num(peaks.get('gpu_peak_allocated_gb'), '.4g', 1e9 / GIB)} "
            f"| {_num(peaks.get('gpu_peak_reserved_gb'), '.4g', 1e9 / GIB)} "
            f"| {_num(r.get('predicted_bytes'), '.4g', 1 / GIB)} "
            f"| {_num(peaks.get('rss_peak_gb'), '.3g')} "
            f"| {_num(r.get('floor_s'), '.4g')} | {_num(r.get('measured_over_floor'), '.3g')} |"
        )
    ckpt = stages.get("checkpoint", {}).get("result")
    if ckpt:
        lines += ["", f"checkpoint: {ckpt['bytes'] / 1e9:.3g} GB in {ckpt['tag']}, saved in "
                  f"{_num(ckpt.get('save_s'), '.1f')} s; {ckpt['place']}"]  # fmt: skip
    lines += ["", "| stage | status | seconds | note |", "| --- | --- | --- | --- |"]
    lines += [_stage_line(s) for s in report["stages"]]
    lines += ["", f"all stages ok: {report['ok']}; wall {report['wall_s']} s", ""]
    return "\n".join(lines)
