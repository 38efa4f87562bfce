"""Noise schedules (the tables), the forward process and the output conversions, with timesteps in
1..T (the book's convention).

`alpha_bars[t - 1]` belongs to timestep t; t = 0 is the clean image (ᾱ_0 = 1). The samplers that walk
these tables backwards are in core/diffusion/solvers/; their timesteps come from spacing.py.

In the DPM-Solver notation used for the solvers, α_t = sqrt(ᾱ_t) (signal), σ_t = sqrt(1 − ᾱ_t)
(noise) and λ_t = log(α_t / σ_t), half the log signal-to-noise ratio; λ grows as t falls.

References
- Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM): eq. (4).
- Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models": the cosine schedule,
  and the linear schedule scaled by 1000/T so that any T ends in noise.
- Salimans, Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models": the velocity
  v = α_t·ε − σ_t·x_0 as a prediction target (section 4, appendix D).
- Lu, Zhou, Bao, Chen, Li, Zhu 2022, "DPM-Solver++": the α_t, σ_t, λ_t notation.
"""
from __future__ import annotations

import math
import torch

from ..config import PREDICTION_NAMES, ConfigError, ScheduleConfig


MAX_BETA = 0.999  # the cosine schedule's cap (Nichol & Dhariwal 2021); beta = 1 would erase x_{t-1} whole


def linear_beta_schedule(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                         scale_to_timesteps: bool = True) -> torch.Tensor:
    """The book's schedule (Ho et al. 2020): betas evenly spaced from beta_start to beta_end.

    beta_start and beta_end are meant for T = 1000. With `scale_to_timesteps` both are multiplied by
    1000 / T (improved-diffusion's `get_named_beta_schedule`), so ᾱ_T is near 0 for any T instead of
    0.82 at T = 20; T = 1000 is left exactly as the book has it. Betas are capped at MAX_BETA.
    """
    scale = 1000.0 / timesteps if scale_to_timesteps else 1.0
    betas = torch.linspace(beta_start * scale, beta_end * scale, timesteps, dtype=torch.float64)
    return betas.clamp(max=MAX_BETA)


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. (17): alpha_bar(t) = cos²(((t/T + s)/(1 + s))·π/2), betas ≤ 0.999."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bars = f / f[0]
    betas = 1 - alpha_bars[1:] / alpha_bars[:-1]
    return betas.clamp(max=MAX_BETA)


def at_timestep(values: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """Gather values[t - 1] as `like`'s dtype: a scalar for an int t, (B, 1, 1, 1) for a batch of t."""
    if isinstance(t, int):
        return values[t - 1].to(like.dtype)
    return values.to(like.device)[t.to(like.device) - 1].to(like.dtype).view(-1, 1, 1, 1)


class NoiseScheduler:
    """betas, alphas and alpha_bars for t = 1..T, the forward process and the output conversions.

    The reverse steps that use these tables live in core/diffusion/solvers/, one file per sampler.
    """

    def __init__(self, config: ScheduleConfig = ScheduleConfig()):
        self.config = config
        self.num_timesteps = config.timesteps
        if config.schedule == "linear":
            betas = linear_beta_schedule(config.timesteps, config.beta_start, config.beta_end,
                                         config.scale_to_timesteps)
        else:
            betas = cosine_beta_schedule(config.timesteps)
        # Kept in float64 and cast at use: cumprod over 1000 steps loses digits in float32.
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alpha_bars = torch.cumprod(self.alphas, dim=0)
        # alpha_bar_0 = 1 (no noise before step 1), so alpha_bars_prev[t - 1] = alpha_bar_{t-1}.
        self.alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars[:-1]])
        # DPM-Solver's α_t, σ_t, λ_t for t = 0..T (index t): t = 0 is the data, σ_0 = 0, λ_0 = +inf.
        alpha_bars_0 = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars])
        self.signal = alpha_bars_0.sqrt()           # α_t
        self.noise_level = (1 - alpha_bars_0).sqrt()  # σ_t
        self.lambdas = self.signal.log() - self.noise_level.log()  # λ_t, +inf at t = 0

    # -- checks ------------------------------------------------------------------------------------
    def check_timesteps(self, t: torch.Tensor | int) -> None:
        lo, hi = (t, t) if isinstance(t, int) else (int(t.min()), int(t.max()))
        if lo < 1 or hi > self.num_timesteps:
            raise ConfigError(f"timestep {lo if lo < 1 else hi} is outside 1..T = 1..{self.num_timesteps}")

    # -- forward process ---------------------------------------------------------------------------
    def add_noise(self, x_0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0), DDPM eq. (4): x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε."""
        self.check_timesteps(t)
        alpha_bar = at_timestep(self.alpha_bars, t, x_0)
        return alpha_bar.sqrt() * x_0 + (1 - alpha_bar).sqrt() * noise

    def signal_to_noise(self) -> torch.Tensor:
        """SNR(t) = ᾱ_t / (1 − ᾱ_t) for t = 1..T."""
        return self.alpha_bars / (1 - self.alpha_bars)

    def pred_x0(self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """Invert eq. (4) with the predicted noise: x̂0 = (x_t − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t)."""
        alpha_bar = at_timestep(self.alpha_bars, t, x_t)
        return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()

    def velocity(self, x_0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """The v-prediction target (Salimans & Ho 2022): v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x_0."""
        alpha_bar = at_timestep(self.alpha_bars, t, x_0)
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x_0

    def pred_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int,
                 prediction: str) -> torch.Tensor:
        """The network's output as ε̂, what every reverse step takes: the output itself for "eps"; for "v"
        ε̂ = sqrt(ᾱ_t)·v̂ + sqrt(1 − ᾱ_t)·x_t (since x_t = α_t·x_0 + σ_t·ε and α_t² + σ_t² = 1)."""
        if prediction == "eps":
            return model_output
        if prediction == "v":
            alpha_bar = at_timestep(self.alpha_bars, t, x_t)
            return alpha_bar.sqrt() * model_output + (1 - alpha_bar).sqrt() * x_t
        raise ConfigError(f"prediction = {prediction!r} is not allowed: choose one of {', '.join(PREDICTION_NAMES)}")
