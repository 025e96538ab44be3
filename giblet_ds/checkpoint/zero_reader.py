"""Read a DeepSpeed ZeRO-1/2/3 checkpoint tag lazily, one parameter at a time.

A tag holds, per data-parallel rank, a flat fp32 partition of every parameter group (in the
``*_optim_states.pt`` files, next to the Adam moments) and the model metadata (names, shapes,
buffers) in the ``*_model_states.pt`` files. Files are opened with ``torch.load(mmap=True,
weights_only=True)`` so only their pickles are parsed; parameter bytes are then read with positional
reads straight from the file into the output tensor, so neither the moments nor the other parameters
are ever resident. Where each parameter's bytes live is :mod:`zero_layout`'s job.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from giblet_ds.checkpoint.mapped_file import MappedTorchFile
from giblet_ds.checkpoint.zero_layout import ParamEntry, Piece, zero2_entries, zero3_entries
from giblet_ds.errors import CheckpointError
from giblet_ds.run.resolver import resolve_checkpoint

__all__ = ["ZeroCheckpoint", "ParamEntry", "Piece", "Source"]

Source = Literal["fp32", "exp_avg", "exp_avg_sq"]
_RANK_RE = re.compile(r"^(?P<prefix>(?:bf16_|fp16_)?)zero_pp_rank_(?P<rank>\d+)_mp_rank_(?P<mp>\d+)"
                      r"_optim_states\.pt$")  # fmt: skip


@dataclass
class _ModelStates:
    buffer_names: list[str]
    module: dict[str, torch.Tensor]
    param_shapes: list[dict[str, Any]]
    frozen_shapes: dict[str, Any]
    frozen_fragments: dict[str, torch.Tensor]
    shared: dict[str, str]


class ZeroCheckpoint:
    """A DeepSpeed ZeRO tag, opened lazily. Use as a context manager (closes file descriptors).

    >>> with ZeroCheckpoint.open("run/checkpoints") as ckpt:   # doctest: +SKIP
    ...     for name, entry in ckpt.state_dict_entries().items():
    ...         weight = ckpt.read(entry)
    """

    def __init__(self, tag_dir: Path) -> None:
        self.tag_dir = tag_dir
        self._files: list[MappedTorchFile] = []
        model_file = tag_dir / "mp_rank_00_model_states.pt"
        z3_file = tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"
        if z3_file.is_file():
            self.layout_stage3 = True
            model_file = z3_file
        elif model_file.is_file():
            self.layout_stage3 = False
        else:
            raise CheckpointError(
                f"{tag_dir}: no DeepSpeed model-state file (expected mp_rank_00_model_states.pt "
                "or zero_pp_rank_0_mp_rank_00_model_states.pt)"
            )
        model0 = self._open(model_file)
        meta = model0.obj
        if not isinstance(meta, dict) or "buffer_names" not in meta or "param_shapes" not in meta:
            raise CheckpointError(f"{model_file}: not a DeepSpeed model-state file")
        self.model_meta: dict[str, Any] = {k: v for k, v in meta.items() if k != "module"}
        mp = int(meta.get("mp_world_size", 1) or 1)
        if mp != 1:
            raise CheckpointError(
                f"{model_file}: tensor-parallel checkpoints (mp={mp}) are not supported"
            )
        self.world_size, self.optim_files, self.model_files = self._expected_files(meta, model_file)
        self.ds_version: str | None = meta.get("ds_version")

        models = [model0] + [self._open(p) for p in self.model_files[1:]]
        self._models = [self._model_states(m) for m in models]
        self._optim = [self._open(p) for p in self.optim_files]
        self.stage, self._fp32, self._moments = self._read_optim_meta()
        if self.layout_stage3 != (self.stage == 3):
            raise CheckpointError(
                f"{tag_dir}: optimizer files say ZeRO stage {self.stage} but the model-state file "
                f"names are those of stage {'3' if self.layout_stage3 else '1/2'}"
            )

    # -- construction helpers ------------------------------------------------------------------

    @classmethod
    def open(
        cls, checkpoint_dir: str | Path, tag: str | None = None, *, verify: bool = True
    ) -> ZeroCheckpoint:
        """Open ``checkpoint_dir/tag``, or what :func:`giblet_ds.run.resolve_checkpoint` picks in a
        checkpoints folder or run directory, or a tag folder given directly (complete tags only;
        checked against the tag's manifest unless ``verify=False``)."""
        location = resolve_checkpoint(checkpoint_dir, tag=tag, verify=verify)
        if location.kind != "tag":
            raise CheckpointError(f"{location.path}: consolidated weights, not a ZeRO tag")
        return cls(location.path)

    def _open(self, path: Path) -> MappedTorchFile:
        mf = MappedTorchFile(path)
        self._files.append(mf)
        return mf

    def _expected_files(
        self, meta: dict[str, Any], model_file: Path
    ) -> tuple[int, list[Path], list[Path]]:
        """Every rank file the tag must hold; fail naming the missing ones before reading any."""
        found = {}
        for p in self.tag_dir.iterdir():
            m = _RANK_RE.match(p.name)
            if m:
                found[p.name] = (m.group("prefix"), int(m.group("rank")))
        if any(self.tag_dir.glob("*expp_rank_*")):
            raise CheckpointError(
                f"{self.tag_dir}: mixture-of-experts checkpoints are not supported"
            )
        prefixes = sorted({prefix for prefix, _ in found.values()})
        if len(prefixes) > 1:
            raise CheckpointError(
                f"{self.tag_dir}: optimizer files with different prefixes {prefixes}: two saves "
                "were mixed in one tag folder"
            )
        prefix = prefixes[0] if prefixes else ""
        ws = meta.get("dp_world_size")
        if not isinstance(ws, int) or ws < 1:
            # DeepSpeed versions before dp_world_size was saved: trust the file count.
            ws = max((r for _, r in found.values()), default=-1) + 1
        optim = [self.tag_dir / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                 for r in range(max(ws, 1))]  # fmt: skip
        if self.layout_stage3:
            models = [self.tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"
                      for r in range(max(ws, 1))]  # fmt: skip
        else:
            models = [model_file]
        missing = [p.name for p in optim + models if not p.is_file()]
        if missing:
            raise CheckpointError(
                f"{self.tag_dir}: checkpoint of {ws} data-parallel rank(s) is incomplete, missing "
                f"{len(missing)} file(s): {', '.join(missing)} (a rank did not finish saving, or "
                "files were not copied)"
            )
        extra = sorted(n for n, (_, r) in found.items() if r >= ws)
        if extra:
            raise CheckpointError(
                f"{self.tag_dir}: files of ranks beyond the world size {ws}: {', '.join(extra)} "
                "(a stale save from a larger run was left in this tag folder)"
            )
        return ws, optim, models

    def _model_states(self, mf: MappedTorchFile) -> _ModelStates:
        sd = mf.obj
        if not isinstance(sd, dict) or "module" not in sd:
            raise CheckpointError(f"{mf.path}: not a DeepSpeed model-state file")
        return _ModelStates(
            buffer_names=list(sd.get("buffer_names") or []),
            module=sd["module"],
            param_shapes=list(sd.get("param_shapes") or []),
            frozen_shapes=dict(sd.get("frozen_param_shapes") or {}),
            frozen_fragments=dict(sd.get("frozen_param_fragments") or {}),
            shared=dict(sd.get("shared_params") or {}),
        )

    def _read_optim_meta(
        self,
    ) -> tuple[int, list[list[torch.Tensor]], dict[str, list[list[torch.Tensor | None]]]]:
        fp32: list[list[torch.Tensor]] = []
        moments: dict[str, list[list[torch.Tensor | None]]] = {"exp_avg": [], "exp_avg_sq": []}
        stage: int | None = None
        for mf in self._optim:
            osd = mf.obj.get("optimizer_state_dict") if isinstance(mf.obj, dict) else None
            if not isinstance(osd, dict) or "zero_stage" not in osd:
                raise CheckpointError(f"{mf.path}: not a ZeRO optimizer-state file (no zero_stage)")
            s = int(osd["zero_stage"])
            if stage is not None and s != stage:
                raise CheckpointError(f"{mf.path}: ZeRO stage {s}, rank 0 has stage {stage}")
            stage = s
            count = osd.get("partition_count")
            count = max(count) if isinstance(count, list) else count
            if count is not None and int(count) != self.world_size:
                raise CheckpointError(
                    f"{mf.path}: partitioned over {count} ranks but the tag has {self.world_size} "
                    "(files from different saves?)"
                )
            key = "fp32_flat_groups" if s == 3 else "single_partition_of_fp32_groups"
            groups = osd.get(key)
            if not isinstance(groups, list) or not all(isinstance(t, torch.Tensor) for t in groups):
                raise CheckpointError(f"{mf.path}: no fp32 partitions under {key!r}")
            fp32.append(groups)
            base = osd.get("optimizer_state_dict" if s == 3 else "base_optimizer_state")
            for name in moments:
                moments[name].append(_moment_groups(base, name, len(groups)))
        assert stage is not None
        if stage not in (1, 2, 3):
            raise CheckpointError(f"{self.tag_dir}: unsupported ZeRO stage {stage}")
        ngroups = {len(g) for g in fp32}
        if len(ngroups) != 1:
            raise CheckpointError(f"{self.tag_dir}: ranks disagree on the number of param groups")
        self._alignment = self._optim[0].obj["optimizer_state_dict"].get("param_alignment_paddings")
        return stage, fp32, moments

    # -- public API ----------------------------------------------------------------------------

    @property
    def tag(self) -> str:
        return self.tag_dir.name

    def files(self) -> list[Path]:
        """Every file of the tag this reader uses (model states first)."""
        return list(dict.fromkeys(self.model_files + self.optim_files))

    def has_moments(self) -> bool:
        return all(all(t is not None for t in groups) for groups in self._moments["exp_avg"])

    def state_dict_entries(
        self, exclude_frozen_parameters: bool = False
    ) -> OrderedDict[str, ParamEntry]:
        """Name -> entry, in the order DeepSpeed's ``zero_to_fp32`` builds its state dict.

        Buffers (floating ones as fp32), frozen parameters, trainable parameters, then tied names.
        """
        m0 = self._models[0]
        out: OrderedDict[str, ParamEntry] = OrderedDict()
        names = set(m0.buffer_names)
        for name, t in m0.module.items():
            if name in names:
                dtype = torch.float32 if t.is_floating_point() else t.dtype
                out[name] = ParamEntry(name, tuple(t.shape), dtype, "buffer", tensor=t,
                                       requires_grad=t.requires_grad)  # fmt: skip
        if not exclude_frozen_parameters:
            for name, shape in m0.frozen_shapes.items():
                frag = m0.frozen_fragments.get(name)
                if frag is None:
                    raise CheckpointError(
                        f"{self.tag_dir}: frozen parameter {name} has no fragment"
                    )
                out[name] = ParamEntry(name, tuple(shape), frag.dtype, "frozen",
                                       requires_grad=frag.requires_grad)  # fmt: skip
        for entry in self._trainable_entries():
            out[entry.name] = entry
        for alias, target in m0.shared.items():
            if target in out:
                out[alias] = out[target]
        return out

    def _trainable_entries(self) -> list[ParamEntry]:
        shapes = self._models[0].param_shapes
        if len(shapes) != len(self._fp32[0]):
            raise CheckpointError(
                f"{self.tag_dir}: {len(shapes)} parameter groups in the model states but "
                f"{len(self._fp32[0])} in the optimizer states"
            )
        if self.stage == 3:
            return zero3_entries(self.tag_dir, shapes, self._fp32, self.optim_files)
        return zero2_entries(self.tag_dir, shapes, self._fp32, self._alignment)

    def read(
        self, entry: ParamEntry, source: Source = "fp32", out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The full tensor of ``entry`` (contiguous; only its bytes are read from disk).

        ``source`` picks the fp32 master weights or an Adam moment (same layout, trainable
        parameters only). ``out``, a 1-D float32 tensor of at least ``entry.numel`` elements,
        receives a parameter's bytes instead of a fresh allocation: reusing one buffer avoids
        faulting in new pages for every tensor, which costs more than the read itself.
        """
        if entry.kind == "buffer":
            assert entry.tensor is not None
            t = entry.tensor
            return t.float() if t.is_floating_point() else t.clone()
        if entry.kind == "frozen":
            return self._read_frozen(entry)
        groups: list[list[torch.Tensor]] | list[list[torch.Tensor | None]]
        groups = self._fp32 if source == "fp32" else self._moments[source]
        if out is None:
            out = torch.empty(entry.numel, dtype=torch.float32)
        elif out.dtype != torch.float32 or out.dim() != 1 or out.numel() < entry.numel:
            raise ValueError(f"out must be 1-D float32 with >= {entry.numel} elements")
        out = out[: entry.numel]
        pos = 0
        for piece in entry.pieces:
            src = groups[piece.rank][piece.group]
            if src is None:
                raise CheckpointError(f"{self.optim_files[piece.rank]}: no {source} state saved")
            take = min(piece.numel, entry.numel - pos)
            self._optim[piece.rank].read_into(out[pos : pos + take], src, piece.start, take)
            pos += take
            if pos >= entry.numel:
                break
        return out.view(entry.shape)

    def iter_chunks(
        self, entry: ParamEntry, source: Source = "fp32", chunk: int = 1 << 24
    ) -> Iterator[torch.Tensor]:
        """The flat elements of ``entry`` in order, at most ``chunk`` at a time (bounded memory)."""
        if entry.kind != "param":
            yield self.read(entry, source).reshape(-1)
            return
        groups: list[list[torch.Tensor]] | list[list[torch.Tensor | None]]
        groups = self._fp32 if source == "fp32" else self._moments[source]
        left = entry.numel
        for piece in entry.pieces:
            src = groups[piece.rank][piece.group]
            if src is None:
                raise CheckpointError(f"{self.optim_files[piece.rank]}: no {source} state saved")
            pos, end = piece.start, piece.start + min(piece.numel, left)
            while pos < end:
                n = min(chunk, end - pos)
                out = torch.empty(n, dtype=src.dtype)
                self._optim[piece.rank].read_into(out, src, pos, n)
                yield out
                pos += n
                left -= n
            if left <= 0:
                return

    def _read_frozen(self, entry: ParamEntry) -> torch.Tensor:
        frags = [m.frozen_fragments[entry.name] for m in self._models]
        if self.stage != 3:
            return frags[0].reshape(entry.shape).clone()
        flat = torch.cat([f.reshape(-1) for f in frags])
        return flat[: entry.numel].reshape(entry.shape).clone()

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> ZeroCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _moment_groups(base: Any, name: str, ngroups: int) -> list[torch.Tensor | None]:
    """Per-group Adam moment tensors from a base optimizer state dict (None where absent)."""
    states: Any = None
    if isinstance(base, dict):
        states = base.get("state")
    elif isinstance(base, list):  # older DeepSpeed: one optimizer state dict per group
        states = {g: (b.get("state", {}).get(0, {}) if isinstance(b, dict) else {})
                  for g, b in enumerate(base)}  # fmt: skip
    out: list[torch.Tensor | None] = []
    for g in range(ngroups):
        st = states.get(g) if isinstance(states, dict) else None
        t = st.get(name) if isinstance(st, dict) else None
        out.append(t if isinstance(t, torch.Tensor) else None)
    return out
