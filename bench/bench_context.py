"""Temporal context on the demo: window settings side by side in one run.

Trains the `small` preset once per setting on the same demo store (one process, ZeRO-2 fp32,
micro-batch 16 = the demo's global batch of 2 ranks x 8, so no second multi-rank job competes with
others on the shared cores), identical but for model.context_trs (k) and model.context_end, then
scores each run's best tag on the test split with tools/evaluate.py (same TRs, same voxel sets,
the same cached ridge baseline, the planted oracle). Cost: median s/step over the logged steps
after the first few, peak rank-0 RSS, and the 3.5B dry run's activation memory per GPU at each k
(giblet_ds.memory_estimate). A setting is ``K`` or ``K:END`` (END: stimulus or volume; ``K``
alone: stimulus, the window ending at TR t).

    .venv/bin/python bench/bench_context.py --store demo_out/store.h5 \
        --truth demo_out/raw/ground_truth.json --out bench_out/context \
        [--runs 1 8:stimulus 8:volume]

Writes OUT/bench_context.json and prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PY = Path(sys.executable)
SETS = ("reliable", "all")


def parse_setting(text: str) -> tuple[int, str]:
    """``"8:volume"`` -> (8, "volume"); ``"8"`` -> (8, "stimulus")."""
    k, _, end = text.partition(":")
    end = end or "stimulus"
    if not k.isdigit() or int(k) < 1 or end not in ("stimulus", "volume"):
        raise argparse.ArgumentTypeError(f"a setting is K or K:stimulus|volume, got {text!r}")
    return int(k), end


def label(k: int, end: str) -> str:
    return f"k{k}" if end == "stimulus" else f"k{k}_{end}"


def train(store: Path, run_dir: Path, k: int, end: str, extra: list[str]) -> float:
    """One training run of the small preset with context_trs = k, context_end = end; returns its
    wall seconds."""
    cmd = [
        str(PY), str(REPO / "launch" / "train.py"),
        "--config", str(REPO / "launch" / "configs" / "small.yaml"),
        "--set", "optim.micro_batch_size=16",
        "--deepspeed_config", str(REPO / "ds_configs" / "zero2_fp32_cpu.json"),
        "--set", f"data.store={store}", "--set", f"checkpoint.run_dir={run_dir}",
        "--set", f"model.context_trs={k}", "--set", f"model.context_end={end}",
        "--set", "logging.wandb_mode=disabled",
    ]  # fmt: skip
    for item in extra:
        cmd += ["--set", item]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    clock = time.perf_counter()
    log = run_dir.parent / f"train_{label(k, end)}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"training {label(k, end)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - clock


def _finished(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return False
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return any(r["kind"] == "end" and r["status"] in ("finished", "early_stopped") for r in rows)


def evaluate(run_dir: Path, store: Path, truth: Path | None, out: Path) -> dict[str, Any]:
    cmd = [str(PY), str(REPO / "tools" / "evaluate.py"), str(run_dir), "--store", str(store),
           "--split", "test", "--out", str(out), "--device", "cpu"]  # fmt: skip
    if truth is not None:
        cmd += ["--truth", str(truth)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"evaluation of {run_dir} failed:\n{done.stderr[-3000:]}")
    print(done.stdout)
    return dict(json.loads((out / "evaluation.json").read_text()))


def run_cost(run_dir: Path, skip: int = 3) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "train"]
    times = [r["step_time_s"] for r in steps[skip:]] or [r["step_time_s"] for r in steps]
    end = [r for r in rows if r["kind"] == "end"][-1]
    vals = [r for r in rows if r["kind"] == "val"]
    start = [r for r in rows if r["kind"] == "start"][0]
    return {
        "train_wall_s": end["time"] - start["time"],
        "steps": end["step"],
        "status": end["status"],
        "s_per_step_median": statistics.median(times),
        "peak_rss_gb_rank0": max(r["memory"]["rss_gb"] for r in steps),
        "val_records": len(vals),
        "param_counts_total": [r for r in rows if r["kind"] == "start"][0]["param_counts"]["total"],
    }


def step_times(
    store: Path, settings: list[tuple[int, str]], steps: int = 6, rounds: int = 3
) -> dict[str, Any]:
    """s/step of the small preset at each setting, one process, torch AdamW, batch 16, interleaved
    round by round (k = 1, k = 8, k = 1, ...) so machine noise hits every setting alike; plus the small
    preset's saved-for-backward bytes per step from memory_estimate (fp32 on CPU: x2 the bf16
    figure)."""
    import torch
    from torch.utils.data import DataLoader

    from giblet_ds.config import load_config
    from giblet_ds.losses import NormalizedLoss, TargetVariances
    from giblet_ds.memory_estimate import activation_bytes
    from giblet_ds.model import GibletAutoencoder
    from giblet_ds.store import StoreDataset, load_target_stats, open_store

    torch.set_num_threads(1)
    info = open_store(store)
    stats = load_target_stats(info.path, info=info)
    setups = {}
    for k, end in settings:
        cfg = load_config(
            REPO / "launch" / "configs" / "small.yaml",
            [f"model.context_trs={k}", f"model.context_end={end}"],
        )
        model_cfg = cfg.model.with_input_sizes(info.model_input_sizes())
        torch.manual_seed(0)
        model = GibletAutoencoder(model_cfg)
        model.init_weights()
        loader = DataLoader(
            StoreDataset(info.path, "train", info=info, context_trs=k, context_end=end),
            batch_size=16,
            shuffle=True,
        )
        loss_fn = NormalizedLoss(TargetVariances.from_stats(stats), cfg.loss.weights())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        setups[label(k, end)] = (model, loader, loss_fn, opt, activation_bytes(model, 16))
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(rounds):
        for name in setups:
            model, loader, loss_fn, opt, _ = setups[name]
            batches = iter(loader)
            for _ in range(steps):
                clock = time.perf_counter()
                batch = next(batches)
                out = model(batch["video"], batch["audio_codes"], batch["text"],
                            batch.get("context_mask"))  # fmt: skip
                loss_fn(out, batch).total.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times[name].append(time.perf_counter() - clock)
    return {
        name: {
            "s_per_step_median": statistics.median(times[name]),
            "activations_mb_small_fp32": 2 * setups[name][4].without_checkpointing / 1024**2,
        }
        for name in setups
    }


def dry_run_memory(k: int) -> dict[str, float]:
    """3.5B preset at context_trs = k, 8 GPUs: activations per GPU and ZeRO-2 total, GiB."""
    from giblet_ds.config import load_config
    from giblet_ds.memory_estimate import GIB, estimate
    from giblet_ds.model import train_flops_per_sample

    cfg = load_config(REPO / "launch" / "configs" / "giblet_3p5b.yaml", [f"model.context_trs={k}"])
    est = estimate(cfg, num_gpus=8)
    return {
        "params": est.total_params,
        "activations_gib_checkpointed": est.activations.with_checkpointing / GIB,
        "activations_gib_plain": est.activations.without_checkpointing / GIB,
        "zero2_total_gib": (est.zero[0].gpu_bytes + est.configured_activation_bytes) / GIB,
        "train_tflops_per_sample": train_flops_per_sample(est.param_counts, k) / 1e12,
    }


def voxel_set(evaluation: dict[str, Any], name: str) -> dict[str, Any]:
    sets = evaluation["sets"]
    return (
        dict(sets[name]) if isinstance(sets, dict) else next(s for s in sets if s["name"] == name)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--truth", type=Path, help="the demo's ground_truth.json (oracle r)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--runs",
        type=parse_setting,
        nargs="+",
        default=[(1, "stimulus"), (8, "stimulus"), (8, "volume")],
        help="settings K or K:stimulus|volume (default: 1 8:stimulus 8:volume)",
    )
    p.add_argument("--no-interleaved", action="store_true", help="skip the interleaved timing")
    p.add_argument("--set", action="append", default=[], help="extra run-config overrides")
    args = p.parse_args(argv)
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "store": str(args.store),
        "runs": {},
    }
    saved = args.out / "bench_context.json"
    if saved.is_file():  # a rerun keeps the runs it already has
        results["runs"] = json.loads(saved.read_text())["runs"]
    for k, end in args.runs:
        name = label(k, end)
        run_dir = args.out / f"run_{name}"
        if _finished(run_dir):  # trained by an earlier invocation with the same settings
            print(f"{name}: reusing the finished run {run_dir}")
            old = results["runs"].get(name, {})
            wall = float(old.get("train_and_launch_wall_s", float("nan")))
        else:
            wall = train(args.store, run_dir, k, end, args.set)
        evaluation = evaluate(run_dir, args.store, args.truth, args.out / f"eval_{name}")
        entry: dict[str, Any] = {**run_cost(run_dir), "dry_run_3p5b": dry_run_memory(k)}
        entry["train_and_launch_wall_s"] = wall
        for voxels in SETS:
            try:
                s = voxel_set(evaluation, voxels)
            except (KeyError, StopIteration):
                continue
            entry[voxels] = {key: s.get(key) for key in ("n_voxels", "model_r", "ridge_r",
                                                      "oracle_r", "ceiling_r")}  # fmt: skip
        entry["n_trs"] = evaluation.get("n_trs")
        entry["context_trs"], entry["context_end"] = k, end
        results["runs"][name] = entry
        (args.out / "bench_context.json").write_text(json.dumps(results, indent=2))
    if not args.no_interleaved:
        results["interleaved"] = step_times(args.store, args.runs)
    saved.write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


def table(results: dict[str, Any]) -> str:
    lines = [
        f"{results['date']}, {results['machine']}; store {results['store']}; test split, "
        "reliable voxels",
        "",
        "| setting | model r | ridge r | oracle r | model/oracle | s/step (run) | s/step (interleaved) | "
        "act. MB (small, fp32, batch 16) | peak RSS GB | 3.5B act./GPU (ckpt) | "
        "3.5B ZeRO-2 total/GPU | 3.5B TFLOP/sample |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in results["runs"].items():
        rel = run.get("reliable", {})
        inter = results.get("interleaved", {}).get(name, {})
        nan = float("nan")
        dry = run["dry_run_3p5b"]
        oracle = rel.get("oracle_r")
        ratio = f"{rel['model_r'] / oracle:.2f}" if oracle else "n/a"

        def r(key: str, rel: dict[str, Any] = rel) -> str:
            value = rel.get(key)
            return "n/a" if value is None else f"{value:.3f}"

        lines.append(
            f"| {name} | {r('model_r')} | {r('ridge_r')} | {r('oracle_r')} | {ratio} | "
            f"{run['s_per_step_median']:.3f} | {inter.get('s_per_step_median', nan):.3f} | "
            f"{inter.get('activations_mb_small_fp32', nan):.1f} | "
            f"{run['peak_rss_gb_rank0']:.2f} | "
            f"{dry['activations_gib_checkpointed']:.2f} GiB | {dry['zero2_total_gib']:.2f} GiB | "
            f"{dry['train_tflops_per_sample']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
