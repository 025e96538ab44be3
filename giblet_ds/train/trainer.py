"""The training loop: one DeepSpeed engine, the feature store, validation, checkpoints, logs."""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from giblet_ds.config import RunConfig, config_to_dict
from giblet_ds.config.resume_rules import ResumePlan
from giblet_ds.errors import GibletError
from giblet_ds.losses import NormalizedLoss
from giblet_ds.model import (
    GibletAutoencoder,
    format_counts,
    parameter_counts,
    train_flops_per_sample,
)
from giblet_ds.resolve import resolve
from giblet_ds.run.layout import BEST_TAG, RunDir, step_tag
from giblet_ds.run.lock import RunLock
from giblet_ds.run.records import CheckpointRecord, EndRecord, StartRecord, TrainRecord
from giblet_ds.store import (
    ResumableDistributedSampler,
    StoreDataset,
    StoreInfo,
    load_target_stats,
    mask_sha256,
)
from giblet_ds.train import distributed as dist
from giblet_ds.train import faults
from giblet_ds.train.checkpointer import Checkpointer, check_store_hash
from giblet_ds.train.device_health import device_name, memory_snapshot, peak_flops, read_devices
from giblet_ds.train.engine import build_engine
from giblet_ds.train.hrf_start import mixer_start
from giblet_ds.train.launch_env import slurm_job
from giblet_ds.train.loss_setup import run_loss
from giblet_ds.train.preemption import PreemptionWatch
from giblet_ds.train.resume import (
    apply_resumed_settings,
    early_stopping_note,
    replan_note,
    run_length,
    saved_schedule,
)
from giblet_ds.train.rng import capture_rng_state, restore_rng_state, seed_everything
from giblet_ds.train.run_log import RunLog, setup_file_logging, wandb_run_id
from giblet_ds.train.schedule import Schedule
from giblet_ds.train.steps import SkipCounter, StepResult, accumulation_groups, mfu
from giblet_ds.train.validator import Validator

__all__ = ["Trainer"]

log = logging.getLogger("giblet_ds")


