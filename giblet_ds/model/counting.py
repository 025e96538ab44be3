"""Parameter counts per submodule, summed and checked against the total."""

from __future__ import annotations

from torch import nn

__all__ = [
    "PARAMETER_GROUPS",
    "format_counts",
    "numel",
    "parameter_counts",
    "train_flops_per_sample",
]

# Reporting groups: dotted module paths inside GibletAutoencoder. The fMRI head counts as encoder,
# as the old system counted it (encoder 3,235,947,138 + decoder 264,241,152). ``encoder.temporal``
# (the mixer of the context window) exists only when model.context_trs > 1 and is left out of the
# counts otherwise, so a one-TR model reports exactly the groups it always did.
# ``encoder.subjects`` (subject heads) exists only when model.n_subjects > 0, likewise.
OPTIONAL_GROUPS = ("encoder.temporal", "encoder.subjects")
# Groups whose weights run once per TR of the context window (k times per sample): FLOPs here and
# the activation estimate (giblet_ds.memory_estimate) both read this tuple.
PER_TR_GROUPS = ("encoder.video", "encoder.audio", "encoder.text", "encoder.trunk")
PARAMETER_GROUPS = (
    "encoder.video",
    "encoder.audio",
    "encoder.text",
    "encoder.trunk",
    "encoder.temporal",
    "encoder.fmri_head",
    "encoder.subjects",
    "decoder.trunk",
    "decoder.video",
    "decoder.audio",
    "decoder.text",
)


def numel(param: nn.Parameter) -> int:
    """Full element count, also for a ZeRO-3 partitioned parameter (its local tensor is empty)."""
    return int(getattr(param, "ds_numel", param.numel()))


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Counts per group, plus ``encoder``, ``decoder`` and ``total``; the groups must cover the model."""
    counts = {group: 0 for group in PARAMETER_GROUPS}
    total = 0
    for name, param in model.named_parameters():
        n = numel(param)
        total += n
        group = next((g for g in PARAMETER_GROUPS if name.startswith(g + ".")), None)
        if group is None:
            raise ValueError(f"parameter {name} belongs to no counting group {PARAMETER_GROUPS}")
        counts[group] += n
    for group in OPTIONAL_GROUPS:
        if counts[group] == 0:
            del counts[group]
    counts["encoder"] = sum(v for k, v in counts.items() if k.startswith("encoder."))
    counts["decoder"] = sum(v for k, v in counts.items() if k.startswith("decoder."))
    counts["total"] = total
    if counts["encoder"] + counts["decoder"] != total:
        raise AssertionError(
            f"parameter groups sum to {counts['encoder'] + counts['decoder']}, not {total}"
        )
    return counts


def format_counts(counts: dict[str, int]) -> str:
    """A table with thousands separators, for the start of a run and the dry run."""
    width = max(len(k) for k in counts)
    lines = [f"{name:<{width}}  {value:>15,}" for name, value in counts.items()]
    return "\n".join(lines)


def train_flops_per_sample(counts: dict[str, int], context_trs: int = 1) -> int:
    """FLOPs of one training sample (forward and backward): 6 per parameter use.

    Every weight of a dense layer does one multiply-add (2 FLOPs) per sample forward and two
    backward (input and weight gradients), the 6N rule of Kaplan et al. (2020), eq. 2.1. The model
    is almost all dense matrices (REFERENCE.md), so norms, embeddings lookups and losses are noise.
    With ``context_trs`` = k the per-TR encoders (video, audio, text) and the trunk run on each of
    the k TRs of the window, so their parameters count k times: 6 * (k * N_per_TR + N_rest). The
    audio code table is inside ``encoder.audio`` and counted k times too, though a lookup does no
    arithmetic.
    """
    per_tr = sum(counts.get(group, 0) for group in PER_TR_GROUPS)
    return 6 * (counts["total"] + (context_trs - 1) * per_tr)
