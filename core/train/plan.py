"""How long a run trains and where in its data it stands: steps per epoch, the final step, the
epoch position of a checkpoint. Pure arithmetic on counts, shared by the loop, the CLI's early
checks and the dashboard's estimates.
"""
from __future__ import annotations

from ..config import ConfigError, RunConfig


def steps_per_epoch(n_images: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per pass over the data at a global batch of batch_size × world_size. The
    ragged tail is dropped: every step sees a full batch on every rank."""
    return max(1, n_images // (batch_size * world_size))


def check_data_fits(n_images: int, batch_size: int, world_size: int = 1) -> None:
    """Every rank needs at least one full batch per epoch, or the epoch has no step at all."""
    if batch_size * world_size <= n_images:
        return
    if world_size == 1:
        raise ConfigError(f"batch_size = {batch_size} is not allowed: it exceeds the {n_images} training images; "
                          "lower it")
    raise ConfigError(f"batch_size = {batch_size} per process × {world_size} processes = {batch_size * world_size} "
                      f"is not allowed: it exceeds the {n_images} training images, so some rank would get no "
                      "batch; lower --batch-size or the number of processes")


def total_steps_for(config: RunConfig, n_images: int, world_size: int = 1, *, step: int = 0, epoch: int = 0,
                    epoch_images: int = 0) -> int:
    """The step a run ends at: after `epochs` passes or at max_steps, whichever comes first; 0 when
    the time budget alone bounds it. Counted on from a position (step, completed epochs, images of
    the current epoch consumed), so a run resumed at another global batch still ends at its epoch."""
    train = config.train
    global_batch = train.batch_size * world_size
    limits = []
    if train.epochs:
        left = 0 if epoch >= train.epochs else \
            (n_images - epoch_images) // global_batch + (train.epochs - epoch - 1) * (n_images // global_batch)
        limits.append(step + left)
    if train.max_steps:
        limits.append(train.max_steps)
    return min(limits) if limits else 0


def checkpoint_position(meta: dict[str, str], step: int, n_images: int, batch_size: int) -> tuple[int, int]:
    """(completed epochs, images of the current epoch consumed) at the checkpoint of `step`, from the
    loaded weights' metadata."""
    try:
        epoch, epoch_images = int(meta["epoch"]), int(meta["epoch_images"])
        if epoch < 0 or not 0 <= epoch_images <= n_images:
            raise ValueError("out of range")
        return epoch, epoch_images
    except (KeyError, ValueError):
        # A checkpoint from before world sizes existed was written by one process at `batch_size`.
        per_epoch = steps_per_epoch(n_images, batch_size)
        epoch = step // per_epoch
        return epoch, (step - epoch * per_epoch) * batch_size
