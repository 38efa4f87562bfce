"""Training a run folder: `train_run`, the one entry the CLI, the dashboard's jobs and the queue call.

It takes the run's lock, reads its config, loads the data, builds the `Trainer` (trainer.py),
restores its checkpoint on resume and hands over to the `TrainLoop` (loop.py); any failure marks
the run failed (or interrupted, when a torchrun peer died) in status.json with one line. The names
callers import from here (Trainer, Progress, DiskFull, TrainingDiverged, check_data_fits, ...) are
re-exported from the modules that define them.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import torch

from ..config import ConfigError, RunConfig
from ..data.datasets import ImageSet
from ..device import resolve_device
from ..errors import RunError
from ..models import budget
from ..store import checkpoint, runs
from .data import load_training_images, training_data, training_labels
from .distributed import World, broadcast_object, current_world, device_for, is_peer_failure, peer_failure_message
from .loop import FIRST_CHECKPOINT_S, GRID_SAMPLES, GRID_SEED, PREVIEW_GUIDANCE, Position, TrainLoop, preview_grid
from .plan import check_data_fits, checkpoint_position, steps_per_epoch, total_steps_for
from .progress import (DiskFull, Progress, ProgressFn, StopRequested, TrainingDiverged, as_reported,
                       divergence_message)
from .trainer import EMA, Trainer, build_optimizer, min_snr_weight, step_seed

__all__ = ["DiskFull", "EMA", "FIRST_CHECKPOINT_S", "GRID_SAMPLES", "GRID_SEED", "PREVIEW_GUIDANCE", "Progress",
           "ProgressFn", "StopRequested", "Trainer", "TrainingDiverged", "build_optimizer", "check_data_fits",
           "checkpoint_position", "divergence_message", "min_snr_weight", "preview_grid", "step_seed",
           "steps_per_epoch", "total_steps_for", "train_run", "training_labels"]


def train_run(run_dir: Path, *, resume: bool = False, images: ImageSet | None = None,
              data_root: str | None = None, on_progress: ProgressFn | None = None,
              stop_event: threading.Event | None = None, lock: runs.RunLock | None = None) -> Progress:
    """Train the run in `run_dir` (created with runs.create_run) until it finishes or is stopped.

    Holds the run's lock for the whole job (taking it first thing, unless the caller passes the lock
    it already holds), so a second trainer of the same run is refused with `runs.RunBusy`. Returns
    the final Progress; raises on failure after marking the run failed in status.json (or
    interrupted, when another rank of a torchrun job died). Under torchrun every rank calls this;
    rank 0 alone locks, reads and writes the run folder and sends the others what they need.
    """
    run_dir = Path(run_dir)
    world = current_world()
    held = (lock or runs.RunLock(run_dir)) if world.is_main else contextlib.nullcontext()
    with held:
        config = None
        if world.is_main:  # a missing folder raises here, before any status could be written
            checkpoint.remove_stale_temp_files(run_dir)
            config = runs.load_config(run_dir)
            if (run_dir / "samples").is_symlink():  # grids are written there: never through a planted link
                checkpoint.real_folder(run_dir / "samples")
        if world.distributed:
            config = RunConfig.from_json(broadcast_object(config.to_json() if config else None, world))
        progress = Progress(run_name=run_dir.name, run_dir=str(run_dir))
        try:
            loop = _build_loop(run_dir, config, resume, images, data_root, on_progress, stop_event, progress, world)
            return loop.finish(stopped=loop.run_loop())
        except BaseException as exc:
            _record_failure(exc, run_dir, progress, world, on_progress)
            reported = as_reported(exc, run_dir)
            if reported is exc:
                raise
            raise reported from None


def _build_loop(run_dir: Path, config: RunConfig, resume: bool, images: ImageSet | None, data_root: str | None,
                on_progress: ProgressFn | None, stop_event: threading.Event | None, progress: Progress,
                world: World) -> TrainLoop:
    """Device, data, trainer and position (restored on resume), then the loop that trains from there."""
    train = config.train
    device = device_for(world, resolve_device(train.device))
    budget.check_training_fits(config, device)  # before a byte is allocated: a shared config may ask for 100s of GB
    progress.device = str(device) if not world.distributed else f"{world.size} × {device.type}"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed image shapes: autotuning pays off at once
    progress.message = "loading data"
    if on_progress:
        on_progress(progress)
    if images is None:
        images = load_training_images(config.data, data_root, world)
    data, labels = training_data(images, config, device, world.size)

    trainer = Trainer(config, device, world)
    start = Position()
    if resume:
        start = _restore(run_dir, trainer, len(data), world)
    total = total_steps_for(config, len(data), world.size, step=trainer.step, epoch=start.epoch,
                            epoch_images=start.cursor)
    if world.is_main:
        for row in runs.read_metrics(run_dir):
            progress.steps.append(int(row["step"]))
            progress.losses.append(row["loss"])
    progress.total_steps, progress.step, progress.epochs = total, trainer.step, train.epochs
    progress.state, progress.message = "running", ""
    loop = TrainLoop(run_dir, trainer, data, labels, world, progress, start=start, total_steps=total,
                     on_progress=on_progress, stop_event=stop_event)
    if world.is_main:
        runs.write_status(run_dir, "running", step=trainer.step, world_size=world.size)
    loop.report()
    return loop


def _restore(run_dir: Path, trainer: Trainer, n_images: int, world: World) -> Position:
    """Rank 0 reads the last complete checkpoint and cuts metrics.csv back to its step; every rank
    then gets its weights, optimizer state and position."""
    start = Position()
    if world.is_main:
        start.elapsed_s = trainer.load_checkpoint(run_dir)
        if trainer.step > 0:
            start.epoch, start.cursor = checkpoint_position(trainer.resumed_metadata, trainer.step, n_images,
                                                            trainer.config.train.batch_size)
        runs.truncate_metrics(run_dir, trainer.step)
    trainer.sync_from_main()
    return Position(*broadcast_object((start.elapsed_s, start.epoch, start.cursor), world))


def _record_failure(exc: BaseException, run_dir: Path, progress: Progress, world: World,
                    on_progress: ProgressFn | None) -> None:
    """One line in progress and (rank 0) in status.json: failed, or interrupted when a peer died."""
    peer_failed = is_peer_failure(exc)
    raised = as_reported(exc, run_dir)
    message = peer_failure_message(exc) if peer_failed else \
        str(raised) if isinstance(raised, (TrainingDiverged, ConfigError, RunError, DiskFull)) else \
        f"{type(raised).__name__}: {raised}"
    progress.state, progress.error = "failed", message
    if world.is_main:
        # A dead peer is not this run's fault: it shows as interrupted and resumes from its checkpoint.
        runs.write_status(run_dir, "interrupted" if peer_failed else "failed", error=message, step=progress.step)
    if on_progress:
        on_progress(progress)
