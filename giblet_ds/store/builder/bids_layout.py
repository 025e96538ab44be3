"""Runs of a BIDS dataset (raw, or fMRIPrep's derivatives) found with pybids, never by our own
path parsing: ``sub-*/[ses-*/]func/*_task-TASK_[run-*_]*bold.nii.gz``.

Each run's stimulus is what BIDS names it: the ``stim_file`` column of the run's
``_events.tsv``, relative to the dataset's ``stimuli/`` folder; its annotations are a sheet of
the same stem beside it (``stimuli/NAME.xlsx`` or ``.csv``), when there is one. Each BOLD
file's ``RepetitionTime`` comes from its JSON sidecar (pybids' ``get_metadata``: BIDS
inheritance applied, so a top-level ``task-T_bold.json`` counts); the builder checks it against
the other runs and the NIfTI headers (``run_stages.resolve_run_tr``). Every problem
(a subject missing a run, two spaces, a stimulus that is not there) names the run, the subject
and the file, and is raised before anything is decoded.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from giblet_ds.errors import StoreError
from giblet_ds.store.builder.inputs import RunInputs

__all__ = ["find_bids_runs", "run_name"]

_SHEETS = (".xlsx", ".csv")


def run_name(entities: dict[str, Any]) -> str:
    """A run's id from its BIDS entities: ``ses-A_run-1``, ``run-1``, or ``task-T`` alone."""
    parts = [f"ses-{entities['session']}"] if entities.get("session") else []
    if entities.get("run") is not None:
        parts.append(f"run-{entities['run']}")
    return "_".join(parts) or f"task-{entities['task']}"


def _layout(root: Path, derivatives: str | None) -> Any:
    try:
        from bids import BIDSLayout
    except ImportError as err:  # the `features` extra
        raise StoreError("--bids", f"pybids is not installed ({err}); pip install pybids") from None
    if not (root / "dataset_description.json").is_file():
        raise StoreError(root, "not a BIDS dataset: no dataset_description.json", dataset="--bids")
    deriv: Path | bool = False
    if derivatives is not None:
        deriv = root / "derivatives" / derivatives
        if not (deriv / "dataset_description.json").is_file():
            raise StoreError(
                deriv, "no derivatives dataset here (dataset_description.json)", dataset="--bids"
            )
    return BIDSLayout(str(root), validate=False, derivatives=deriv)


def find_bids_runs(
    root: str | Path, task: str, *, space: str | None = None, derivatives: str | None = None
) -> tuple[RunInputs, ...]:
    """The runs of ``task`` in the BIDS dataset ``root``, in session and run order.

    ``derivatives`` (e.g. ``"fmriprep"``): the ``desc-preproc`` BOLD of
    ``root/derivatives/NAME`` in ``space`` (required when more than one space is there);
    None: the raw BOLD. Every run must hold every subject found for the task."""
    root = Path(root)
    layout = _layout(root, derivatives)
    query: dict[str, Any] = {
        "task": task, "suffix": "bold", "extension": [".nii.gz", ".nii"],
        "scope": "derivatives" if derivatives else "raw",
    }  # fmt: skip
    if derivatives:
        query["desc"] = "preproc"
    files = layout.get(**query)
    if derivatives:
        spaces = sorted({f.entities.get("space") or "(none)" for f in files})
        if space is None and len(spaces) > 1:
            raise StoreError(
                root / "derivatives" / derivatives,
                f"task {task}: BOLD in {len(spaces)} spaces {spaces}; choose one with --space",
                dataset="--bids",
            )
        if space is not None:
            files = [f for f in files if f.entities.get("space") == space]
            if not files:
                raise StoreError(
                    root / "derivatives" / derivatives,
                    f"task {task}: no BOLD in space {space}; there: {spaces}",
                    dataset="--space",
                )
    if not files:
        raise StoreError(root, f"no BOLD files of task {task!r}", dataset="--bids")
    by_run: dict[str, dict[str, Any]] = defaultdict(dict)
    order: dict[str, tuple[str, int]] = {}
    for f in files:
        name = run_name(f.entities)
        subject = f"sub-{f.entities['subject']}"
        if subject in by_run[name]:
            raise StoreError(
                f.path, f"run {name}: two BOLD files for {subject}", dataset="--bids",
                actual=[by_run[name][subject].filename, f.filename],
            )  # fmt: skip
        by_run[name][subject] = f
        order[name] = (str(f.entities.get("session") or ""), int(f.entities.get("run") or 0))
    subjects = sorted({s for run in by_run.values() for s in run})
    runs = []
    for name in sorted(by_run, key=lambda n: order[n]):
        missing = [s for s in subjects if s not in by_run[name]]
        if missing:
            raise StoreError(
                root, f"run {name}: no BOLD file for {', '.join(missing)} (task {task}); "
                "every run needs every subject", dataset="--bids",
            )  # fmt: skip
        stimulus = _stimulus(layout, root, name, task, [by_run[name][s] for s in subjects])
        sheet = next(
            (stimulus.with_suffix(ext) for ext in _SHEETS if stimulus.with_suffix(ext).is_file()),
            None,
        )
        confounds = tuple(
            _confounds_file(layout, by_run[name][s]) if derivatives else None for s in subjects
        )
        runs.append(
            RunInputs(
                run_id=name,
                confounds=confounds,
                video=stimulus,
                annotations=sheet,
                fmri=tuple(Path(by_run[name][s].path) for s in subjects),
                subjects=tuple(subjects),
                stimulus=stimulus.relative_to(root / "stimuli").as_posix(),
                sidecar_trs=tuple(_sidecar_tr(layout, by_run[name][s]) for s in subjects),
            )
        )
    return tuple(runs)


