"""Timestep spacing: which `steps` timesteps of 1..T a few-step sampler evaluates the network at.

The list starts at T and falls strictly; the step after the last goes to t = 0 (the clean image), so
every network evaluation does work ("trailing" spacing in diffusers' terms).
- `uniform`: even in t: T, T − T/N, ..., T/N.
- `logsnr`: even in λ_t = log(α_t/σ_t) between λ_T and λ_1 (the grid DPM-Solver recommends), which
  puts more steps at small t, where the image forms.

Rounding to whole timesteps can merge neighbours or (for λ) land above T, so the rounded grid is
passed through `strictly_decreasing`, which keeps every value in [1, T] and falling by construction.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import SPACING_NAMES, ConfigError
from .schedule import NoiseScheduler


def strictly_decreasing(grid: list[float], T: int) -> list[int]:
    """Round `grid` (descending, grid[0] = T) to whole timesteps, strictly falling within [1, T].

    t_0 = T; each next t_i is its rounded value, at most t_{i−1} − 1 (no repeats) and at least
    N − i (room for the steps still to come, the last one ≥ 1). The bounds never cross, since
    t_{i−1} ≥ N − i + 1 by the same rule, so the result always has N distinct values in [1, T].
    """
    n = len(grid)
    timesteps = [T]
    for i in range(1, n):
        rounded = int(round(float(grid[i])))
        timesteps.append(max(min(rounded, timesteps[-1] - 1), n - i))
    return timesteps


def logsnr_grid(scheduler: NoiseScheduler, steps: int) -> np.ndarray:
    """Continuous timesteps whose λ is even between λ_T and λ_1 (steps + 1 points, the last dropped).

    λ_t falls strictly in t, so t(λ) is read off by linear interpolation between the table's points
    (as diffusers' `_sigma_to_t` does in log σ)."""
    T = scheduler.num_timesteps
    lambdas = scheduler.lambdas[1:].numpy()             # λ_1 .. λ_T, falling
    targets = np.linspace(lambdas[-1], lambdas[0], steps + 1)[:-1]
    # np.interp needs ascending x: λ_T .. λ_1 against t = T .. 1
    return np.interp(targets, lambdas[::-1], np.arange(T, 0, -1, dtype=np.float64))


def sampling_timesteps(scheduler: NoiseScheduler, steps: int, spacing: str = "uniform") -> list[int]:
    """The `steps` timesteps, descending from T, that a few-step sampler visits."""
    T = scheduler.num_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or steps > T:
        raise ConfigError(f"steps = {steps} is not allowed: it must be between 1 and T = {T}")
    if spacing == "uniform":
        grid = torch.linspace(T, 0, steps + 1, dtype=torch.float64)[:-1].tolist()
    elif spacing == "logsnr":
        grid = logsnr_grid(scheduler, steps).tolist()
    else:
        raise ConfigError(f"spacing = {spacing!r} is not allowed: choose one of {', '.join(SPACING_NAMES)}")
    return strictly_decreasing(grid, T)
