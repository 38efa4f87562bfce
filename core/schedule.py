"""Noise schedules and the DDPM / DDIM reverse steps, with timesteps in 1..T (the book's convention).

`alpha_bars[t - 1]` belongs to timestep t. Each step returns the previous sample and the
predicted clean image x̂0, which the dashboard shows beside x_t.

References
- Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM): eqs. (4), (7), (11).
- Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models" (DDIM): eqs. (12), (16).
- Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models": the cosine schedule.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .config import ConfigError, ScheduleConfig


def linear_beta_schedule(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The book's schedule (Ho et al. 2020): betas evenly spaced from beta_start to beta_end."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. (17): alpha_bar(t) = cos²(((t/T + s)/(1 + s))·π/2), betas ≤ 0.999."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bars = f / f[0]
    betas = 1 - alpha_bars[1:] / alpha_bars[:-1]
    return betas.clamp(max=0.999)


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn from `generator`'s device (CPU for seeded runs,
    so a seed gives the same images on every device) and moved to x's device."""
    gen_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=torch.float32).to(x.device, x.dtype)


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor          # x_{t-1} (or x_{t_prev} for DDIM)
    pred_original_sample: torch.Tensor  # x̂0


def _per_sample(values: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """Gather values[t - 1] and shape it (B, 1, 1, 1) to broadcast over images."""
    if isinstance(t, int):
        return values[t - 1].to(like.dtype)
    return values.to(like.device)[t.to(like.device) - 1].to(like.dtype).view(-1, 1, 1, 1)


class NoiseScheduler:
    """betas, alphas and alpha_bars for t = 1..T, the forward process and both reverse steps."""

    def __init__(self, config: ScheduleConfig = ScheduleConfig()):
        self.config = config
        self.num_timesteps = config.timesteps
        if config.schedule == "linear":
            betas = linear_beta_schedule(config.timesteps, config.beta_start, config.beta_end)
        else:
            betas = cosine_beta_schedule(config.timesteps)
        # Kept in float64 and cast at use: cumprod over 1000 steps loses digits in float32.
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alpha_bars = torch.cumprod(self.alphas, dim=0)
        # alpha_bar_0 = 1 (no noise before step 1), so alpha_bars_prev[t - 1] = alpha_bar_{t-1}.
        self.alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars[:-1]])

    # -- checks ------------------------------------------------------------------------------------
    def check_timesteps(self, t: torch.Tensor | int) -> None:
        lo, hi = (t, t) if isinstance(t, int) else (int(t.min()), int(t.max()))
        if lo < 1 or hi > self.num_timesteps:
            raise ConfigError(f"timestep {lo if lo < 1 else hi} is outside 1..T = 1..{self.num_timesteps}")

    # -- forward process ---------------------------------------------------------------------------
    def add_noise(self, x_0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0), DDPM eq. (4): x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε."""
        self.check_timesteps(t)
        alpha_bar = _per_sample(self.alpha_bars, t, x_0)
        return alpha_bar.sqrt() * x_0 + (1 - alpha_bar).sqrt() * noise

    def signal_to_noise(self) -> torch.Tensor:
        """SNR(t) = ᾱ_t / (1 − ᾱ_t) for t = 1..T."""
        return self.alpha_bars / (1 - self.alpha_bars)

    def pred_x0(self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """Invert eq. (4) with the predicted noise: x̂0 = (x_t − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t)."""
        alpha_bar = _per_sample(self.alpha_bars, t, x_t)
        return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()

    # -- reverse steps -----------------------------------------------------------------------------
    def ddpm_step(self, eps: torch.Tensor, t: int, x_t: torch.Tensor,
                  generator: torch.Generator | None = None) -> StepOutput:
        """One ancestral step x_t -> x_{t-1}, exactly the book's `denoise` (DDPM Algorithm 2)."""
        self.check_timesteps(t)
        alpha = _per_sample(self.alphas, t, x_t)
        alpha_bar = _per_sample(self.alpha_bars, t, x_t)
        alpha_bar_prev = _per_sample(self.alpha_bars_prev, t, x_t)
        # 1. posterior mean, DDPM eq. (11): μ = (x_t − (1 − α_t)/sqrt(1 − ᾱ_t)·ε̂) / sqrt(α_t)
        mean = (x_t - (1 - alpha) / (1 - alpha_bar).sqrt() * eps) / alpha.sqrt()
        # 2. posterior variance, DDPM eq. (7): σ² = (1 − α_t)(1 − ᾱ_{t−1}) / (1 − ᾱ_t)
        std = ((1 - alpha) * (1 - alpha_bar_prev) / (1 - alpha_bar)).sqrt()
        # 3. sample, with no noise at the last step t = 1
        if t > 1:
            noise = _noise_like(x_t, generator)
            prev = mean + std * noise
        else:
            prev = mean
        return StepOutput(prev, self.pred_x0(x_t, t, eps))

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` descending timesteps in 1..T, evenly spaced, always starting at T and ending at 1."""
        if steps < 1 or steps > self.num_timesteps:
            raise ConfigError(f"steps = {steps} is not allowed: it must be between 1 and T = {self.num_timesteps}")
        if steps == 1:
            return [self.num_timesteps]
        grid = torch.linspace(self.num_timesteps, 1, steps, dtype=torch.float64).round().long()
        return [int(v) for v in grid]

    def ddim_step(self, eps: torch.Tensor, t: int, t_prev: int, x_t: torch.Tensor, eta: float = 0.0,
                  clip_range: tuple[float, float] | None = None,
                  generator: torch.Generator | None = None) -> StepOutput:
        """One DDIM step x_t -> x_{t_prev} (t_prev = 0 means the clean image), DDIM eq. (12)."""
        self.check_timesteps(t)
        alpha_bar = _per_sample(self.alpha_bars, t, x_t)
        alpha_bar_prev = _per_sample(self.alpha_bars, t_prev, x_t) if t_prev >= 1 else \
            torch.ones((), dtype=x_t.dtype, device=x_t.device)
        # 1. predicted x0, DDIM eq. (12) first term; clipping to the data range keeps few-step
        #    sampling from running away (diffusers' clip_sample)
        x0 = self.pred_x0(x_t, t, eps)
        if clip_range is not None:
            x0 = x0.clamp(*clip_range)
            eps = (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()  # keep ε̂ consistent with x̂0
        # 2. σ_t(η), DDIM eq. (16); η = 1 gives the DDPM posterior variance
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        # 3. direction pointing to x_t, and the new sample
        direction = (1 - alpha_bar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        prev = alpha_bar_prev.sqrt() * x0 + direction
        if eta > 0 and t_prev >= 1:
            noise = _noise_like(x_t, generator)
            prev = prev + sigma * noise
        return StepOutput(prev, x0)
