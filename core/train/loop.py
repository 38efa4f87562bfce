"""The training loop as an object with named steps (in the manner of improved-diffusion's TrainLoop):

    run_loop -> run_step (one batch through Trainer.train_step) -> log_step (one all-reduce, one
    metrics row) -> save (a checkpoint) ... -> finish (the last checkpoint, the final preview).

State (position in the data, the loss window, timers) lives on the object. Under torchrun every
rank runs the same loop on its own block of each global batch (nanoGPT's arrangement):
`master` (rank 0) alone writes the run folder; the ranks' random draws differ by rank (see
`trainer.step_seed`); they agree on stopping at log rows, where one all-reduce carries the loss,
the speed and who wants to stop.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig, SampleConfig
from ..diffusion.guidance import even_labels
from ..diffusion.sampling import sample
from ..store import checkpoint, runs
from ..store.export import save_grid
from .distributed import World, all_reduce_sum, broadcast_object
from .progress import (DiskFull, Progress, ProgressFn, StopRequested, TrainingDiverged, as_reported,
                       divergence_message, eta_seconds)
from .trainer import Trainer

GRID_SAMPLES = 16
GRID_SEED = 1234
FIRST_CHECKPOINT_S = 30.0  # a run's first checkpoint comes after this long or its first epoch, if sooner
PREVIEW_GUIDANCE = 3.0  # the book's γ; a run trained without label dropout previews at γ = 1
HEARTBEAT_S = 10.0  # status.json's "running" is refreshed this often, so a dead trainer shows as stale
FAILURES = {"TrainingDiverged": TrainingDiverged, "DiskFull": DiskFull}  # rank 0's failures the others raise alike


@dataclass
class Position:
    """Where a run stands: training time used, completed epochs, images of this epoch's permutation used."""
    elapsed_s: float = 0.0
    epoch: int = 0
    cursor: int = 0


