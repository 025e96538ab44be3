"""Train / validation / test rows: contiguous segments separated by gaps (no leakage through the
HRF), within each run (``split_by: time``) or as whole runs (``split_by: run``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from giblet_ds.errors import ConfigError

__all__ = ["SPLIT_BY", "make_run_splits", "make_splits", "min_real_gap"]


def min_real_gap(lag: int) -> int:
    """Smallest gap a real build accepts: the lag plus 10 TRs of HRF tail (REFERENCE.md)."""
    return lag + 10


def make_splits(
    n_trs: int, fractions: tuple[float, float, float], gap: int
) -> dict[str, np.ndarray]:
    """Split ``range(n_trs)`` into contiguous train, val, test index arrays with ``gap`` TRs between.

    The gap TRs belong to no split. Sizes are the fractions of the ``n_trs - 2 * gap`` usable TRs,
    rounded, with train taking the remainder; every split must end up non-empty.
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions):
        raise ConfigError(f"split_fractions must be three positive numbers, got {fractions}")
    if gap < 0:
        raise ConfigError(f"split_gap must be >= 0, got {gap}")
    total = float(sum(fractions))
    usable = n_trs - 2 * gap
    n_val = round(usable * fractions[1] / total)
    n_test = round(usable * fractions[2] / total)
    n_train = usable - n_val - n_test
    if min(n_train, n_val, n_test) < 1:
        raise ConfigError(
            f"{n_trs} TRs cannot hold train/val/test splits {fractions} with gaps of {gap} TRs "
            f"(sizes would be {n_train}/{n_val}/{n_test}); use a longer recording or a smaller gap"
        )
    train = np.arange(0, n_train, dtype=np.int64)
    val_start = n_train + gap
    val = np.arange(val_start, val_start + n_val, dtype=np.int64)
    test_start = val_start + n_val + gap
    test = np.arange(test_start, test_start + n_test, dtype=np.int64)
    return {"train": train, "val": val, "test": test}


SPLIT_BY = ("time", "run")


def make_run_splits(
    runs: Sequence[tuple[str, int]],
    fractions: tuple[float, float, float],
    gap: int,
    *,
    split_by: str = "time",
    split_runs: Mapping[str, Sequence[str]] | None = None,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], list[np.ndarray], dict[str, list[str]]]:
    """Splits of runs concatenated in order; ``runs`` is ``(run id, TR count)`` per run.

    Returns ``(splits, zscore_rows, assignment)``: store-row index arrays per split; per run,
    the run's own rows (0-based within the run) its z-score statistics come from; and which
    runs each split holds.

    - ``time``: every run is cut into contiguous train, val, test segments (``make_splits``),
      so each run is z-scored on its own training TRs. One run: exactly the split of before.
    - ``run``: whole runs go to a split, named in ``split_runs`` (every run exactly once; val
      and test may name the same single run, which is then cut in time into val | gap | test),
      or, without it, shuffled with ``seed`` and counted by the fractions (at least one
      training run and one held-out run). A training run is z-scored on all its rows; a
      held-out run has no training rows and is z-scored on its own rows, the field's per-run
      convention (no statistics cross runs).
    """
    if split_by not in SPLIT_BY:
        raise ConfigError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")
    ids = [run_id for run_id, _ in runs]
    lengths = dict(runs)
    firsts = dict(
        zip(ids, np.concatenate([[0], np.cumsum([n for _, n in runs])[:-1]]), strict=True)
    )
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("train", "val", "test")}
    zscore_rows: list[np.ndarray] = []
    if split_by == "time":
        for run_id, n in runs:
            try:
                local = make_splits(n, fractions, gap)
            except ConfigError as err:
                raise ConfigError(f"run {run_id}: {err}") from None
            for name, rows in local.items():
                parts[name].append(rows + firsts[run_id])
            zscore_rows.append(local["train"])
        assignment = {name: list(ids) for name in parts}
        return _joined(parts), zscore_rows, assignment
    assignment = _assign_runs(ids, fractions, split_runs, seed)
    shared = [r for r in assignment["val"] if r in assignment["test"]]
    for run_id in ids:
        n, first = lengths[run_id], int(firsts[run_id])
        if run_id in shared:
            # the one held-out run is cut in time: val | gap | test, in the fractions' ratio
            usable = n - gap
            n_val = round(usable * fractions[1] / (fractions[1] + fractions[2]))
            if min(n_val, usable - n_val) < 1:
                raise ConfigError(
                    f"run {run_id} ({n} TRs) cannot hold val and test with a gap of {gap} TRs; "
                    "name more runs in split_runs or use a longer run"
                )
            parts["val"].append(np.arange(first, first + n_val, dtype=np.int64))
            parts["test"].append(np.arange(first + n_val + gap, first + n, dtype=np.int64))
        else:
            name = next(split for split in ("train", "val", "test") if run_id in assignment[split])
            parts[name].append(np.arange(first, first + n, dtype=np.int64))
        zscore_rows.append(np.arange(n, dtype=np.int64))
    return _joined(parts), zscore_rows, assignment


def _joined(parts: Mapping[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    return {
        name: np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)
        for name, arrays in parts.items()
    }


def _assign_runs(
    ids: list[str],
    fractions: tuple[float, float, float],
    split_runs: Mapping[str, Sequence[str]] | None,
    seed: int,
) -> dict[str, list[str]]:
    """Which runs each split holds (see ``make_run_splits``); ConfigError naming the runs."""
    if split_runs is not None:
        unknown = sorted(set(split_runs) - {"train", "val", "test"})
        if unknown:
            raise ConfigError(f"split_runs: unknown split(s) {unknown}; use train, val, test")
        out = {
            name: [str(r) for r in split_runs.get(name, [])] for name in ("train", "val", "test")
        }
        named = [r for name in out for r in out[name]]
        strange = sorted(set(named) - set(ids))
        if strange:
            raise ConfigError(f"split_runs names run(s) {strange} the build does not have: {ids}")
        missing = [r for r in ids if r not in named]
        if missing:
            raise ConfigError(f"split_runs leaves run(s) {missing} in no split; name every run")
        twice = [r for r in ids if (r in out["train"]) + (r in out["val"]) + (r in out["test"]) > 1]
        if (
            any(r in out["train"] for r in twice)
            or len(twice) > 1
            or (twice and (len(out["val"]) > 1 or len(out["test"]) > 1))
        ):
            raise ConfigError(
                f"split_runs: run(s) {twice} in more than one split; only a single held-out run "
                "may be both val and test (it is then cut in time)"
            )
        for name in ("train", "val", "test"):
            if not out[name]:
                raise ConfigError(
                    f"split_runs: the {name} split holds no run ({len(ids)} runs: {ids}); every "
                    "split needs one. With 2 runs, train on one and name the other as both val "
                    "and test (it is then cut in time into val | gap | test)"
                )
        return out
    if len(ids) < 2:
        raise ConfigError(
            f"split_by: run needs at least 2 runs (one to train, one held out), got {ids}"
        )
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    total = float(sum(fractions))
    held = min(len(ids) - 1, max(1, round(len(ids) * (fractions[1] + fractions[2]) / total)))
    n_test = round(held * fractions[2] / (fractions[1] + fractions[2]))
    n_val = held - n_test
    train = sorted(order[held:], key=ids.index)
    if n_val == 0 or n_test == 0:
        return {"train": train, "val": order[:1], "test": order[:1]}
    return {
        "train": train,
        "val": sorted(order[:n_val], key=ids.index),
        "test": sorted(order[n_val:held], key=ids.index),
    }
