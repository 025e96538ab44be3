"""Weight audit: per-tensor statistics and health checks, streamed chunk by chunk.

Reads a consolidated file (``.bin``, ``.safetensors``, a sharded ``*.index.json``), a ZeRO tag folder
directly (fp32 master weights and Adam moments, no consolidation), or a run directory (its
``latest`` and ``best`` tags). Every tensor is read in chunks of at most ``chunk`` elements with
positional reads, so auditing a 3.5B-parameter checkpoint needs a few hundred MB.

Checks (each finding names the tensor by its full parameter name):

* ``nonfinite`` (error): NaN or Inf in a weight or buffer;
* ``moments_nonfinite`` (error): NaN or Inf in an Adam moment of a parameter;
* ``abs_max`` (warn): a parameter element beyond ``max_abs``;
* ``dead`` (warn): a trainable tensor whose elements are all equal (no gradient ever reached it,
  e.g. a bias right before a norm layer); frozen parameters and buffers are never "dead". A
  consolidated file cannot say what was trainable: the kinds come from the ``tensor_kinds.json``
  that tools/zero_to_fp32.py writes beside it, so a tag and its consolidated weights get the
  same findings; without that file (weights from elsewhere) every tensor counts as trainable;
* ``norm_at_init`` (warn): a norm scale still exactly 1.0 everywhere (updates lost, e.g. pure bf16
  weights without fp32 master copies).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from giblet_ds.checkpoint.formats import SAFETENSORS_DTYPES, read_shard_index
from giblet_ds.checkpoint.mapped_file import MappedTorchFile
from giblet_ds.checkpoint.safe_load import check_zip_file
from giblet_ds.checkpoint.zero_reader import ZeroCheckpoint
from giblet_ds.errors import CheckpointError
from giblet_ds.run.layout import BEST_TAG, TENSOR_KINDS_NAME
from giblet_ds.run.resolver import CheckpointLocation, resolve_checkpoint

__all__ = [
    "AuditReport",
    "AuditSection",
    "Finding",
    "TensorStats",
    "audit_path",
    "format_report",
    "SEVERITIES",
]

Severity = Literal["warn", "error"]
SEVERITIES: tuple[Severity, ...] = ("warn", "error")
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
_NORM_RE = re.compile(r"(^|[._])(norm|layernorm|layer_norm|batchnorm|bn|ln)[\w]*\.weight$", re.I)


@dataclass
class TensorStats:
    """Statistics of one tensor; mean/std/min/max are over its finite elements."""

    name: str
    shape: list[int]
    dtype: str
    kind: str  # param | buffer | frozen | tensor (kind unknown in consolidated files)
    numel: int
    mean: float = math.nan
    std: float = math.nan
    min: float = math.nan
    max: float = math.nan
    abs_max: float = math.nan
    nan: int = 0
    inf: int = 0


@dataclass
class Finding:
    severity: Severity
    check: str
    tensor: str
    message: str


@dataclass
class AuditSection:
    """The audit of one checkpoint (a file set or a tag)."""

    label: str
    path: str
    tensors: list[TensorStats] = field(default_factory=list)
    moments: list[TensorStats] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


@dataclass
class AuditReport:
    path: str
    sections: list[AuditSection] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def findings(self) -> list[Finding]:
        return [f for s in self.sections for f in s.findings]

    def count(self, severity: Severity) -> int:
        return sum(f.severity == severity for f in self.findings)

    def exit_code(self, fail_on: Severity = "error") -> int:
        """0 healthy, 1 when a finding is at or above ``fail_on``."""
        level = SEVERITIES.index(fail_on)
        return int(any(SEVERITIES.index(f.severity) >= level for f in self.findings))

    def to_json(self) -> dict[str, Any]:
        def clean(obj: Any) -> Any:  # JSON has no NaN: write null
            if isinstance(obj, float) and not math.isfinite(obj):
                return None
            if isinstance(obj, dict):
                return {k: clean(v) for k, v in obj.items()}
            if isinstance(obj, list):
                return [clean(v) for v in obj]
            return obj

        return clean(
            {
                "path": self.path,
                "notes": self.notes,
                "summary": {
                    "tensors": sum(len(s.tensors) for s in self.sections),
                    "errors": self.count("error"),
                    "warnings": self.count("warn"),
                },
                "sections": [asdict(s) for s in self.sections],
            }
        )


# ---------------------------------------------------------------------------------------------
# Streaming statistics


class _Running:
    """Count, mean, M2 (Chan et al. merge), min, max over finite values; NaN and Inf counts."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.nan = 0
        self.inf = 0

    def update(self, chunk: torch.Tensor) -> None:
        if chunk.numel() == 0:
            return
        if not chunk.is_floating_point():
            chunk = chunk.to(torch.float64)
        finite = torch.isfinite(chunk)
        if not bool(finite.all()):
            nan = int(torch.isnan(chunk).sum())
            self.nan += nan
            self.inf += int((~finite).sum()) - nan
            chunk = chunk[finite]
            if chunk.numel() == 0:
                return
        x = chunk.to(torch.float64)
        n = x.numel()
        mean = float(x.mean())
        m2 = float((x - mean).square().sum())
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))

    def fill(self, stats: TensorStats) -> TensorStats:
        stats.nan, stats.inf = self.nan, self.inf
        if self.n:
            stats.mean = self.mean
            stats.std = math.sqrt(self.m2 / self.n)
            stats.min, stats.max = self.min, self.max
            stats.abs_max = max(abs(self.min), abs(self.max))
        return stats