def _sidecar_tr(layout: Any, bold: Any) -> float | None:
    """The ``RepetitionTime`` (s) the JSON sidecars of a BOLD file state, inheritance applied
    (None: none states one); StoreError naming the file when it is not a positive number."""
    value = layout.get_metadata(bold.path).get("RepetitionTime")
    if value is None:
        return None
    try:
        tr = float(value)
    except (TypeError, ValueError):
        tr = math.nan
    if isinstance(value, bool) or not (math.isfinite(tr) and tr > 0):
        raise StoreError(
            bold.path, f"its BIDS sidecar's RepetitionTime is {value!r}, not a positive number "
            "of seconds; correct the sidecar (task-T_bold.json or the file's own .json)",
            dataset="--bids",
        )  # fmt: skip
    return tr


def _confounds_file(layout: Any, bold: Any) -> Path | None:
    """fMRIPrep's ``desc-confounds_timeseries.tsv`` of a derivative BOLD file (None: none)."""
    entities = {k: bold.entities[k] for k in ("subject", "session", "task", "run")
                if k in bold.entities}  # fmt: skip
    found = layout.get(
        scope="derivatives", desc="confounds", suffix="timeseries", extension=".tsv", **entities
    )
    return Path(found[0].path) if found else None


def _stimulus(layout: Any, root: Path, name: str, task: str, files: list[Any]) -> Path:
    """The one stimulus of a run: the ``stim_file`` of its events files (every subject's)."""
    import pandas as pd

    names: dict[str, list[str]] = defaultdict(list)
    for f in files:
        entities = {k: f.entities[k] for k in ("subject", "session", "run") if k in f.entities}
        events = layout.get(
            scope="raw", task=task, suffix="events", extension=".tsv", **entities
        ) or layout.get(scope="raw", task=task, suffix="events", extension=".tsv",
                        run=entities.get("run"), subject=None)  # fmt: skip
        if not events:
            raise StoreError(
                f.path, f"run {name}: no _events.tsv names this run's stimulus", dataset="--bids"
            )
        table = pd.read_csv(events[0].path, sep="\t")
        if "stim_file" not in table.columns:
            raise StoreError(events[0].path, f"run {name}: no stim_file column", dataset="--bids")
        for value in table["stim_file"].dropna().unique():
            names[str(value)].append(f"sub-{f.entities['subject']}")
    if len(names) != 1:
        raise StoreError(
            root, f"run {name}: the events name {len(names)} stimuli, one is needed",
            dataset="--bids", expected="one stim_file named in every subject's events of the run",
            actual=dict(sorted(names.items())),
        )  # fmt: skip
    (stim,) = names
    path = root / "stimuli" / stim
    if not path.is_file():
        raise StoreError(
            path, f"run {name}: the stimulus its events name is not there", dataset="--bids"
        )
    return path
