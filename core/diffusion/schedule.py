"""Noise schedules and the reverse steps of every sampler, with timesteps in 1..T (the book's convention).

`alpha_bars[t - 1]` belongs to timestep t; t = 0 is the clean image (ᾱ_0 = 1). Each step returns
the next sample and the predicted clean image x̂0, which the dashboard shows beside x_t.

In the DPM-Solver notation used for the solvers, α_t = sqrt(ᾱ_t) (signal), σ_t = sqrt(1 − ᾱ_t)
(noise) and λ_t = log(α_t / σ_t), half the log signal-to-noise ratio; λ grows as t falls.

References
- Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM): eqs. (4), (6), (7), (11).
- Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models" (DDIM): eqs. (12), (16).
- Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models": the cosine schedule,
  and the linear schedule scaled by 1000/T so that any T ends in noise.
- Salimans, Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models": the velocity
  v = α_t·ε − σ_t·x_0 as a prediction target (section 4, appendix D).
- Lu, Zhou, Bao, Chen, Li, Zhu 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
  Probabilistic Models": Algorithm 2 (multistep second order, data prediction) and its SDE form.
"""
from __future__ import annotations

import math
from typing import NamedTuple

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
        alpha_bar = _per_sample(self.alpha_bars, t, x_0)
        return alpha_bar.sqrt() * x_0 + (1 - alpha_bar).sqrt() * noise

    def signal_to_noise(self) -> torch.Tensor:
        """SNR(t) = ᾱ_t / (1 − ᾱ_t) for t = 1..T."""
        return self.alpha_bars / (1 - self.alpha_bars)

    def pred_x0(self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """Invert eq. (4) with the predicted noise: x̂0 = (x_t − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t)."""
        alpha_bar = _per_sample(self.alpha_bars, t, x_t)
        return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()

    def velocity(self, x_0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """The v-prediction target (Salimans & Ho 2022): v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x_0."""
        alpha_bar = _per_sample(self.alpha_bars, t, x_0)
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x_0

    def pred_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int,
                 prediction: str) -> torch.Tensor:
        """The network's output as ε̂, what every reverse step takes: the output itself for "eps"; for "v"
        ε̂ = sqrt(ᾱ_t)·v̂ + sqrt(1 − ᾱ_t)·x_t (since x_t = α_t·x_0 + σ_t·ε and α_t² + σ_t² = 1)."""
        if prediction == "eps":
            return model_output
        if prediction == "v":
            alpha_bar = _per_sample(self.alpha_bars, t, x_t)
            return alpha_bar.sqrt() * model_output + (1 - alpha_bar).sqrt() * x_t
        raise ConfigError(f"prediction = {prediction!r} is not allowed: choose one of {', '.join(PREDICTION_NAMES)}")

    # -- reverse steps -----------------------------------------------------------------------------
    def ddpm_step(self, eps: torch.Tensor, t: int, x_t: torch.Tensor,
                  generator: torch.Generator | None = None,
                  clip_range: tuple[float, float] | None = None) -> StepOutput:
        """One ancestral step x_t -> x_{t-1}, exactly the book's `denoise` (DDPM Algorithm 2).

        With `clip_range` the mean comes from x̂0 clipped to the data range (diffusers' clip_sample,
        lucidrains' clip_denoised); without it the step is the book's, digit for digit.
        """
        self.check_timesteps(t)
        alpha = _per_sample(self.alphas, t, x_t)
        alpha_bar = _per_sample(self.alpha_bars, t, x_t)
        alpha_bar_prev = _per_sample(self.alpha_bars_prev, t, x_t)
        x0 = self.pred_x0(x_t, t, eps)
        if clip_range is None:
            # 1. posterior mean, DDPM eq. (11): μ = (x_t − (1 − α_t)/sqrt(1 − ᾱ_t)·ε̂) / sqrt(α_t)
            mean = (x_t - (1 - alpha) / (1 - alpha_bar).sqrt() * eps) / alpha.sqrt()
        else:
            # 1'. the same mean written through x̂0, DDPM eq. (7), with x̂0 clipped:
            #     μ = sqrt(ᾱ_{t−1})·β_t/(1 − ᾱ_t)·x̂0 + sqrt(α_t)·(1 − ᾱ_{t−1})/(1 − ᾱ_t)·x_t
            x0 = x0.clamp(*clip_range)
            mean = (alpha_bar_prev.sqrt() * (1 - alpha) * x0 + alpha.sqrt() * (1 - alpha_bar_prev) * x_t) \
                / (1 - alpha_bar)
        # 2. posterior variance, DDPM eq. (7): σ² = (1 − α_t)(1 − ᾱ_{t−1}) / (1 − ᾱ_t)
        std = ((1 - alpha) * (1 - alpha_bar_prev) / (1 - alpha_bar)).sqrt()
        # 3. sample, with no noise at the last step t = 1
        if t > 1:
            noise = _noise_like(x_t, generator)
            prev = mean + std * noise
        else:
            prev = mean
        return StepOutput(prev, x0)

    def sampling_timesteps(self, steps: int, spacing: str = "uniform") -> list[int]:
        """The `steps` descending timesteps a few-step sampler evaluates the model at, starting at T.

        Each step goes to the next one, and the last to t = 0 (the clean image), so every model
        evaluation does work. `uniform`: even in t (T, T − T/N, ..., T/N; "trailing" spacing);
        `logsnr`: even in λ between λ_T and λ_1, which puts more steps where the image forms.
        Rounded to whole timesteps and kept strictly decreasing.
        """
        T = self.num_timesteps
        if steps < 1 or steps > T:
            raise ConfigError(f"steps = {steps} is not allowed: it must be between 1 and T = {T}")
        if spacing == "uniform":
            grid = torch.linspace(T, 0, steps + 1, dtype=torch.float64)[:-1]
        elif spacing == "logsnr":
            lambda_grid = torch.linspace(float(self.lambdas[T]), float(self.lambdas[1]), steps + 1,
                                         dtype=torch.float64)[:-1]
            # λ_t falls monotonically in t: find each λ's place among λ_1..λ_T (ascending when reversed).
            ascending = self.lambdas[1:].flip(0)  # λ_T .. λ_1
            position = torch.searchsorted(ascending, lambda_grid).clamp(max=T - 1)
            grid = (T - position).to(torch.float64)
        else:
            raise ConfigError(f"spacing = {spacing!r} is not allowed: choose one of uniform, logsnr")
        timesteps = [min(T, max(1, int(round(float(v))))) for v in grid]
        for i in range(len(timesteps) - 2, -1, -1):  # strictly decreasing from the bottom up
            timesteps[i] = max(timesteps[i], timesteps[i + 1] + 1)
        timesteps[0] = T
        return timesteps

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

    def dpm_solver_pp_step(self, x0: torch.Tensor, t: int, s: int, x_t: torch.Tensor, *,
                           x0_prev: torch.Tensor | None = None, t_prev: int | None = None, sde: bool = False,
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """One DPM-Solver++(2M) step x_t -> x_s (s < t; s = 0 is the clean image), data prediction.

        x0 is x̂0 at t (already clipped if wanted); x0_prev and t_prev, the x̂0 and timestep of the
        step before, make it second order; without them (the first step) it is first order and
        equals a DDIM step. Lu et al. 2022, with h = λ_s − λ_t and r = h_prev / h:
            D = (1 + 1/(2r))·x̂0_t − 1/(2r)·x̂0_prev                   (second-order data estimate)
            ODE: x_s = (σ_s/σ_t)·x_t − α_s·(e^{−h} − 1)·D                 (Algorithm 2)
            SDE: x_s = (σ_s/σ_t)·e^{−h}·x_t + α_s·(1 − e^{−2h})·D + σ_s·sqrt(1 − e^{−2h})·z
        At s = 0 (σ_s = 0, e^{−h} = 0) both give x_0 = D, so the last step is taken first order.
        """
        self.check_timesteps(t)
        if s == 0:
            return x0  # σ_0 = 0: every term but α_0·D vanishes; D = x̂0 (first order, r would be 0)
        dtype = x_t.dtype
        alpha_s, sigma_s, sigma_t = (float(self.signal[s]), float(self.noise_level[s]), float(self.noise_level[t]))
        lambda_s, lambda_t = float(self.lambdas[s]), float(self.lambdas[t])
        h = lambda_s - lambda_t
        data = x0
        if x0_prev is not None and t_prev is not None:
            r = (lambda_t - float(self.lambdas[t_prev])) / h
            data = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        if not sde:
            return (sigma_s / sigma_t) * x_t - alpha_s * math.expm1(-h) * data
        noise = _noise_like(x_t, generator)
        return ((sigma_s / sigma_t) * math.exp(-h) * x_t + alpha_s * -math.expm1(-2 * h) * data
                + sigma_s * math.sqrt(-math.expm1(-2 * h)) * noise).to(dtype)
