"""One place that turns the image layouts the project passes around into uint8 (N, C, H, W).

Today's datasets hand over grayscale images as (N, H, W); image folders hand over (N, C, H, W).
Every evaluation module goes through `as_nchw`, so both layouts work and a wrong one fails with
one line that says what was expected.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import ConfigError


def as_nchw(images, what: str = "images") -> torch.Tensor:
    """uint8 (N, H, W) -> (N, 1, H, W); uint8 (N, C, H, W) with C in {1, 3} passes unchanged."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not torch.is_tensor(images):
        images = torch.as_tensor(images)
    if images.dtype != torch.uint8:
        raise ConfigError(f"{what} dtype = {images.dtype} is not allowed: expected uint8 pixels")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(f"{what} shape = {tuple(images.shape)} is not allowed: expected uint8 (N, H, W) "
                          "or (N, C, H, W) with C = 1 or 3")
    return images


def image_shape(images) -> tuple[int, int, int]:
    """(C, H, W) of a batch in either layout."""
    return tuple(int(s) for s in as_nchw(images).shape[1:])  # type: ignore[return-value]
