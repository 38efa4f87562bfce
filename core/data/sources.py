"""One entry point from a run's `DataConfig` to its images: built-in datasets or an image folder.

`load_run_images(config.data, "train")` is what training, sampling previews, the bench and the
evaluation call; it returns uint8 (N, C, H, W) at the run's shape whatever the source, so nothing
downstream asks where the pixels came from. A built-in dataset asked for at another size or
channel count goes through the same transforms as a folder (core.data.transforms).
"""
from __future__ import annotations

import os

from ..config import DataConfig
from .datasets import ImageSet, load_images
from .transforms import conform


def load_run_images(data: DataConfig, split: str = "train", data_root: str | os.PathLike | None = None,
                    *, cache_dir: str | os.PathLike | None = None, allow_change: bool = False) -> ImageSet:
    """The run's images of `split` as uint8 (N, C, H, W) at `data.shape`.

    A folder has one split only (its images are the training set; "test" is refused there), is read
    through the decoded cache under `cache_dir`, and is refused when its fingerprint differs from the
    one the run recorded (a queued or resumed run never trains on other data unnoticed), unless
    `allow_change` (the CLI records the new fingerprint on `--resume --allow-data-change` instead).
    """
    if data.dataset == "folder":
        from .folder import load_folder  # the folder reader imports PIL plugins: only when a folder is used
        return load_folder(data, split, cache_dir=cache_dir, allow_change=allow_change)
    images = load_images(data.dataset, split, data_root)
    if images.shape == data.shape:
        return images
    return ImageSet(images=conform(images.images, data.image_size, data.channels), labels=images.labels,
                    dataset=images.dataset, split=images.split, class_names=images.class_names)
