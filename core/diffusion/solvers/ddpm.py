"""DDPM, the book's ancestral sampler (Ho, Jain, Abbeel 2020, Algorithm 2), at every t = T..1.

    x̂0 = (x_t − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t)                                        (eq. 4 inverted)
    μ  = (x_t − (1 − α_t)/sqrt(1 − ᾱ_t)·ε̂) / sqrt(α_t)                              (eq. 11)
    σ² = (1 − α_t)(1 − ᾱ_{t−1}) / (1 − ᾱ_t)                                          (eq. 7, β̃_t)
    x_{t−1} = μ + σ·z,  z ~ N(0, I), no noise at t = 1

With x̂0 clipped to the data range the mean is written through x̂0 (eq. 7) instead:
    μ = sqrt(ᾱ_{t−1})·β_t/(1 − ᾱ_t)·x̂0 + sqrt(α_t)·(1 − ᾱ_{t−1})/(1 − ᾱ_t)·x_t
which equals eq. (11) whenever nothing is clipped (diffusers' clip_sample, lucidrains' clip_denoised).
This is diffusers' DDPMScheduler with variance_type "fixed_small".
"""
from __future__ import annotations

import torch

from ..schedule import NoiseScheduler, at_timestep
from .base import ClipRange, Noise, Solver, StepOutput, draw


def ddpm_step(scheduler: NoiseScheduler, eps: torch.Tensor, t: int, x_t: torch.Tensor, *,
              noise: Noise | None = None, clip_range: ClipRange = None) -> StepOutput:
    """One ancestral step x_t -> x_{t−1}; without clip_range exactly the book's `denoise`."""
    scheduler.check_timesteps(t)
    alpha = at_timestep(scheduler.alphas, t, x_t)
    alpha_bar = at_timestep(scheduler.alpha_bars, t, x_t)
    alpha_bar_prev = at_timestep(scheduler.alpha_bars_prev, t, x_t)
    x0 = scheduler.pred_x0(x_t, t, eps)
    if clip_range is None:
        mean = (x_t - (1 - alpha) / (1 - alpha_bar).sqrt() * eps) / alpha.sqrt()
    else:
        x0 = x0.clamp(*clip_range)
        mean = (alpha_bar_prev.sqrt() * (1 - alpha) * x0 + alpha.sqrt() * (1 - alpha_bar_prev) * x_t) \
            / (1 - alpha_bar)
    if t == 1:
        return StepOutput(mean, x0)  # the last step returns the mean: x_0 carries no noise
    std = ((1 - alpha) * (1 - alpha_bar_prev) / (1 - alpha_bar)).sqrt()
    return StepOutput(mean + std * draw(noise, x_t), x0)


class DDPM(Solver):
    """Every t = T..1; refuses fewer steps (SampleConfig.resolved_steps says which sampler to use)."""

    def make_timesteps(self) -> list[int]:
        self.config.resolved_steps(self.scheduler.num_timesteps)
        return list(range(self.scheduler.num_timesteps, 0, -1))

    def step(self, eps, index, x_t, noise=None):
        return ddpm_step(self.scheduler, eps, self.timesteps[index], x_t, noise=noise, clip_range=self.clip_range)