class Trainer:
    """Builds everything in one readable order; :meth:`train` runs until done, early-stopped or
    failed, and always writes an ``end`` record saying which."""

    cfg: RunConfig
    run: RunDir
    rank: int
    world_size: int
    store: StoreInfo
    engine: Any
    model: GibletAutoencoder
    loss_fn: NormalizedLoss
    train_data: StoreDataset
    val_data: StoreDataset
    sampler: ResumableDistributedSampler
    steps_per_epoch: int
    max_steps: int
    validator: Validator
    skips: SkipCounter
    checkpointer: Checkpointer
    run_log: RunLog

    def __init__(
        self, cfg: RunConfig, ds_json: dict[str, Any], *, verify_checkpoint: bool = True
    ) -> None:
        """``verify_checkpoint=False`` skips checking the resumed tag against its manifest."""
        self._init_process_group(cfg.checkpoint.run_dir)
        try:
            self._build(cfg, ds_json, verify_checkpoint=verify_checkpoint)
        except BaseException:
            if self.run_lock is not None:  # this start failed: the folder is free again
                self.run_lock.release()
            raise

    def _build(self, cfg: RunConfig, ds_json: dict[str, Any], *, verify_checkpoint: bool) -> None:
        resolved = resolve(cfg, ds_json=ds_json, world_size=self.world_size)
        assert resolved.store is not None and resolved.ds_config is not None
        self.cfg, self.store = resolved.cfg, resolved.store
        self._build_data()
        self.checkpointer = Checkpointer(self.run, keep_last=self.cfg.checkpoint.keep_last)
        self.checkpointer.clear_staging()
        resume = self.checkpointer.resume_target(
            self.cfg.checkpoint.resume,
            cfg=self.cfg,
            store=self.store,
            sampler=self.sampler,
            ds_config=resolved.ds_config,
            verify=verify_checkpoint,
        )
        self._build_engine(resolved.ds_config)
        self.validator = Validator(self.cfg, self.store, self.val_data, self.loss_fn)
        self._init_counters()
        self._build_logging(resuming=resume is not None)
        if resume is not None:
            self.load_state_dict(self.checkpointer.load(self.engine, resume.location), resume.plan)
            log.info("resumed from %s at step %d (epoch %d)", resume.location.path, self.step,
                     self.epoch)  # fmt: skip
            for note in self.resume_notes:
                log.warning("resume: %s", note)
        log.info("parameters:\n%s", format_counts(self.counts))

    # ---------------------------------------------------------------------------------- build

    def _init_process_group(self, run_dir: str) -> None:
        dist.init_distributed()
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.run = RunDir.of(run_dir)
        self.run_lock: RunLock | None = None
        refusal = None
        if self.rank == 0:
            self.run.checkpoints.mkdir(parents=True, exist_ok=True)
            # Before anything is written or cleared: another job may own this folder.
            self.run_lock = RunLock(self.run.lock)
            try:
                self.run_lock.acquire()
            except GibletError as exc:
                self.run_lock, refusal = None, str(exc)
        refusal = dist.broadcast_object(refusal)  # every rank stops, with the same message
        if refusal is not None:
            raise GibletError(refusal)
        setup_file_logging(self.run.path, enabled=self.rank == 0)
        if self.run_lock is not None and self.run_lock.took_over is not None:
            log.warning(
                "took over the lock of a run that ended: %s", self.run_lock.took_over.describe()
            )

    def _build_data(self) -> None:
        cfg, store = self.cfg, self.store
        self.train_data, self.val_data = (
            StoreDataset.for_run(store, split, cfg) for split in ("train", "val")
        )
        self.sampler = ResumableDistributedSampler(
            len(self.train_data),
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=True,
            seed=cfg.train.seed,
            drop_last=True,
        )
        o = cfg.optim
        self.steps_per_epoch = self.sampler.num_samples // o.samples_per_rank_step
        if self.steps_per_epoch == 0:
            raise GibletError(
                f"the train split has {len(self.train_data)} TRs: too few for one optimizer step of "
                f"{o.micro_batch_size} x {o.grad_accum_steps} per rank on {self.world_size} ranks; "
                "lower optim.micro_batch_size or optim.grad_accum_steps"
            )
        self.max_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch

    def _build_engine(self, ds_config: dict[str, Any]) -> None:
        cfg = self.cfg
        stats = load_target_stats(self.store.path, subject=cfg.data.subject, info=self.store)
        means = {k: torch.from_numpy(stats[k]["mean"]).float() for k in ("fmri", "video", "text")}
        # Python's and numpy's streams differ per rank. torch's is then reset by build_engine to
        # one seed on every rank (identical initial weights), so data-parallel ranks share one
        # dropout stream, as Megatron-LM's data-parallel ranks do: same masks, different samples.
        # Re-seeding each rank after the build (rank 0 then replays the stream its initial weights
        # came from) scored 0.377 on make demo's test split against 0.392 with the shared stream,
        # one run each (BENCHMARKS.md, "Settings x seeds"): not shown to help, so it stays shared.
        seed_everything(cfg.train.seed + self.rank)
        self.mixer_start = mixer_start(cfg.model, self.store.lag, self.store.tr)
        self.engine, self.model = build_engine(
            cfg, ds_config, self.max_steps, means, self.mixer_start
        )
        self.loss_fn = run_loss(cfg, self.store)
        self.counts = parameter_counts(self.model)
        self.flops_per_sample = train_flops_per_sample(self.counts, self.cfg.model.context_trs)
        self.device_name = device_name()
        self.peak_flops = peak_flops(self.device_name)
        # bf16 engines take bf16 activations
        self.input_dtype = next(iter(self.engine.module.parameters())).dtype

    def _init_counters(self) -> None:
        self.step = 0
        self.epoch = 0
        self.skips = SkipCounter()
        self._last_saved_step = -1
        self.preemption = PreemptionWatch()
        self.preempted_by: str | None = None
        self.schedule = Schedule.of(self.cfg, self.max_steps)
        self.resume_changes: dict[str, list[Any]] = {}
        self.resume_notes: list[str] = []

    def _build_logging(self, *, resuming: bool) -> None:
        config = config_to_dict(self.cfg)
        self.run_log = RunLog(
            self.run.path,
            enabled=self.rank == 0,
            wandb_mode=self.cfg.logging.wandb_mode,
            wandb_project=self.cfg.logging.wandb_project,
            wandb_run_name=self.cfg.logging.wandb_run_name,
            wandb_run_id=wandb_run_id(self.run, resuming=resuming) if self.rank == 0 else "",
            config=config,
        )
        if self.rank == 0:
            self.run.config.write_text(yaml.safe_dump(config, sort_keys=False))

    # ---------------------------------------------------------------------------------- loop

    def train(self) -> str:
        """Run to max_steps or early stop; returns the end status."""
        status, reason = "failed", "exception"
        job_id, restarts = slurm_job(os.environ)
        self.run_log.write(
            StartRecord(
                world_size=self.world_size,
                config=config_to_dict(self.cfg),
                param_counts=self.counts,
                steps_per_epoch=self.steps_per_epoch,
                max_steps=self.max_steps,
                start_step=self.step,
                store=str(self.store.path),
                store_hash=self.store.build_hash,
                fmri_noise_ceiling_r=self.validator.noise_ceiling,
                device=self.device_name,
                peak_flops=self.peak_flops,
                mixer_start=None if self.mixer_start is None else self.mixer_start.tolist(),
                launch=dist.launch_source(),
                slurm_job_id=job_id,
                slurm_restart_count=restarts,
                resume_changes=self.resume_changes,
                resume_notes=self.resume_notes,
            )
        )
        try:
            with self.preemption:
                if self.preemption.agreed(self.engine.device):
                    # Signalled during start-up: what is on disk (the resumed tag, or nothing) is
                    # where the next start begins; no step was taken, so nothing new to save.
                    self.preempted_by = self.preemption.signal_name()
                    status, reason = "preempted", self._preempted_at_start_reason()
                    return status
                while self.step < self.max_steps:
                    if self._train_epoch():
                        status, reason = self._stop_status()
                        break
                    self.epoch += 1
                else:
                    status, reason = "finished", f"reached max_steps={self.max_steps}"
            return status
        except GibletError as exc:
            reason = str(exc)
            raise
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            try:
                self.run_log.write(EndRecord(step=self.step, status=status, reason=reason))
            except GibletError as exc:  # a full disk: the run's own error is the one to raise
                if status != "failed":
                    raise
                log.error("%s", exc)
            log.info("run %s at step %d: %s", status, self.step, reason)
            self.run_log.close()

    def _train_epoch(self) -> bool:
        """One pass over this rank's shard (continuing mid-epoch after a resume). True: stop
        (early stopping, or a preemption signal after its save)."""
        self.sampler.set_epoch(self.epoch)
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=max(self.steps_per_epoch - self._steps_left_in_epoch(), 0),
            desc=f"epoch {self.epoch}",
            disable=self.rank != 0 or not self.cfg.logging.progress_bar,
            dynamic_ncols=True,
        )
        stop = False
        with bar:
            for micro_batches in self._step_batches():
                started = time.perf_counter()
                self.step += 1
                result = self.train_step(micro_batches)
                self.sampler.advance(self.cfg.optim.micro_batch_size * len(micro_batches))
                seconds = time.perf_counter() - started
                self._after_step(result, seconds)
                faults.maybe_signal(self.step, self.rank)
                faults.maybe_slow_down()
                bar.update(1)
                bar.set_postfix(
                    loss=f"{result.loss:.4f}",
                    lr=f"{result.lr:.2e}",
                    samples_s=f"{self._global_batch / seconds:.1f}",
                )
                if self._due(self.cfg.train.val_every_steps, end_of_epoch=False):
                    stop = self._validate_and_checkpoint()
                if self._due(self.cfg.checkpoint.save_every_steps, end_of_epoch=False) or stop:
                    self.save(step_tag(self.step))
                if self._steps_left_in_epoch() > 0:  # the epoch's last step: below
                    faults.maybe_kill(self.step, self.rank)
                    if not stop and self.step < self.max_steps and self._stop_for_preemption():
                        return True
                if stop or self.step >= self.max_steps:
                    break
        if not stop and self._due(self.cfg.train.val_every_steps, end_of_epoch=True):
            stop = self._validate_and_checkpoint()
        at_end = self.step >= self.max_steps or stop
        if self._due(self.cfg.checkpoint.save_every_steps, end_of_epoch=True) or at_end:
            self.save(step_tag(self.step))
        faults.maybe_kill(self.step, self.rank)
        if not at_end and self._stop_for_preemption():
            return True
        return stop

    def _stop_for_preemption(self) -> bool:
        """At a step boundary (after that step's validation and saves): when any rank received
        SIGTERM/SIGUSR1, every rank saves this step's tag and the loop stops. Collective."""
        if not self.preemption.agreed(self.engine.device):
            return False
        self.preempted_by = self.preemption.signal_name()
        self.save(step_tag(self.step))
        return True

    def _stop_status(self) -> tuple[str, str]:
        if self.preempted_by is None:
            return "early_stopped", self.validator.stop_reason()
        return "preempted", (
            f"{self.preempted_by} received: stopped after step {self.step}, saved as "
            f"{step_tag(self.step)}; the same command resumes from it"
        )

    def _preempted_at_start_reason(self) -> str:
        latest = self.run.latest_tag()
        where = f"resumes from {latest}" if latest else "starts from scratch"
        return (
            f"{self.preempted_by} received during start-up, before step {self.step + 1}: "
            f"nothing new to save; the same command {where}"
        )

    def _steps_left_in_epoch(self) -> int:
        """Optimizer steps this rank still takes in the epoch (after a resume on another world
        size: the rest of the epoch's samples split over this world)."""
        return len(self.sampler) // self.cfg.optim.samples_per_rank_step

    def _step_batches(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        loader = DataLoader(
            self.train_data,
            batch_size=self.cfg.optim.micro_batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=self.cfg.data.num_workers,
            # The loader draws its workers' base seed when an epoch starts; from torch's global
            # stream that draw would shift every dropout mask after a mid-epoch resume (which
            # starts its loader after the saved RNG state is restored): its own stream instead.
            generator=torch.Generator().manual_seed(self.cfg.train.seed + self.epoch),
        )
        steps = self._steps_left_in_epoch()
        return accumulation_groups(loader, self.cfg.optim.grad_accum_steps, steps)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """Forward, normalized loss, backward and one optimizer step over the micro batches.

        The loss and its terms are the step's: averaged over every micro batch of every rank (one
        small all-reduce), so a logged curve does not change with the number of ranks."""
        self.engine.train()
        lr = self._lr()
        names: list[str] = []
        sums: torch.Tensor | None = None  # [loss, *terms by name], summed over micro batches
        for batch in micro_batches:
            batch = self._to_device(batch)
            faults.maybe_poison(batch, self.step, self.rank)
            output = self.engine(
                batch["video"], batch["audio_codes"], batch["text"], batch.get("context_mask")
            )
            result = self.loss_fn(output, batch)
            self.engine.backward(result.total)
            self.engine.step()
            names = sorted(result.terms)
            values = torch.stack(
                [result.total.detach()] + [result.terms[k].detach() for k in names]
            )
            sums = values.double() if sums is None else sums + values.double()
        assert sums is not None, "an optimizer step needs at least one micro batch"
        # Equal micro batches on every rank: the mean of the micro-batch means is the global
        # batch's mean. A non-finite term anywhere makes its sum non-finite on every rank.
        means = (dist.all_reduce_sum(sums) / (len(micro_batches) * self.world_size)).tolist()
        terms = dict(zip(names, means[1:], strict=True))
        bad = [k for k, v in terms.items() if not math.isfinite(v)]
        return StepResult(
            loss=means[0],
            terms=terms,
            applied=bool(self.engine.was_step_applied()) and not bad,
            lr=lr,
            nonfinite_terms=bad,
        )

    def _after_step(self, result: StepResult, seconds: float) -> None:
        skipped = self.skips.update(result, self.step)
        if skipped is not None:
            self.run_log.write(skipped)
            self.skips.check(skipped, self.cfg.train.max_consecutive_skips)
        if self.step % self.cfg.logging.log_every_steps:
            return
        samples = self._global_batch
        grad_norm = self.engine.get_global_grad_norm()
        self.run_log.write(
            TrainRecord(
                step=self.step,
                epoch=self.epoch,
                loss=result.loss,
                terms=result.terms,
                lr=result.lr,
                grad_norm=None if grad_norm is None else float(grad_norm),
                skipped_steps=self.skips.total,
                step_time_s=seconds,
                samples_per_s=samples / seconds,
                mfu=mfu(self.flops_per_sample, samples, seconds, self.peak_flops, self.world_size),
                memory=memory_snapshot(),
                devices=read_devices(),
            )
        )

    # ---------------------------------------------------------------------------- validation

    def _due(self, every: int, *, end_of_epoch: bool) -> bool:
        """A periodic action (validate, save) every ``every`` steps, or at epoch ends when 0."""
        return end_of_epoch if every == 0 else (not end_of_epoch and self.step % every == 0)

    def validate(self) -> dict[str, float]:
        """Loss terms and fMRI scores over the whole validation split (see train/evaluate.py)."""
        return self.validator.scores(self.engine, self._to_device)

    def _validate_and_checkpoint(self) -> bool:
        """Validate, save `best` on improvement, log; True when early stopping says stop."""
        is_best, stop = self.validator.run(
            self.engine, self._to_device, self.run_log, step=self.step, epoch=self.epoch
        )
        if is_best:
            self.save(BEST_TAG)
        return stop

    # --------------------------------------------------------------------------- checkpoints

    def save(self, tag: str) -> None:
        """Save a tag on every rank (see Checkpointer.save); a step already saved is skipped."""
        if tag != BEST_TAG and self._last_saved_step == self.step:
            return  # this step is already on disk under its step tag
        config_yaml = yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)
        tag_dir = self.checkpointer.save(
            self.engine,
            tag,
            step=self.step,
            state=self.state_dict(),
            config_yaml=config_yaml,
            store_hash=self.store.build_hash,
            mask_hash=_mask_hash(self.store.path, self.store.build_hash),
        )
        self.run_log.write(CheckpointRecord(step=self.step, tag=tag, path=str(tag_dir)))
        if tag != BEST_TAG:
            self._last_saved_step = self.step

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs beside the engine's own state (collective: RNG states are
        gathered from every rank)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "sampler": self.sampler.state_dict(),
            "rng": dist.all_gather_object(capture_rng_state()),
            "early_stopping": self.validator.early_stopping.state_dict(),
            "schedule": self.schedule.state_dict(),
            **self.skips.state_dict(),
            "config": config_to_dict(self.cfg),
            "store_hash": self.store.build_hash,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any], plan: ResumePlan | None = None) -> None:
        """Restore what :meth:`state_dict` saved, then apply what ``plan`` (the resume's checked
        changes, docs/resume.md) changes; refuses a checkpoint of another store."""
        plan = plan or ResumePlan(self.cfg)
        check_store_hash(state["store_hash"], self.store)
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.skips.load_state_dict(state)
        self.resume_changes = plan.changes
        if plan.restart_early_stopping is None:
            self.validator.early_stopping.load_state_dict(state["early_stopping"])
        else:
            metric = self.cfg.train.early_stopping.metric
            self.resume_notes.append(
                early_stopping_note(state["early_stopping"], metric, plan.restart_early_stopping)
            )
        self.sampler.load_state_dict(state["sampler"])
        self.max_steps = run_length(
            self.cfg,
            step=self.step,
            epoch=self.epoch,
            steps_left_in_epoch=self._steps_left_in_epoch(),
            steps_per_epoch=self.steps_per_epoch,
        )
        saved = saved_schedule(state, plan.saved)
        self.schedule = Schedule.of(self.cfg, self.max_steps).continuing(
            saved, self.engine.lr_scheduler.last_epoch
        )
        if (note := replan_note(saved, self.schedule)) is not None:
            self.resume_notes.append(note)
        apply_resumed_settings(self.engine, self.cfg, self.schedule)
        if self._steps_left_in_epoch() == 0:
            # Saved after the epoch's last step, its validation and its save: go on with the next
            # epoch instead of validating (and counting toward early stopping) a second time.
            self.epoch += 1
        rng = state["rng"]
        if len(rng) == self.world_size:
            restore_rng_state(rng[self.rank])
        else:  # a new world size cannot replay per-rank streams; reseed deterministically
            seed_everything(self.cfg.train.seed + 1000 * self.step + self.rank)

    # ------------------------------------------------------------------------------- helpers

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = self.engine.device
        out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        for key in ("video", "text"):  # bf16 engines take bf16 activations
            out[key] = out[key].to(self.input_dtype)
        return out

    @property
    def _global_batch(self) -> int:
        return self.cfg.optim.global_batch(self.world_size)

    def _lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def close(self) -> None:
        self.train_data.close()
        self.val_data.close()
        self.run_log.close()
        if self.run_lock is not None:
            self.run_lock.release()


@functools.cache
def _mask_hash(path: Path, build_hash: str) -> str:
    """The store's mask hash for every tag's metadata (read once per store build)."""
    return mask_sha256(path)
