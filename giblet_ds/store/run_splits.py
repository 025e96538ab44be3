"""A store seen with another assignment of its runs to splits (``data.split_runs``).

A ``split_by: run`` store z-scores every run on that run's own rows, whichever split it went to
at build time, so its fMRI does not depend on the assignment: a leave-one-run-out fold can hold
out any run of the one store without rebuilding it. Everything that reads "the training TRs"
(datasets, loss statistics, reliable voxels, the ridge baseline) reads them from
``StoreInfo.splits``, which this view replaces; the statistics in ``/stats`` were computed on
the build's training runs, so :func:`giblet_ds.store.stats.load_target_stats` recomputes them on
the fold's. A ``split_by: time`` store z-scored each run on its own training segment, which a
new assignment would turn into held-out rows: refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from giblet_ds.errors import ConfigError
from giblet_ds.store.builder.splits import make_run_splits
from giblet_ds.store.reader import StoreInfo

__all__ = ["with_split_runs"]


def with_split_runs(info: StoreInfo, split_runs: Mapping[str, Sequence[str]] | None) -> StoreInfo:
    """``info`` with its splits re-made from ``split_runs`` by the build's own rule
    (giblet_ds.store.builder.splits.make_run_splits); ``info`` itself when it is None.
    ConfigError naming ``data.split_runs`` for a store split by time or an assignment the build
    would refuse."""
    if split_runs is None:
        return info
    split_by = info.attrs.get("split_by", "time")
    if split_by != "run":
        raise ConfigError(
            f"data.split_runs needs a store built with split_by: run; {info.path} is split by "
            f"{split_by} (each run z-scored on its own training segment, which another "
            "assignment would hold out): rebuild it with split_by: run, or set data.split_runs=null"
        )
    fractions = tuple(float(f) for f in info.attrs.get("split_fractions", (0.7, 0.15, 0.15)))
    lengths = [(run_id, int(n)) for run_id, n in zip(info.runs.ids, info.runs.n_trs, strict=True)]
    try:
        splits, _, assignment = make_run_splits(
            lengths, (fractions[0], fractions[1], fractions[2]), info.split_gap,
            split_by="run", split_runs=split_runs,
        )  # fmt: skip
    except ConfigError as err:
        text = str(err)
        text = f"data.{text}" if text.startswith("split_runs") else f"data.split_runs: {text}"
        raise ConfigError(f"{text} ({info.path})") from None
    return dataclasses.replace(info, splits=splits, split_override=assignment)
