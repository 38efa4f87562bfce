"""Per-image noise streams: image i of a request with seed s gets the same x_T and the same step noise
whatever the batch size, the device and the other images requested.

Each image owns a CPU `torch.Generator` seeded from (s, i) through numpy's SeedSequence, which mixes
the pair so that nearby seeds and indices give unrelated streams. x_T is the stream's first draw; every
noise draw of a stochastic step (DDPM, DDIM η > 0, DPM-Solver++ SDE) takes the next image-sized block.
Drawing on the CPU makes the numbers the same on every device; they are moved to the batch's device.
"""
from __future__ import annotations

import numpy as np
import torch


def image_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for image `index` of a request with `seed`."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class ImageNoise:
    """The noise streams of images first .. first + count − 1, drawn as one (count, *shape) batch."""

    def __init__(self, seed: int, first: int, count: int, shape: tuple[int, ...],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.shape, self.device, self.dtype = tuple(shape), torch.device(device), dtype
        self.generators = [torch.Generator(device="cpu").manual_seed(image_seed(seed, first + i))
                           for i in range(count)]

    def __call__(self) -> torch.Tensor:
        """The next standard normal block of every image's stream, stacked along the batch."""
        draws = [torch.randn(self.shape, generator=g, dtype=self.dtype) for g in self.generators]
        return torch.stack(draws).to(self.device)
