"""What every sampler shares: the step's output, the noise it may draw, and the Solver interface.

A Solver walks one sampler's timesteps: `step(eps, index, x_t, noise)` takes the network's ε̂ at
`timesteps[index]` and returns diffusers' pair (prev_sample, pred_original_sample). Stochastic steps
call `noise()` for a standard normal tensor shaped like x_t only when they use it, so a deterministic
step leaves each image's stream where it was (core/diffusion/noise.py).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ...config import SampleConfig
from ..schedule import NoiseScheduler
from ..spacing import sampling_timesteps

Noise = Callable[[], torch.Tensor]   # () -> standard normal noise shaped like the batch
ClipRange = tuple[float, float] | None


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor           # x at the next timestep (x_{t−1}, or x_{t_prev} for a few-step sampler)
    pred_original_sample: torch.Tensor  # x̂0 predicted at t


def from_generator(generator: torch.Generator, like: torch.Tensor) -> Noise:
    """A Noise that draws like-shaped standard normals from one generator (a single stream for the batch)."""
    return lambda: torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype)


def draw(noise: Noise | None, like: torch.Tensor) -> torch.Tensor:
    """noise(), or fresh unseeded noise where the caller gave none, as like's dtype and device."""
    z = noise() if noise is not None else torch.randn(like.shape)
    return z.to(like.device, like.dtype)


class Solver:
    """One sampler's reverse steps: the timesteps it visits and the update at each of them."""

    def __init__(self, scheduler: NoiseScheduler, config: SampleConfig, clip_range: ClipRange):
        self.scheduler, self.config, self.clip_range = scheduler, config, clip_range
        self.timesteps = self.make_timesteps()

    def make_timesteps(self) -> list[int]:
        steps = self.config.resolved_steps(self.scheduler.num_timesteps)
        return sampling_timesteps(self.scheduler, steps, self.config.spacing)

    def next_timestep(self, index: int) -> int:
        return self.timesteps[index + 1] if index + 1 < len(self.timesteps) else 0

    def reset(self) -> None:
        """Forget what earlier steps left behind (a new batch starts)."""

    def step(self, eps: torch.Tensor, index: int, x_t: torch.Tensor, noise: Noise | None = None) -> StepOutput:
        raise NotImplementedError