def _stats(name: str, shape: tuple[int, ...], dtype: torch.dtype, kind: str,
           chunks: Iterator[torch.Tensor]) -> TensorStats:  # fmt: skip
    run = _Running()
    for c in chunks:
        run.update(c)
    return run.fill(TensorStats(name, list(shape), str(dtype).replace("torch.", ""), kind,
                                math.prod(shape)))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Sources: (name, shape, dtype, kind, chunk iterator) for each tensor


_Item = tuple[str, tuple[int, ...], torch.dtype, str, Iterator[torch.Tensor]]


def _flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))


def _torch_file_items(path: Path, chunk: int, kinds: dict[str, str]) -> Iterator[_Item]:
    mf = MappedTorchFile(path)
    try:
        for name, t in _flatten(mf.obj):
            kind = kinds.get(name) or _guess_kind(name)
            yield name, tuple(t.shape), t.dtype, kind, _torch_chunks(mf, t, chunk)
    finally:
        mf.close()


def _torch_chunks(mf: MappedTorchFile, t: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
    if not t.is_contiguous():
        yield t.reshape(-1).clone()
        return
    for pos in range(0, t.numel(), chunk):
        n = min(chunk, t.numel() - pos)
        out = torch.empty(n, dtype=t.dtype)
        mf.read_into(out, t, pos, n)
        yield out


_SAFETENSORS_CODES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


def _safetensors_items(path: Path, chunk: int, kinds: dict[str, str]) -> Iterator[_Item]:
    """Tensors of a safetensors file through ``safetensors.safe_open``, read in row blocks of at
    most ``chunk`` elements with ``get_slice`` (one block in memory at a time)."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # the Rust reader raises its own SafetensorError for any bad file
        raise CheckpointError(
            f"{path}: unreadable safetensors file (truncated or not safetensors: {exc})"
        ) from exc
    with handle as fh:
        for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
            piece = fh.get_slice(name)
            code = piece.get_dtype()
            dtype = _SAFETENSORS_CODES.get(code)
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {code}")
            shape = tuple(int(d) for d in piece.get_shape())
            kind = kinds.get(name) or _guess_kind(name)
            yield name, shape, dtype, kind, _slice_chunks(piece, shape, chunk)


def _slice_chunks(piece: Any, shape: tuple[int, ...], chunk: int) -> Iterator[torch.Tensor]:
    if not shape:
        yield piece[...].reshape(-1)
        return
    row = max(1, math.prod(shape[1:]))
    step = max(1, chunk // row)
    for start in range(0, shape[0], step):
        yield piece[start : start + step].reshape(-1)


def _guess_kind(name: str) -> str:
    """Consolidated files do not say what is a buffer; BatchNorm's running stats are by name."""
    return "buffer" if name.endswith(_BUFFER_SUFFIXES) else "tensor"


# ---------------------------------------------------------------------------------------------
# Checks


def _check(stats: TensorStats, section: AuditSection, max_abs: float) -> None:
    name, kind = stats.name, stats.kind
    if stats.nan or stats.inf:
        section.findings.append(Finding("error", "nonfinite", name,
                                        f"{name}: {stats.nan} NaN and {stats.inf} Inf of "
                                        f"{stats.numel} elements"))  # fmt: skip
    if kind == "buffer" or not stats.dtype.startswith(("float", "bfloat")):
        return
    if math.isfinite(stats.abs_max) and stats.abs_max > max_abs:
        section.findings.append(Finding("warn", "abs_max", name,
                                        f"{name}: |x| reaches {stats.abs_max:.4g} (> {max_abs:g})"))  # fmt: skip
    if kind == "frozen" or stats.numel < 2 or stats.nan + stats.inf == stats.numel:
        return
    if _NORM_RE.search(name) and len(stats.shape) == 1 and stats.min == stats.max == 1.0:
        section.findings.append(Finding("warn", "norm_at_init", name,
                                        f"{name}: norm scale still exactly 1.0 everywhere (never "
                                        "updated: lost bf16 updates or no gradient)"))  # fmt: skip
    elif stats.min == stats.max:
        section.findings.append(Finding("warn", "dead", name,
                                        f"{name}: all {stats.numel} elements equal {stats.min:.6g} "
                                        "(std 0: no gradient reached it)"))  # fmt: skip


def _audit_items(section: AuditSection, items: Iterator[_Item], max_abs: float) -> None:
    for name, shape, dtype, kind, chunks in items:
        stats = _stats(name, shape, dtype, kind, chunks)
        section.tensors.append(stats)
        _check(stats, section, max_abs)


def _audit_zero_tag(tag_dir: Path, label: str, max_abs: float, chunk: int,
                    moments: bool) -> AuditSection:  # fmt: skip
    section = AuditSection(label, str(tag_dir))
    with ZeroCheckpoint(tag_dir) as ckpt:
        entries = ckpt.state_dict_entries()
        seen: set[int] = set()
        for name, entry in entries.items():
            if id(entry) in seen:  # a tied name: same tensor, audited once
                continue
            seen.add(id(entry))
            stats = _stats(
                name, entry.shape, entry.dtype, entry.kind, ckpt.iter_chunks(entry, "fp32", chunk)
            )
            section.tensors.append(stats)
            _check(stats, section, max_abs)
        if moments and ckpt.has_moments():
            for name, entry in entries.items():
                if entry.kind != "param" or entry.name != name:
                    continue
                for source in ("exp_avg", "exp_avg_sq"):
                    st = _stats(f"{name}:{source}", entry.shape, torch.float32, "moment",
                                ckpt.iter_chunks(entry, source, chunk))  # fmt: skip
                    section.moments.append(st)
                    if st.nan or st.inf:
                        section.findings.append(Finding(
                            "error", "moments_nonfinite", name,
                            f"{name}: Adam {source} holds {st.nan} NaN and {st.inf} Inf "
                            "(the next update will corrupt the weight)"))  # fmt: skip
    return section


def _tensor_kinds(folder: Path) -> dict[str, str]:
    """``tensor_kinds.json`` written beside consolidated weights (empty when there is none)."""
    path = folder / TENSOR_KINDS_NAME
    if not path.is_file():
        return {}
    try:
        kinds = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc}); delete it or re-consolidate") from None
    if not isinstance(kinds, dict) or not all(
        v in ("param", "frozen", "buffer") for v in kinds.values()
    ):
        raise CheckpointError(f"{path}: expected a map of tensor name -> param|frozen|buffer")
    return {str(k): str(v) for k, v in kinds.items()}


