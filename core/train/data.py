"""The training data: loading it (rank 0 first under torchrun), checking it, and putting it on the device.

Kept apart from the loop so a change of image format (other sizes, channels) stays here and in
`Trainer.batch`: the loop only indexes the tensor these functions return.
"""
from __future__ import annotations

import os

import torch

from ..config import ConfigError, DataConfig, RunConfig
from ..data.datasets import DatasetNotFoundError, ImageSet
from ..data.sources import load_run_images
from .distributed import World, broadcast_object
from .plan import check_data_fits


def load_training_images(data: DataConfig, data_root: str | os.PathLike | None, world: World) -> ImageSet:
    """The run's training images (`load_run_images`). Under torchrun rank 0 alone prepares them (a
    first run unpacks or downloads a built-in dataset, or decodes a folder into its cache) while the
    others wait, then every other rank reads what it prepared: two ranks writing the same temporary
    file would tear it. A missing dataset or a bad folder is the same one-line error on every rank."""
    if not world.distributed:
        return load_run_images(data, "train", data_root)
    images, error = None, None
    if world.is_main:
        try:
            images = load_run_images(data, "train", data_root)
        except (DatasetNotFoundError, ConfigError, OSError) as exc:
            error = (type(exc).__name__, str(exc))
    error = broadcast_object(error, world)  # also the barrier: no rank reads before rank 0 is done
    if error is not None:
        kind, message = error
        raise DatasetNotFoundError(message) if kind == "DatasetNotFoundError" else ConfigError(message)
    return images if images is not None else load_run_images(data, "train", data_root)


def training_data(images: ImageSet, config: RunConfig, device: torch.device,
                  world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels) of the run's training set on the device: the uint8 tensor the loop indexes
    (the whole set, 47 MB for FashionMNIST's 60k) and, for a conditional run, its labels. Checked
    before anything is copied: the dtype and shape, a full batch for every rank, the labels."""
    train = config.train
    data = images.images[: train.limit_images] if train.limit_images else images.images
    if not torch.is_tensor(data) or data.dtype != torch.uint8 or tuple(data.shape[1:]) != config.data.shape:
        # Floats in [0, 1] would be divided by 255 again and train on near-black images, silently.
        got = f"{data.dtype} {tuple(data.shape)}" if torch.is_tensor(data) else type(data).__name__
        raise ConfigError(f"images = {got} is not allowed: training expects uint8 images of shape "
                          f"(N, {', '.join(map(str, config.data.shape))}) with pixels 0..255 (see core.data.ImageSet)")
    check_data_fits(len(data), train.batch_size, world_size)
    labels = training_labels(images, len(data), config).to(device) if config.model.conditional else None
    return data.to(device), labels


def training_labels(images: ImageSet, n: int, config: RunConfig) -> torch.Tensor:
    """The class labels of the n training images in use, checked against the network's classes."""
    labels = images.labels[:n] if images.labels is not None else None
    if not torch.is_tensor(labels) or labels.shape != (n,) or labels.dtype not in (torch.int64, torch.int32):
        raise ConfigError("labels is not allowed: a conditional run needs one integer label per training image "
                          "(core.data.ImageSet.labels)")
    k = config.model.num_classes
    if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ConfigError(f"num_classes = {k} is not allowed: the training labels run from {int(labels.min())} "
                          f"to {int(labels.max())}")
    return labels.long()
