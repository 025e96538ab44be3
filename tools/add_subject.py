#!/usr/bin/env python
"""Add a subject to a model trained with subject heads (data.target=subjects).

A new subject head starts as the average subject and is fit to the new subject's volumes; the
shared model and every other head stay frozen (giblet_ds.train.add_subject). STORE: a store of
the same movie and mask holding the new subject (--subject: its id or index). Writes into OUT
model.safetensors and run_config.yaml (model.n_subjects one higher), which every tool loads.

Exit codes: 0 written, 2 unreadable checkpoint or store, a model without subject heads, or a
store that does not fit the model.

    tools/add_subject.py runs/subjects --store new_subject.h5 --subject sub-18 --out runs/sub18
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from giblet_ds.errors import GibletError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="run dir (best tag), ZeRO tag or weights file")
    p.add_argument("--store", type=Path, required=True, help="store holding the new subject")
    p.add_argument("--subject", default="0", help="the new subject's id or index (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training TRs")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate of the new head")
    p.add_argument("--seed", type=int, default=0, help="order of the training TRs")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking the tag's files against its manifest",
    )
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.epochs < 1 or args.lr <= 0:
        print("add_subject: error: --epochs must be >= 1 and --lr > 0", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[add_subject] %(message)s", stream=sys.stderr)
    from safetensors.torch import save_file

    from giblet_ds.checkpoint.loading import load_model
    from giblet_ds.config import config_to_dict
    from giblet_ds.store import open_store
    from giblet_ds.train.add_subject import add_subject

    subject: int | str = int(args.subject) if args.subject.isdigit() else args.subject
    try:
        model, cfg, _ = load_model(args.checkpoint, device="cpu", verify=not args.no_verify)
        added = add_subject(model, cfg, open_store(args.store), subject=subject,
                            epochs=args.epochs, lr=args.lr, seed=args.seed)  # fmt: skip
    except GibletError as exc:
        print(f"add_subject: error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in added.model.state_dict().items()}
    save_file(state, args.out / "model.safetensors")
    config = yaml.safe_dump(config_to_dict(added.cfg), sort_keys=False)
    (args.out / "run_config.yaml").write_text(config)
    print(
        f"subject {args.subject} is head {added.slot}: normalized fMRI loss on its training TRs "
        f"{added.train_loss[0]:.4f} -> {added.train_loss[-1]:.4f}, validation "
        f"{added.val_loss[0]:.4f} -> {added.val_loss[1]:.4f}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
