"""The giblet autoencoder (torch only: no deepspeed or torch.distributed here)."""

from giblet_ds.model.autoencoder import GatherFn, GibletAutoencoder, GibletOutput
from giblet_ds.model.counting import (
    PARAMETER_GROUPS,
    format_counts,
    numel,
    parameter_counts,
    train_flops_per_sample,
)

__all__ = [
    "GatherFn",
    "GibletAutoencoder",
    "GibletOutput",
    "PARAMETER_GROUPS",
    "format_counts",
    "numel",
    "parameter_counts",
    "train_flops_per_sample",
]