class TrainLoop:
    """One job's pass from its position to its end (steps, epochs or time budget) or a stop."""

    def __init__(self, run_dir: Path, trainer: Trainer, data: torch.Tensor, labels: torch.Tensor | None,
                 world: World, progress: Progress, *, start: Position, total_steps: int,
                 on_progress: ProgressFn | None = None, stop_event: threading.Event | None = None):
        self.run_dir, self.trainer, self.config = run_dir, trainer, trainer.config
        self.data, self.labels, self.world, self.progress = data, labels, world, progress
        self.on_progress, self.stop_event = on_progress, stop_event
        self.master = world.is_main  # rank 0 alone touches the run folder
        self.batch = self.config.train.batch_size
        self.global_batch = self.batch * world.size
        self.epoch, self.cursor, self.total = start.epoch, start.cursor, total_steps
        self.elapsed_before = start.elapsed_s
        self.metrics = runs.MetricsWriter(run_dir / "metrics.csv") if self.master else None
        self.order = torch.empty(0, dtype=torch.long)
        self.time_up = False  # under torchrun all ranks agree on it at log rows
        self.save_agreed = False  # under torchrun: a checkpoint is due, as rank 0 said at the last log row
        self.saved_at: list[int] = []  # steps checkpointed by this job
        # Non-finite losses are collected on the device (no sync per step on a GPU) and checked at every
        # log row and before every checkpoint; on the CPU of a single process a check costs nothing, so it
        # happens every step. Under torchrun the ranks decide together at log rows, so none leaves alone.
        self.diverged = torch.zeros((), dtype=torch.bool, device=trainer.device)
        self.check_every_step = trainer.device.type == "cpu" and not world.distributed
        self.started = time.perf_counter()
        self.last_checkpoint = self.last_heartbeat = self.started
        # The first checkpoint comes early, so a run killed in its first minutes still resumes.
        self.first_checkpoint_due = self.master and trainer.step == 0 and not checkpoint.exists(run_dir)
        self.window_start = self.started
        self.window_loss: float | torch.Tensor = 0.0
        self.window_count = self.window_images = 0

    # -- the loop ------------------------------------------------------------------------------------
    def run_loop(self) -> bool:
        """Train until the budget is spent; True when a stop request ended it early."""
        try:
            while not self.budget_spent():
                self.start_epoch()
                while self.cursor + self.global_batch <= len(self.data):
                    self.check_stop()
                    self.run_step()
                    if self.trainer.step % self.config.train.log_every == 0 or self.trainer.step == self.total:
                        self.log_step()
                    if self.checkpoint_due():
                        self.save()
                    if self.budget_spent():
                        break
                else:
                    self.end_epoch()
        except StopRequested:
            return True
        finally:
            if self.metrics is not None:
                self.metrics.close()
        return False

    def start_epoch(self) -> None:
        """The permutation of an epoch depends only on (seed, epoch), so a resumed run continues the
        very same epoch where its checkpoint left it."""
        gen = torch.Generator(device="cpu").manual_seed(self.config.train.seed * 100_003 + self.epoch)
        self.order = torch.randperm(len(self.data), generator=gen).to(self.data.device)
        self.progress.epoch = self.epoch + 1

    def run_step(self) -> None:
        """The next global batch of the permutation; rank r takes its block cursor + r·B .. + (r+1)·B,
        so ranks never share an image and 2 ranks × B see the batches 1 process × 2B sees."""
        first = self.cursor + self.world.rank * self.batch
        idx = self.order[first:first + self.batch]
        labels = None if self.labels is None else self.labels[idx]
        loss = self.trainer.train_step(self.trainer.batch(self.data[idx]), labels=labels).detach()
        self.cursor += self.global_batch
        if self.check_every_step:
            value = float(loss)
            if not math.isfinite(value):
                raise TrainingDiverged(divergence_message(f"loss became {value}", self.trainer.step, self.config))
        else:
            self.diverged |= ~torch.isfinite(loss)
        self.window_loss = self.window_loss + loss
        self.window_count += 1
        self.window_images += len(idx)

    def log_step(self) -> None:
        """One all-reduce per log row: Σ losses, Σ steps, Σ images/s over ranks and whether any rank
        wants to stop; one device sync per row. Rank 0 writes the row."""
        now, train, step = time.perf_counter(), self.config.train, self.trainer.step
        wants_stop = self.stop_requested() or bool(train.time_budget_s and self.elapsed() >= train.time_budget_s)
        device = self.trainer.device
        wants_save = self.master and self.time_to_save()  # rank 0's clock decides for all ranks
        sums = torch.stack([torch.as_tensor(self.window_loss, dtype=torch.float64, device=device),
                            *torch.tensor([self.window_count, self.window_images / max(now - self.window_start, 1e-9),
                                           float(wants_stop), float(wants_save)], dtype=torch.float64, device=device)])
        loss_sum, count, ips, stops, saves = all_reduce_sum(sums, self.world).tolist()
        self.save_agreed = saves > 0
        mean_loss = loss_sum / count  # the loss averaged over ranks
        if not math.isfinite(mean_loss):  # every rank sees the same sum: all raise at this same step
            raise TrainingDiverged(divergence_message(f"loss became {mean_loss}", step, self.config))
        if self.world.distributed and stops > 0:  # every rank leaves the loop at this same step
            if self.stop_requested():
                raise StopRequested
            self.time_up = True
        if self.master:
            self.metrics.write({"step": step, "epoch": self.epoch + 1, "loss": mean_loss,
                                "lr": self.trainer.lr_at(step - 1), "elapsed_s": self.elapsed(), "images_per_s": ips})
        progress = self.progress
        progress.steps.append(step)
        progress.losses.append(mean_loss)
        progress.step, progress.images_per_s, progress.elapsed_s = step, ips, self.elapsed()
        progress.eta_s = eta_seconds(progress, train.time_budget_s, self.global_batch)
        self.window_loss, self.window_count, self.window_start, self.window_images = 0.0, 0, now, 0
        self.report()
        if self.master and now - self.last_heartbeat > HEARTBEAT_S:
            runs.write_status(self.run_dir, "running", step=step, world_size=self.world.size)
            self.last_heartbeat = now

    def end_epoch(self) -> None:
        """A checkpoint at every epoch's end, and a preview grid every `sample_every_epochs`."""
        self.epoch, self.cursor = self.epoch + 1, 0
        self.save()
        every = self.config.train.sample_every_epochs
        if every and self.epoch % every == 0 and not self.budget_spent():
            self.preview(f"epoch_{self.epoch:03d}.png")

    def finish(self, stopped: bool) -> Progress:
        """The last checkpoint (unless an epoch end has just written this very step), the final
        preview, the final status."""
        progress, step = self.progress, self.trainer.step
        progress.step, progress.elapsed_s = step, self.elapsed()
        progress.state, progress.message = "stopping" if stopped else "running", "saving"
        self.report()
        if not self.saved_at or self.saved_at[-1] != step:
            self.save()
        if step > 0:
            self.preview("final.png")
        progress.state, progress.message, progress.eta_s = ("stopped" if stopped else "finished"), "", 0.0
        if self.master:
            runs.write_status(self.run_dir, progress.state, step=step, world_size=self.world.size)
        self.report()
        return progress

    # -- named decisions and side effects --------------------------------------------------------------
    def save(self) -> None:
        """A complete checkpoint at the current position, written by rank 0; refused when the loss
        went non-finite. Under torchrun every rank comes here at the same step and learns rank 0's
        outcome, so a full disk or non-finite weights end all ranks at once, rather than leaving the
        others in their next all-reduce until the process-group timeout (NCCL does not notice a dead peer)."""
        failure = None
        if self.master:
            try:
                if bool(self.diverged):  # one device sync
                    raise TrainingDiverged(divergence_message("loss became nan or inf", self.trainer.step, self.config))
                self.trainer.save_checkpoint(self.run_dir, self.epoch, self.elapsed(), epoch_images=self.cursor)
            except Exception as exc:  # noqa: BLE001 - told to the other ranks, then raised here as it is
                failure = exc
        if self.world.distributed:
            told = broadcast_object(None if failure is None else rank0_failure(failure, self.run_dir), self.world)
            if told is not None and failure is None:
                kind, message = told
                raise FAILURES.get(kind, RuntimeError)(message)
        if failure is not None:
            raise failure
        self.saved_at.append(self.trainer.step)
        self.last_checkpoint, self.first_checkpoint_due = time.perf_counter(), False
        self.save_agreed = False

    def checkpoint_due(self) -> bool:
        """Time for a checkpoint: by this process's clock, or under torchrun as agreed at the last log row."""
        return self.save_agreed if self.world.distributed else self.time_to_save()

    def time_to_save(self) -> bool:
        since = time.perf_counter() - self.last_checkpoint
        every = self.config.train.checkpoint_every_s
        return bool(every and since >= every) or (self.first_checkpoint_due and since >= FIRST_CHECKPOINT_S)

    def budget_spent(self) -> bool:
        train = self.config.train
        if not self.world.distributed:  # under torchrun time_up is set at log rows, by all ranks at once
            self.time_up = bool(train.time_budget_s and self.elapsed() >= train.time_budget_s)
        return bool(self.total and self.trainer.step >= self.total) or self.time_up

    def stop_requested(self) -> bool:
        return self.stop_event is not None and self.stop_event.is_set()

    def check_stop(self) -> None:
        """A single process stops at once; under torchrun the ranks stop together at the next log row."""
        if not self.world.distributed and self.stop_requested():
            raise StopRequested

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def report(self) -> None:
        if self.on_progress:
            self.on_progress(self.progress)

    def preview(self, filename: str) -> None:
        if self.master:
            self.progress.latest_grid = str(preview_grid(self.run_dir, self.trainer, filename))
            self.report()