def _audit_files(paths: list[Path], label: str, max_abs: float, chunk: int) -> AuditSection:
    section = AuditSection(label, str(paths[0].parent if len(paths) > 1 else paths[0]))
    kinds = _tensor_kinds(paths[0].parent)
    for path in paths:
        if path.suffix == ".safetensors":
            _audit_items(section, _safetensors_items(path, chunk, kinds), max_abs)
        else:
            check_zip_file(path)
            _audit_items(section, _torch_file_items(path, chunk, kinds), max_abs)
    return section


def audit_path(
    path: str | Path,
    *,
    max_abs: float = 1e3,
    chunk: int = 1 << 24,
    moments: bool = True,
    verify: bool = True,
) -> AuditReport:
    """Audit whatever ``path`` is (see module docstring). Raises CheckpointError if unreadable,
    if a named tag is incomplete (naming the newest complete one) or, unless ``verify=False``,
    if a tag's files do not match its manifest.

    A run directory or checkpoints folder gets one section for its newest complete tag and one
    for ``best`` when ``best`` is complete.
    """
    path = Path(path)
    report = AuditReport(str(path))
    location = resolve_checkpoint(path, verify=verify)
    if location.kind == "consolidated":
        report.sections.append(_audit_consolidated(location, max_abs, chunk))
        return report
    if location.path == path:  # a tag folder given directly
        report.sections.append(_audit_zero_tag(path, path.name, max_abs, chunk, moments))
        return report
    tags = [(f"latest ({location.tag})", location.path)]
    best = resolve_checkpoint(path, prefer="best", verify=verify)
    if best.tag != BEST_TAG and (path / "checkpoints" / BEST_TAG).is_dir():
        report.notes.append(f"{BEST_TAG}: not audited ({best.how.split(';')[0]})")
    if best.tag == BEST_TAG and best.path != location.path:
        tags.append((BEST_TAG, best.path))
    for label, tag_dir in tags:
        report.sections.append(_audit_zero_tag(tag_dir, label, max_abs, chunk, moments))
    return report


