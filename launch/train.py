#!/usr/bin/env python
"""Train giblet with DeepSpeed.

    deepspeed --num_gpus 8 launch/train.py --deepspeed_config ds_configs/zero2_bf16.json
    deepspeed --num_gpus 2 launch/train.py --config launch/configs/small.yaml \\
        --deepspeed_config ds_configs/zero2_fp32_cpu.json
    python launch/train.py --dry-run            # sizes and memory per GPU, nothing allocated

Also runs under torchrun and as one plain process.

Under SLURM, launch/slurm_train.sbatch starts it with srun, one task per GPU; the ranks come from
SLURM's variables (giblet_ds.train.launch_env), with no ssh between nodes.

Exit codes: 0 finished or early-stopped, 2 bad input or a run directory held by another job
(message on stderr), 75 preempted (SIGTERM or SIGUSR1 reached the ranks, at any moment from the
first line: the newest complete checkpoint is on disk and the same command resumes from it;
launch/slurm_train.sbatch requeues the job on 75).
"""

from __future__ import annotations

# First, before any slow import: a SIGUSR1/SIGTERM from SLURM during start-up is recorded, not fatal.
from giblet_ds.train.signal_latch import latch_preemption_signals

latch_preemption_signals()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from giblet_ds.config import RunConfig, load_config, load_ds_json  # noqa: E402
from giblet_ds.errors import GibletError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "launch" / "configs" / "giblet_3p5b.yaml"
DEFAULT_DS_CONFIG = REPO / "ds_configs" / "zero2_bf16.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run YAML (default: 3.5B)")
    parser.add_argument("--deepspeed_config", default=str(DEFAULT_DS_CONFIG), help="DeepSpeed JSON")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. optim.lr=3e-4",
    )
    parser.add_argument("--resume", help="auto | none | PATH (same as --set checkpoint.resume=...)")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="resume without checking the tag's checksums against its manifest (faster)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print sizes and memory, then exit")
    parser.add_argument("--num-gpus", type=int, default=8, help="GPUs per node for --dry-run")
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes for --dry-run")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # launcher's
    return parser.parse_args(argv)


def dry_run(cfg: RunConfig, ds_json: dict, *, num_gpus: int, num_nodes: int) -> int:
    """Resolve the config as a run on num_gpus x num_nodes would, print sizes and memory per GPU."""
    # DeepSpeed's arithmetic only: no accelerator needed, and no warning about finding none.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from giblet_ds.memory_estimate import estimate, format_estimate
    from giblet_ds.resolve import resolve

    resolved = resolve(cfg, ds_json=ds_json, world_size=num_gpus * num_nodes, require_store=False)
    print(resolved.describe_sizes())
    print(format_estimate(estimate(resolved.cfg, num_gpus=num_gpus, num_nodes=num_nodes)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.set) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
        ds_json = load_ds_json(args.deepspeed_config)
        if args.dry_run:
            return dry_run(cfg, ds_json, num_gpus=args.num_gpus, num_nodes=args.num_nodes)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        from giblet_ds.train.preemption import PREEMPTED_EXIT_CODE
        from giblet_ds.train.trainer import Trainer

        trainer = Trainer(cfg, ds_json, verify_checkpoint=not args.no_verify)
        try:
            status = trainer.train()
        finally:
            trainer.close()
        if status in ("finished", "early_stopped") and trainer.rank == 0:
            evaluate_best(trainer.cfg)
    except GibletError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return PREEMPTED_EXIT_CODE if status == "preempted" else 0


def evaluate_best(cfg: RunConfig) -> None:
    """The held-out evaluation of ``best`` (train.evaluate_split), as tools/evaluate.py runs it."""
    split = cfg.train.evaluate_split
    if split == "none":
        return
    from giblet_ds.evaluation import evaluate, format_table, write_evaluation
    from giblet_ds.run import RunDir

    run = RunDir.of(cfg.checkpoint.run_dir)
    result = evaluate(run.path, cfg.data.store, split)
    write_evaluation(result, run.evaluation(split))
    print(format_table(result))
    print(f"evaluation of best on the {split} split written to {run.evaluation(split)}")


if __name__ == "__main__":
    sys.exit(main())
