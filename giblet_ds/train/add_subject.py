"""Add a subject to a model with subject heads: a new slot, started as the average subject, fit to
the new subject's volumes with everything else frozen (TRIBE's way of adding a subject).

One process, plain torch (a few thousand to a few million weights move; DeepSpeed would add
nothing): the new slot's residual and bias are the only parameters whose gradient is kept, so
the shared model, every other subject and the average subject stay bit for bit as trained.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from giblet_ds.config import RunConfig
from giblet_ds.errors import GibletError
from giblet_ds.model import GibletAutoencoder
from giblet_ds.store import StoreDataset, StoreInfo, load_mask
from giblet_ds.store.run_splits import with_split_runs
from giblet_ds.train.loss_setup import run_loss

__all__ = ["AddedSubject", "add_subject"]

log = logging.getLogger("giblet_ds")


@dataclass
class AddedSubject:
    """What :func:`add_subject` returns."""

    model: GibletAutoencoder
    """The model with one more subject head (slot ``slot``), in eval mode."""
    cfg: RunConfig
    """The run config of that model (model.n_subjects one higher)."""
    slot: int
    """The new subject's head index."""
    train_loss: list[float]
    """The new subject's normalized fMRI loss on its training TRs: before fitting (the average
    subject's), then after each epoch."""
    val_loss: tuple[float, float]
    """The same on its validation TRs, before and after."""


def add_subject(
    model: GibletAutoencoder,
    cfg: RunConfig,
    store: StoreInfo,
    *,
    subject: int | str = 0,
    epochs: int = 20,
    lr: float = 1e-2,
    batch_size: int = 8,
    seed: int = 0,
) -> AddedSubject:
    """Fit a new subject head on ``subject``'s volumes in ``store`` (a store of the same movie
    and mask as the model's, holding the new subject), starting from the average subject.

    Adam (no weight decay) on the new slot only, ``epochs`` passes over the store's training
    TRs in a ``seed``-fixed order; the loss is the MSE divided by the subject's training
    variance (1.0: predicting its training mean). Raises GibletError when the model has no
    subject heads, or the store does not fit the model (sizes, or a mask that differs from the
    training store's when that store is at hand).
    """
    heads = model.encoder.subjects
    if heads is None:
        raise GibletError(
            "the model has no subject heads and so no average subject to start a new subject "
            "from: train it with data.target=subjects"
        )
    _check_store(cfg, store)
    # a leave-one-run-out fold's model trains the new head on that fold's training runs only
    store = with_split_runs(store, cfg.data.split_runs)
    index = store.subject_index(subject)
    slot = heads.n_subjects
    new = copy.deepcopy(model).eval()  # eval: no dropout, no subject dropout, frozen norms
    new_heads = heads.add_subject()  # SubjectLayers.add_subject: the new slot = the average
    new.encoder.subjects = new_heads
    new_cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, n_subjects=new_heads.n_subjects)
    )
    new.config = new_cfg.model
    for param in new.parameters():
        param.requires_grad_(False)
    for param in (new_heads.down, new_heads.up, new_heads.bias):
        param.requires_grad_(True)
        # zero gradients elsewhere: Adam then moves no other slot (its moments stay 0)
        keep = torch.zeros(param.shape[0], *[1] * (param.dim() - 1))
        keep[slot] = 1.0
        param.register_hook(lambda grad, keep=keep: grad * keep)
    optimizer = torch.optim.Adam([new_heads.down, new_heads.up, new_heads.bias], lr=lr)

    one = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, store=str(store.path), subject=index, target="mean"))  # fmt: skip
    train, val = (StoreDataset.for_run(store, split, one) for split in ("train", "val"))
    # the subject's training variance, and the run's target smoothing (data.smoothing_fwhm_mm):
    # the new head fits the targets the model's heads were trained on
    run = run_loss(one, store)
    var, smoothing = run.variances.fmri, run.fmri_smoothing
    order = torch.Generator().manual_seed(seed)
    train_loss = [_loss(new, train, slot, var, batch_size, smoothing)]
    val_start = _loss(new, val, slot, var, batch_size, smoothing)
    for _ in range(epochs):
        for rows in torch.randperm(len(train), generator=order).split(batch_size):
            batch = _batch(train, rows.tolist())
            loss = _mse(new, batch, slot, smoothing) / var
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        train_loss.append(_loss(new, train, slot, var, batch_size, smoothing))
    val_loss = (val_start, _loss(new, val, slot, var, batch_size, smoothing))
    for param in new.parameters():
        param.requires_grad_(True)
    train.close()
    val.close()
    log.info("subject %s as head %d: training loss %.4f -> %.4f, validation %.4f -> %.4f",
             store.subjects[index], slot, train_loss[0], train_loss[-1], *val_loss)  # fmt: skip
    return AddedSubject(new, new_cfg, slot, train_loss, val_loss)


def _check_store(cfg: RunConfig, store: StoreInfo) -> None:
    """The model's input sizes (voxels included) and, when the training store is at hand, its
    mask: the new subject's voxels must be the model's voxels."""
    problems = []
    sizes = store.model_input_sizes()
    for key, have in sizes.items():
        want = getattr(cfg.model, key)
        if want is not None and want != have:
            problems.append(f"model.{key}={want} but the store {store.path} has {have}")
    trained_on = Path(cfg.data.store)
    same_mask = (
        problems
        or not cfg.data.store
        or not trained_on.is_file()
        or np.array_equal(load_mask(trained_on)[0], load_mask(store.path)[0])
    )
    if not same_mask:
        problems.append(
            f"the store {store.path} has another brain mask than the training store "
            f"{trained_on}: build the new subject's store with --mask set to the training "
            "store's mask (giblet_ds.store.export_mask_nifti writes it)"
        )
    if problems:
        raise GibletError("the new subject's store does not fit the model:\n  - "
                          + "\n  - ".join(problems))  # fmt: skip


def _batch(data: StoreDataset, rows: list[int]) -> dict[str, torch.Tensor]:
    samples = [data[i] for i in rows]
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def _mse(
    model: GibletAutoencoder,
    batch: dict[str, torch.Tensor],
    slot: int,
    smoothing: torch.nn.Module | None,
) -> torch.Tensor:
    out = model(batch["video"], batch["audio_codes"], batch["text"], batch.get("context_mask"))
    assert out.fmri_subjects is not None
    target = batch["fmri"] if smoothing is None else smoothing(batch["fmri"])
    return (out.fmri_subjects[:, slot].float() - target).pow(2).mean()


@torch.no_grad()
def _loss(
    model: GibletAutoencoder,
    data: StoreDataset,
    slot: int,
    var: float,
    batch_size: int,
    smoothing: torch.nn.Module | None,
) -> float:
    """Normalized MSE of head ``slot`` over every TR of ``data`` (element-weighted)."""
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        rows = list(range(start, min(len(data), start + batch_size)))
        total += _mse(model, _batch(data, rows), slot, smoothing).item() * len(rows)
        count += len(rows)
    return total / count / var
