#!/usr/bin/env python
"""Audit checkpoint weights for NaN/Inf, exploding or dead tensors and norm scales stuck at init.

PATH may be a consolidated file (.bin, .safetensors, a sharded *.index.json), a DeepSpeed ZeRO tag
folder (read directly, Adam moments included), or a run directory (audits its newest complete tag
and best). Only complete tags are read, checked against their manifest first (--no-verify skips).
Streams chunk by chunk: memory stays small whatever the model size.

Exit codes: 0 healthy, 1 findings at or above --fail-on, 2 unreadable, incomplete or corrupted input.

    tools/audit_weights.py runs/demo
    tools/audit_weights.py runs/demo/checkpoints/best --json audit.json --fail-on warn
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from giblet_ds.checkpoint.audit import SEVERITIES, audit_path, format_report
from giblet_ds.errors import GibletError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "path", type=Path, help="consolidated file, shard index, ZeRO tag folder or run dir"
    )
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the full report as JSON")
    p.add_argument(
        "--fail-on",
        choices=SEVERITIES,
        default="error",
        help="exit 1 when a finding is at least this severe (default: error)",
    )
    p.add_argument(
        "--max-abs",
        type=float,
        default=1e3,
        help="warn when a parameter element exceeds this magnitude (default 1000)",
    )
    p.add_argument("--no-moments", action="store_true", help="skip the Adam moments of ZeRO tags")
    p.add_argument("--flagged-only", action="store_true", help="print only tensors with findings")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking a tag's files against its manifest (sizes and checksums)",
    )
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = audit_path(
            args.path, max_abs=args.max_abs, moments=not args.no_moments, verify=not args.no_verify
        )
    except GibletError as exc:
        print(f"audit_weights: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report, all_tensors=not args.flagged_only))
    code = report.exit_code(args.fail_on)
    if args.json:
        data = report.to_json()
        data["exit_code"] = code
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
