"""The HDF5 feature store: one validated file every rank reads (layout in docs/store.md)."""

from giblet_ds.store.dataset import StoreDataset
from giblet_ds.store.reader import (
    StoreInfo,
    export_mask_nifti,
    load_mask,
    mask_sha256,
    open_store,
)
from giblet_ds.store.sampler import ResumableDistributedSampler
from giblet_ds.store.schema import SCHEMA_VERSION
from giblet_ds.store.stats import load_target_stats, read_split_subjects, subject_variances
from giblet_ds.store.synthetic import write_synthetic_store

__all__ = [
    "SCHEMA_VERSION",
    "StoreInfo",
    "open_store",
    "load_mask",
    "mask_sha256",
    "export_mask_nifti",
    "StoreDataset",
    "ResumableDistributedSampler",
    "load_target_stats",
    "read_split_subjects",
    "subject_variances",
    "write_synthetic_store",
]
