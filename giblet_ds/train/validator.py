"""Validation as the Trainer runs it: the reference it is judged against, early stopping, the record.

Built once per run (collective: rank 0 reads the subjects and broadcasts the reference); each
:meth:`Validator.run` scores the whole validation split (train/evaluate.py, exact across ranks),
updates early stopping, writes a ``val`` record and the dashboard images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from giblet_ds.config import RunConfig
from giblet_ds.errors import GibletError
from giblet_ds.losses import NormalizedLoss
from giblet_ds.run.records import ValRecord
from giblet_ds.store import StoreDataset, StoreInfo, load_mask, load_target_stats
from giblet_ds.train import distributed as dist
from giblet_ds.train.early_stopping import EarlyStopping
from giblet_ds.train.evaluate import ValReference, evaluate, val_reference
from giblet_ds.train.run_log import RunLog
from giblet_ds.train.val_images import frame_pair, r_map_mosaic

__all__ = ["Validator"]

log = logging.getLogger("giblet_ds")

ToDevice = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class Validator:
    """The validation split, its reference (reliable voxels, ceiling, the constant's term) and
    early stopping on ``train.early_stopping.metric``.

    With subject heads the metric is still the average-subject output's score against the subject
    mean (fmri_r_reliable by default): it picks ``best``. Each subject's own head is scored beside
    it on the same reliable voxels and written to the val record
    (``fmri_r_reliable_by_subject``), for the record and the health report only."""

    def __init__(
        self, cfg: RunConfig, store: StoreInfo, data: StoreDataset, loss_fn: NormalizedLoss
    ) -> None:
        self.cfg, self.store, self.data, self.loss_fn = cfg, store, data, loss_fn
        self.reference = self._build_reference()
        es = cfg.train.early_stopping
        self.early_stopping = EarlyStopping(es.mode, es.patience, es.min_delta)

    @property
    def noise_ceiling(self) -> float | None:
        """The ceiling logged beside the validation r: the mean over the reliable voxels of
        sqrt(Spearman-Brown reliability of the target) on the validation TRs; None with one
        subject. Never a whole-mask average: most voxels there carry no signal."""
        return self.reference.ceiling_reliable

    def _build_reference(self) -> ValReference:
        """Rank 0 reads the subjects; every rank receives the reference, since early stopping
        reads the reliable-voxel r everywhere."""
        ref = None
        if dist.is_rank0():
            subject = self.cfg.data.subject
            index = None if subject is None else self.store.subject_index(subject)
            stats = load_target_stats(self.store.path, subject=index, info=self.store)["fmri"]
            ref = val_reference(
                self.store,
                subject=index,
                threshold=self.cfg.data.reliable_isc_threshold,
                train_mean=stats["mean"],
                train_var=stats["var"],
                smoothing=self.loss_fn.fmri_smoothing,
                smoothed_var=self.loss_fn.variances.fmri,
            )
            log.info("validation reference: %s; the training-mean constant scores %.4f (fMRI "
                     "term) on the validation TRs", ref.note, ref.constant_term)  # fmt: skip
        reference: ValReference = dist.broadcast_object(ref)
        if self.cfg.train.early_stopping.metric == "fmri_r_normalized":
            # resolve() refuses a store of one subject; a ceiling of 0 on the reliable voxels
            # (subjects that do not agree on the validation TRs) is known only now, and validation
            # would log no fmri_r_normalized to stop on.
            ceiling = reference.ceiling_reliable
            if ceiling is None or ceiling <= 0:
                why = (
                    f"the store {self.store.path} holds one subject"
                    if reference.ceiling is None
                    else f"the mean ceiling of the reliable voxels on the validation TRs is "
                    f"{ceiling:.4g}"
                )
                raise GibletError(
                    f"train.early_stopping.metric=fmri_r_normalized needs a noise ceiling > 0, "
                    f"but {why}; set train.early_stopping.metric=fmri_r_reliable"
                )
        return reference

    def scores(
        self, engine: Any, to_device: ToDevice, keep: dict[str, Any] | None = None
    ) -> dict[str, float]:
        """Loss terms and fMRI scores over the whole validation split (see train/evaluate.py)."""
        return evaluate(
            engine,
            self.data,
            self.loss_fn,
            micro_batch_size=self.cfg.optim.micro_batch_size,
            to_device=to_device,
            reference=self.reference,
            keep=keep,
        )

    def run(
        self, engine: Any, to_device: ToDevice, run_log: RunLog, *, step: int, epoch: int
    ) -> tuple[bool, bool]:
        """Validate and log; returns (is_best, stop) with stop agreed on by every rank."""
        keep: dict[str, Any] = {}
        metrics = self.scores(engine, to_device, keep)
        es = self.cfg.train.early_stopping
        is_best = self.early_stopping.update(metrics[es.metric], step)
        # All ranks computed identical reduced metrics; rank 0's decision is broadcast anyway so
        # that no float quirk can split the ranks.
        stop = bool(dist.broadcast_object(self.early_stopping.should_stop))
        run_log.write(
            ValRecord(
                step=step,
                epoch=epoch,
                loss=metrics["loss"],
                terms={k[5:]: v for k, v in metrics.items() if k.startswith("loss_")},
                **{k: v for k, v in metrics.items() if k.startswith("fmri_")},
                fmri_noise_ceiling_r=self.noise_ceiling,
                fmri_n_reliable=self.reference.n_reliable,
                fmri_constant_term=self.reference.constant_term,
                fmri_r_reliable_by_subject=self._by_subject(keep),
                is_best=is_best,
                best_metric=self.early_stopping.best,
                patience_left=self.early_stopping.patience_left,
            )
        )
        log.info(
            "validation at step %d: loss %.4f, fMRI r %.4f (reliable voxels %.4f)%s",
            step,
            metrics["loss"],
            metrics["fmri_r_mean"],
            metrics["fmri_r_reliable"],
            " (best)" if is_best else "",
        )
        self._log_images(run_log, keep, step)
        return is_best, stop

    def _by_subject(self, keep: dict[str, Any]) -> dict[str, float] | None:
        """Each subject's own-head r on the reliable voxels by subject id (subject heads only)."""
        values = keep.get("fmri_r_reliable_by_subject")
        if values is None:
            return None
        return dict(zip(self.store.subjects, values, strict=True))

    def stop_reason(self) -> str:
        es = self.cfg.train.early_stopping
        return (
            f"{es.metric} did not improve by {es.min_delta} for {es.patience} validations; best "
            f"{self.early_stopping.best:.6g} at step {self.early_stopping.best_step}"
        )

    def _log_images(self, run_log: RunLog, keep: dict[str, Any], step: int) -> None:
        """The brain r map and a few reconstructed frames, as images on the dashboard."""
        if not run_log.wants_images:
            return
        mask, _ = load_mask(self.store.path)
        images = {"val/r_map": r_map_mosaic(keep["per_voxel_r"], mask)}
        for i, (true, predicted) in enumerate(keep.get("frames", [])):
            images[f"val/reconstruction_{i}"] = frame_pair(
                true, predicted, self.store.height, self.store.width
            )
        run_log.log_images(step, images)
