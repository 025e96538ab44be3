#!/usr/bin/env python
"""Write the training health report of a run directory (markdown), optionally with loss curves.

Reads RUN_DIR/metrics.jsonl, config.resolved.yaml, checkpoints/ and the store named in the config;
audits the newest checkpoint's weights. The verdict is HEALTHY only when no check warns.

Exit codes: 0 report written (and, with --fail-on, the verdict passed), 1 verdict at or above
--fail-on, 2 not a readable run directory.

    tools/health_report.py runs/demo --out runs/demo/health.md --plot runs/demo/loss.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from giblet_ds.errors import GibletError
from giblet_ds.report.health import build_health_report
from giblet_ds.report.loss_curves import plot_loss_curves

_FAIL_ON = {"never": 99, "warn": 1, "fail": 2}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir", type=Path, help="the run directory (holds metrics.jsonl)")
    p.add_argument("--out", type=Path, help="write the markdown here (default: print it)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="also draw loss and fMRI r curves")
    p.add_argument("--no-audit", action="store_true", help="skip the weight audit (fast)")
    p.add_argument(
        "--audit-moments",
        action="store_true",
        help="audit the Adam moments of the newest checkpoint too (slower)",
    )
    p.add_argument(
        "--evaluation",
        type=Path,
        metavar="JSON",
        help="evaluation.json of tools/evaluate.py (default: RUN_DIR/evaluation/evaluation.json)",
    )
    p.add_argument(
        "--fail-on",
        choices=sorted(_FAIL_ON),
        default="never",
        help="exit 1 when the verdict is at least this bad (default: never)",
    )
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = build_health_report(
            args.run_dir,
            audit=not args.no_audit,
            audit_moments=args.audit_moments,
            evaluation=args.evaluation,
        )
        if args.plot:
            plot_loss_curves(args.run_dir, args.plot)
    except GibletError as exc:
        print(f"health_report: error: {exc}", file=sys.stderr)
        return 2
    text = report.markdown()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"{report.verdict} ({report.status}): wrote {args.out}"
              + (f" and {args.plot}" if args.plot else ""))  # fmt: skip
    else:
        print(text)
    worst = {"HEALTHY": 0, "NEEDS ATTENTION": 1, "UNHEALTHY": 2}[report.verdict]
    return 1 if worst >= _FAIL_ON[args.fail_on] else 0


if __name__ == "__main__":
    sys.exit(main())