def preview_grid(run_dir: Path, trainer: Trainer, filename: str) -> Path:
    """A 4x4 grid from a fixed seed with the run's preview sampler, so epochs compare tile by tile."""
    config: RunConfig = trainer.config
    train = config.train
    steps = 0 if train.grid_sampler == "ddpm" else min(train.grid_steps, trainer.scheduler.num_timesteps)
    # A conditional run previews classes 0, 1, 2, ... in reading order, guided as the book samples.
    conditional = config.model.conditional
    result = sample(trainer.sampling_model, trainer.scheduler,
                    SampleConfig(sampler=train.grid_sampler, steps=steps, n=GRID_SAMPLES, seed=GRID_SEED),
                    pixel_range=train.pixel_range, clip_default=train.clip_denoised, device=trainer.device,
                    labels=even_labels(GRID_SAMPLES, config.model.num_classes) if conditional else None,
                    guidance=PREVIEW_GUIDANCE if conditional and train.label_dropout > 0 else 1.0,
                    prediction=train.prediction, shape=config.data.shape)
    return save_grid(run_dir / "samples" / filename, result.images, ncol=4)


def rank0_failure(exc: BaseException, run_dir: Path) -> tuple[str, str]:
    """(kind, one line) of rank 0's failure to save, for the other ranks to raise as their own."""
    reported = as_reported(exc, run_dir)
    if type(reported).__name__ in FAILURES:
        return type(reported).__name__, str(reported)
    return "RuntimeError", f"rank 0 could not save the checkpoint ({type(reported).__name__}: {reported})"
