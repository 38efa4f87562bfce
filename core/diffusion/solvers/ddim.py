"""DDIM (Song, Meng, Ermon 2021): any number of steps t -> t_prev, η between 0 (deterministic) and 1.

    x̂0 = (x_t − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t)                                       (eq. 12, first term)
    σ_t(η) = η·sqrt((1 − ᾱ_prev)/(1 − ᾱ_t))·sqrt(1 − ᾱ_t/ᾱ_prev)                     (eq. 16)
    x_prev = sqrt(ᾱ_prev)·x̂0 + sqrt(1 − ᾱ_prev − σ_t²)·ε̂ + σ_t·z                    (eq. 12)

t_prev = 0 is the clean image (ᾱ_0 = 1), where σ vanishes and x_prev = x̂0. With x̂0 clipped, ε̂ is
recomputed from the clipped x̂0 so that the two stay consistent (diffusers' DDIMScheduler with
clip_sample, set_alpha_to_one, and "trailing" timesteps).
"""
from __future__ import annotations

import torch

from ..schedule import NoiseScheduler, at_timestep
from .base import ClipRange, Noise, Solver, StepOutput, draw


def ddim_step(scheduler: NoiseScheduler, eps: torch.Tensor, t: int, t_prev: int, x_t: torch.Tensor, *,
              eta: float = 0.0, clip_range: ClipRange = None, noise: Noise | None = None) -> StepOutput:
    """One DDIM step x_t -> x_{t_prev}."""
    scheduler.check_timesteps(t)
    alpha_bar = at_timestep(scheduler.alpha_bars, t, x_t)
    alpha_bar_prev = at_timestep(scheduler.alpha_bars, t_prev, x_t) if t_prev >= 1 else \
        torch.ones((), dtype=x_t.dtype, device=x_t.device)
    x0 = scheduler.pred_x0(x_t, t, eps)
    if clip_range is not None:
        x0 = x0.clamp(*clip_range)  # keeps few-step sampling from running away
        eps = (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
    direction = (1 - alpha_bar_prev - sigma ** 2).clamp(min=0).sqrt() * eps  # "direction pointing to x_t"
    prev = alpha_bar_prev.sqrt() * x0 + direction
    if eta > 0 and t_prev >= 1:
        prev = prev + sigma * draw(noise, x_t)
    return StepOutput(prev, x0)


class DDIM(Solver):
    def step(self, eps, index, x_t, noise=None):
        return ddim_step(self.scheduler, eps, self.timesteps[index], self.next_timestep(index), x_t,
                         eta=self.config.eta, clip_range=self.clip_range, noise=noise)
