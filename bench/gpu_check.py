"""The whole GPU bring-up of the 3.5B model in one command (issue 13); ``--cpu`` runs the same
stages with the tiny preset and the fp32 CPU configs (tests/test_gpu_check.py).

Stages, each in its own process; a failed stage is recorded with its stderr tail and the later
stages still run:

1. environment   GPU name and memory, driver, CUDA, torch, DeepSpeed, NCCL
2. bandwidth     a large device-to-device copy (bytes/s) and a bf16 matrix product (FLOP/s)
3. store         a synthetic store at the seed's full input sizes (300 TRs)
4. dry_run       launch/train.py --dry-run --num-gpus 1: parameters and predicted memory
   optimizer_op  DeepSpeed's FusedAdam JIT-built before the runs (failing: torch AdamW runs)
   train_*       deepspeed --num_gpus 1 on launch/train.py: ZeRO-2 and ZeRO-3 with activation
                 checkpointing, then ZeRO-2 without; medians, peaks, MFU, measured / floor
5. checkpoint    the last run's end-of-run tag (only when the disk has room; else skipped)
   consolidate   tools/zero_to_fp32.py to bf16 safetensors
   audit         tools/audit_weights.py on the consolidated file
6. everything to OUT/gpu_check.json and OUT/gpu_check.md; the table is printed.

    bench/gpu_check.sh [--cpu] [--out DIR] [--work-dir DIR] [--budget-s 530]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_report  # noqa: E402
from gpu_runs import (  # noqa: E402
    FLOOR_FORMULA,
    REPO,
    TRAIN,
    RunSpec,
    parse_dry_run,
    python_env,
    read_records,
    run_process,
    summarize_run,
    tail,
    this_python,
    train_command,
)

PROBE = REPO / "bench" / "gpu_probe.py"
CONFIGS = REPO / "launch" / "configs"
DS = REPO / "ds_configs"
STAGE_ORDER = ("environment", "bandwidth", "store", "dry_run")


def plan(cpu: bool) -> tuple[Path, list[RunSpec], int]:
    """Run config, training runs and bytes per model weight for the mode."""
    if cpu:
        zero2, zero3 = DS / "zero2_fp32_cpu.json", DS / "zero3_fp32_cpu.json"
        runs = [
            # the launcher's start costs seconds on 2 cores: one run takes the GPU mode's path
            RunSpec("train_zero2_ac", zero2, True, steps=5, warmup=2),
            RunSpec("train_zero3_ac", zero3, True, steps=5, warmup=2, launcher=False),
            RunSpec("train_zero2_no_ac", zero2, False, steps=3, warmup=1, launcher=False),
        ]
        return CONFIGS / "tiny.yaml", runs, 4
    zero2, zero3 = DS / "zero2_bf16.json", DS / "zero3_bf16.json"
    runs = [
        RunSpec("train_zero2_ac", zero2, True, steps=30, warmup=5),
        RunSpec("train_zero3_ac", zero3, True, steps=30, warmup=5),
        RunSpec("train_zero2_no_ac", zero2, False, steps=12, warmup=4),
    ]
    return CONFIGS / "giblet_3p5b.yaml", runs, 2


class Check:
    """Runs the stages in order against one time budget and collects their records."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.cpu: bool = args.cpu
        self.out: Path = args.out
        self.work: Path = args.work_dir
        self.deadline = time.monotonic() + args.budget_s
        self.python = this_python()
        self.env = python_env(self.cpu)
        if not self.cpu:
            self.env["DS_ACCELERATOR"] = "cuda"
            self.env.setdefault("TORCH_EXTENSIONS_DIR", str(self.work / "torch_extensions"))
        self.config, self.runs, self.weight_bytes = plan(self.cpu)
        self.ckpt_dir: Path | None = args.ckpt_dir
        self.stages: dict[str, dict[str, Any]] = {}
        self.logs = self.work / "logs"

    # ---------------------------------------------------------------------------- plumbing

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def stage(
        self, name: str, fn: Callable[[], dict[str, Any]], needs: tuple[str, ...] = ()
    ) -> None:
        """Run one stage; any exception becomes a failed record and the next stage runs."""
        record: dict[str, Any] = {"name": name, "status": "ok", "seconds": 0.0}
        missing = [n for n in needs if self.stages.get(n, {}).get("status") != "ok"]
        started = time.perf_counter()
        if missing:
            record.update(
                status="skipped", reason=f"needs {', '.join(missing)}, which did not pass"
            )
        elif self.left() < 5:
            record.update(status="skipped", reason="the time budget (--budget-s) is spent")
        else:
            try:
                record["result"] = fn()
            except StageSkipped as exc:
                record.update(status="skipped", reason=str(exc))
            except StageFailed as exc:
                record.update(status="failed", error=str(exc), **exc.detail)
            except Exception as exc:  # a bench must report every failure and go on
                record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        record["seconds"] = round(time.perf_counter() - started, 2)
        self.stages[name] = record
        print(f"[gpu_check] {name}: {record['status']} ({record['seconds']:.1f} s)"
              + (f" {record.get('error') or record.get('reason')}" if record["status"] != "ok" else ""),
              flush=True)  # fmt: skip

    def child(self, name: str, cmd: list[str], timeout: float) -> dict[str, Any]:
        """A child process within the budget; raise StageFailed with its tails when it fails."""
        limit = min(timeout, self.left())
        proc = run_process(cmd, self.logs / name, limit, self.env)
        detail = {
            "command": " ".join(cmd),
            "returncode": proc.returncode,
            "timed_out": proc.timed_out,
            "stdout_tail": proc.stdout_tail,
            "stderr_tail": proc.stderr_tail,
        }
        if proc.timed_out:
            raise StageFailed(f"{name} ran past {limit:.0f} s and was killed", detail)
        if proc.returncode != 0:
            raise StageFailed(f"{name} exited with {proc.returncode}", detail)
        return {"seconds": proc.seconds, "stdout_tail": proc.stdout_tail}

    def probe(self, what: str, *extra: str, timeout: float = 120) -> dict[str, Any]:
        out = self.work / f"{what}.json"
        out.unlink(missing_ok=True)
        cmd = [self.python, str(PROBE), what, str(out), *extra] + (["--cpu"] if self.cpu else [])
        self.child(what, cmd, timeout)
        return dict(json.loads(out.read_text()))

    def result(self, name: str) -> dict[str, Any] | None:
        stage = self.stages.get(name, {})
        return stage.get("result") if stage.get("status") == "ok" else None

    # ------------------------------------------------------------------------------ stages

    def setup(self) -> dict[str, Any]:
        """What bench/gpu_check.sh found: DeepSpeed importable (from wheels where needed)."""
        note = os.environ.get("GIBLET_GPU_CHECK_SETUP", "ok: not started by bench/gpu_check.sh")
        if note.startswith("failed"):
            raise StageFailed(note, {})
        return {"note": note, "python": self.python}

    def optimizer_op(self) -> dict[str, Any]:
        """GPU: JIT-build DeepSpeed's FusedAdam now (into TORCH_EXTENSIONS_DIR, which the runs
        reuse), so its build time stays out of the first run and a failed build is named here;
        the runs then fall back to torch.optim.AdamW (``torch_adam``). CPU: the configs' own
        torch_adam is checked."""
        if self.cpu:
            for spec in self.runs:
                params = json.loads(spec.ds_config.read_text())["optimizer"].get("params", {})
                if not params.get("torch_adam"):
                    raise StageFailed(
                        f"{spec.ds_config} does not set optimizer.params.torch_adam", {}
                    )
            return {"optimizer": "torch.optim.AdamW (torch_adam in the CPU configs)"}
        build = "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load(verbose=True)"
        try:
            done = self.child("optimizer_op", [self.python, "-c", build], 300)
        except StageFailed:
            self.runs = [self._torch_adam(spec) for spec in self.runs]
            raise
        return {"optimizer": "DeepSpeed FusedAdam (JIT-built)", "build_s": done["seconds"]}

    def _torch_adam(self, spec: RunSpec) -> RunSpec:
        """The same run on a copy of its DeepSpeed JSON with optimizer.params.torch_adam = true."""
        ds = json.loads(spec.ds_config.read_text())
        ds.setdefault("optimizer", {"type": "AdamW"}).setdefault("params", {})["torch_adam"] = True
        path = self.work / spec.ds_config.name.replace(".json", ".torch_adam.json")
        path.write_text(json.dumps(ds, indent=2))
        return dataclasses.replace(spec, ds_config=path)

    def dry_run(self) -> dict[str, Any]:
        store = self.result("store")
        sizes = store["model_input_sizes"] if store else {}
        cmd = [
            self.python,
            str(TRAIN),
            "--config",
            str(self.config),
            "--dry-run",
            "--num-gpus",
            "1",
        ]
        for key, value in sizes.items():
            cmd += ["--set", f"model.{key}={value}"]
        self.child("dry_run", cmd, 120)
        text = (self.logs / "dry_run.out").read_text()
        return {**parse_dry_run(text), "text": text}

    def checkpoint_place(self) -> tuple[Path | None, str]:
        """Where the last run may save its tag: the first candidate with room for the tag (w + 12
        bytes per parameter) plus the bf16 consolidation (2), with 10% to spare; /dev/shm only
        when the RAM also keeps 32 GiB free beside it."""
        dry = self.result("dry_run")
        if dry is None:
            return None, "no dry run, so no parameter count to size the checkpoint"
        need = int(dry["params"] * (self.weight_bytes + 12 + 2) * 1.1)
        candidates = [self.ckpt_dir] if self.ckpt_dir else [self.work, Path("/dev/shm")]
        seen = []
        for place in candidates:
            if str(place) == "/dev/shm" and not place.is_dir():
                continue
            place.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(place).free
            seen.append(f"{place}: {free / 1e9:.1f} GB free")
            ram_ok = str(place) != "/dev/shm" or _mem_available() - need > 32 * 2**30
            if free >= need and ram_ok:
                return (
                    place,
                    f"{place} has {free / 1e9:.1f} GB free, the checkpoint needs {need / 1e9:.1f} GB",
                )
        return None, f"not enough disk: the checkpoint needs {need / 1e9:.1f} GB; {'; '.join(seen)}"  # fmt: skip

    def train_run(self, spec: RunSpec, save_to: Path | None) -> dict[str, Any]:
        run_dir = (save_to or self.work) / "runs" / spec.name
        shutil.rmtree(run_dir, ignore_errors=True)
        store = self.result("store")
        assert store is not None
        peaks_path = self.work / f"{spec.name}.peaks.json"
        peaks_path.unlink(missing_ok=True)
        self.env["GIBLET_BENCH_PEAKS"] = str(peaks_path)
        self.env["GIBLET_BENCH_SKIP_SAVE"] = "best" if save_to else "all"
        cmd = train_command(self.python, self.config, spec, Path(store["path"]), run_dir)
        timeout = 150 if self.cpu else 240
        failure: StageFailed | None = None
        try:
            proc = self.child(spec.name, cmd, timeout)
        except StageFailed as exc:
            failure, proc = exc, {}
        peaks = json.loads(peaks_path.read_text()) if peaks_path.is_file() else None
        bw, dry = self.result("bandwidth") or {}, self.result("dry_run")
        summary = summarize_run(
            read_records(run_dir),
            spec,
            weight_bytes=self.weight_bytes,
            bandwidth=bw.get("bandwidth_bytes_per_s"),
            matmul_flops=bw.get("matmul_flops_per_s"),
            dry=dry,
            peaks=peaks,
        )
        summary.update(
            run_dir=str(run_dir), wall_s=proc.get("seconds"), saved_checkpoint=bool(save_to)
        )
        if not save_to:  # the tags hold only the skip note: never leave them to be resumed from
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        if failure is not None:
            failure.detail["result"] = summary
            raise failure
        if summary["train_records"] != spec.steps:
            raise StageFailed(
                f"{spec.name} logged {summary['train_records']} train records, expected {spec.steps}",
                {"result": summary, "stderr_tail": tail(self.logs / f"{spec.name}.err", 3000)},
            )
        return summary

    def checkpoint(self, run: dict[str, Any] | None, place_note: str) -> dict[str, Any]:
        if run is None or not run.get("saved_checkpoint"):
            raise StageSkipped(place_note)
        run_dir = Path(run["run_dir"])
        records = read_records(run_dir)
        saved = [r for r in records if r.get("kind") == "checkpoint" and r["tag"] != "best"]
        if not saved:
            raise StageFailed(f"{run_dir} has no checkpoint record", {})
        tag = run_dir / "checkpoints" / saved[-1]["tag"]
        if not list(tag.glob("*_optim_states.pt")):
            raise StageFailed(f"{tag} holds no *_optim_states.pt", {})
        last_train = max((r["time"] for r in records if r.get("kind") == "train"), default=None)
        return {
            "tag": str(tag),
            "bytes": sum(f.stat().st_size for f in tag.rglob("*") if f.is_file()),
            "files": sorted(f.name for f in tag.iterdir()),
            "save_s": _seconds_between(last_train, saved[-1]["time"]),
            "place": place_note,
        }

    def consolidate(self) -> dict[str, Any]:
        ckpt = self.result("checkpoint")
        assert ckpt is not None
        tag = Path(ckpt["tag"])
        out_dir = tag.parent.parent / "consolidated"
        shutil.rmtree(out_dir, ignore_errors=True)
        cmd = [self.python, str(REPO / "tools" / "zero_to_fp32.py"), str(tag.parent), str(out_dir)]
        cmd += ["--tag", tag.name, "--safe_serialization", "--dtype", "bf16", "--no-shard"]
        done = self.child("consolidate", cmd, 300)
        files = sorted(out_dir.glob("*.safetensors"))
        if not files:
            raise StageFailed(f"{out_dir} holds no .safetensors file", {})
        return {
            "path": str(files[0]),
            "bytes": sum(f.stat().st_size for f in files),
            "seconds": done["seconds"],
        }

    def audit(self) -> dict[str, Any]:
        consolidated = self.result("consolidate")
        assert consolidated is not None
        report = self.work / "audit.json"
        report.unlink(missing_ok=True)
        cmd = [self.python, str(REPO / "tools" / "audit_weights.py"), consolidated["path"]]
        cmd += ["--json", str(report)]
        try:
            done = self.child("audit", cmd, 240)
            exit_code = 0
        except StageFailed as exc:
            if exc.detail.get("returncode") != 1 or not report.is_file():
                raise
            done, exit_code = {"seconds": None}, 1  # 1: it ran and has findings to show
        data = json.loads(report.read_text())
        return {"exit_code": exit_code, "summary": data.get("summary"), "seconds": done["seconds"]}

    # -------------------------------------------------------------------------------- main

    def run(self) -> dict[str, Any]:
        started = dt.datetime.now(dt.UTC)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stage("setup", self.setup)
        self.stage("environment", lambda: self.probe("env", timeout=180))
        self.stage("bandwidth", lambda: self.probe("bandwidth", timeout=180))
        store_path = self.work / "store.h5"
        self.stage("store", lambda: self.probe("store", str(store_path), timeout=180))
        self.stage("dry_run", self.dry_run)
        # environment fails where torch sees no GPU: nothing then tries the 3.5B model on a CPU
        self.stage("optimizer_op", self.optimizer_op, needs=("setup", "environment"))
        save_to, place_note = self.checkpoint_place()
        # The last run (ZeRO-2, shortest) keeps its checkpoint: a slow save on a small disk then
        # cannot eat the time of the runs measured before it.
        for index, spec in enumerate(self.runs):
            where = save_to if index == len(self.runs) - 1 else None
            run = functools.partial(self.train_run, spec, where)
            self.stage(spec.name, run, needs=("setup", "environment", "store"))
            self.stages[spec.name]["plan"] = {
                "zero_stage": spec.zero_stage,
                "activation_checkpointing": spec.activation_checkpointing,
                "steps": spec.steps,
                "ds_config": spec.ds_config.name,
            }
        saving = self.stages[self.runs[-1].name]
        if save_to is not None and saving["status"] != "ok":
            place_note = f"{self.runs[-1].name}, the run that saves it, did not pass"
        self.stage("checkpoint", lambda: self.checkpoint(saving.get("result"), place_note))
        self.stage("consolidate", self.consolidate, needs=("checkpoint",))
        self.stage("audit", self.audit, needs=("consolidate",))
        if save_to is not None and not self.cpu:  # a 3.5B tag would fill the disk
            shutil.rmtree(save_to / "runs" / self.runs[-1].name / "checkpoints", ignore_errors=True)
            shutil.rmtree(
                save_to / "runs" / self.runs[-1].name / "consolidated", ignore_errors=True
            )
        report = {
            "mode": "cpu" if self.cpu else "gpu",
            "started": started.isoformat(timespec="seconds"),
            "wall_s": round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1),
            "floor_formula": FLOOR_FORMULA,
            "weight_bytes": self.weight_bytes,
            "config": str(self.config.relative_to(REPO)),
            "ok": all(s["status"] == "ok" for s in self.stages.values()),
            "stages": list(self.stages.values()),
        }
        (self.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        table = gpu_report.markdown(report)
        (self.out / "gpu_check.md").write_text(table)
        print(table)
        return report


class StageFailed(Exception):
    def __init__(self, message: str, detail: dict[str, Any]) -> None:
        super().__init__(message)
        self.detail = detail


class StageSkipped(Exception):
    pass


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _seconds_between(a: str | float | None, b: str | float | None) -> float | None:
    if a is None or b is None:
        return None
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(b) - float(a)
    return (dt.datetime.fromisoformat(str(b)) - dt.datetime.fromisoformat(str(a))).total_seconds()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="tiny preset, fp32 CPU configs")
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "runs" / "gpu_check"),
        help="folder for gpu_check.json and gpu_check.md (default: $OUT, else runs/gpu_check)",
    )  # fmt: skip
    parser.add_argument(
        "--work-dir", type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "giblet_gpu_check",
        help="scratch: store, run folders, logs (default: $TMPDIR/giblet_gpu_check)",
    )  # fmt: skip
    parser.add_argument("--ckpt-dir", type=Path, help="where the checkpoint may go (default: "
                        "the work dir, else /dev/shm, whichever has room)")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=530.0,
                        help="stop starting stages after this many seconds (default 530)")  # fmt: skip
    args = parser.parse_args(argv)
    report = Check(args).run()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