def _audit_consolidated(location: CheckpointLocation, max_abs: float, chunk: int) -> AuditSection:
    files = (
        read_shard_index(location.path)
        if location.path.name.endswith(".index.json")
        else [location.path]
    )
    return _audit_files(files, location.path.name, max_abs, chunk)


# ---------------------------------------------------------------------------------------------
# Console table


def _fmt(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.4g}"


def format_report(report: AuditReport, *, all_tensors: bool = True) -> str:
    """The console table per section, then findings and a one-line verdict."""
    lines = []
    for s in report.sections:
        lines.append(f"== {s.label}: {s.path}")
        flagged = {f.tensor for f in s.findings}
        rows = [t for t in s.tensors if all_tensors or t.name in flagged]
        header = ("tensor", "shape", "dtype", "mean", "std", "min", "max", "absmax", "nan", "inf")
        table = [header] + [
            (t.name, "x".join(map(str, t.shape)) or "()", t.dtype, _fmt(t.mean), _fmt(t.std),
             _fmt(t.min), _fmt(t.max), _fmt(t.abs_max), str(t.nan), str(t.inf))
            for t in rows
        ]  # fmt: skip
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        for r in table:
            lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(r, widths, strict=True))))  # fmt: skip
        if s.moments:
            bad = sum(1 for m in s.moments if m.nan or m.inf)
            lines.append(f"optimizer moments: {len(s.moments)} tensors checked, {bad} non-finite")
        for f in s.findings:
            lines.append(f"{f.severity.upper():5s} [{f.check}] {f.message}")
        lines.append("")
    lines += [f"note: {n}" for n in report.notes]
    n_err, n_warn = report.count("error"), report.count("warn")
    total = sum(len(s.tensors) for s in report.sections)
    verdict = "UNHEALTHY" if n_err else ("WARNINGS" if n_warn else "HEALTHY")
    lines.append(f"{verdict}: {total} tensors, {n_err} error(s), {n_warn} warning(s)")
    return "\n".join(lines)
