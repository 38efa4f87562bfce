"""What per-image noise streams cost: drawing each image's noise from its own generator
(core/diffusion/noise.py) against one batched draw from a single generator, as a fraction of a
sampling step, measured in one run.

A batch pays once for seeding its generators and then, at each stochastic step, for one draw per image
instead of one for the batch. The report gives both draws alone, their ratio, and the extra cost of a
20-step stochastic run (seeding + 20 extra draws) as a fraction of those 20 steps' sampling time, the
figure the issue's target (≤ 5 %) is about.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..data.datasets import IMAGE_SHAPE
from ..device import synchronize
from ..diffusion.noise import ImageNoise

REFERENCE_STEPS = 20   # the step count the fraction is given for (the results' SDE figure)


def _best_us(fn: Callable[[], object], device: torch.device, repeats: int, rounds: int = 3) -> float:
    """Microseconds per call, best of `rounds` blocks of `repeats` calls (a neighbour's burst cannot tilt it)."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e6


def measure_noise_streams(device: torch.device, n: int, step_seconds: float, repeats: int = 50) -> dict:
    """Per-image against batched noise for a batch of `n`; `step_seconds` is one sampling step of that
    batch measured in the same run (the network evaluation dominates it)."""
    streams = ImageNoise(0, 0, n, IMAGE_SHAPE, device)
    generator = torch.Generator().manual_seed(0)
    per_image_us = _best_us(streams, device, repeats)
    batched_us = _best_us(lambda: torch.randn((n, *IMAGE_SHAPE), generator=generator).to(device), device, repeats)
    setup_us = _best_us(lambda: ImageNoise(0, 0, n, IMAGE_SHAPE, device), device, max(1, repeats // 5))
    extra_s = (setup_us + REFERENCE_STEPS * max(per_image_us - batched_us, 0.0)) / 1e6
    return {"n": n, "per_image_draw_us": round(per_image_us, 1), "batched_draw_us": round(batched_us, 1),
            "per_image_over_batched": round(per_image_us / batched_us, 3), "setup_us": round(setup_us, 1),
            "reference_steps": REFERENCE_STEPS,
            "extra_fraction_of_sampling": round(extra_s / (REFERENCE_STEPS * step_seconds), 4)}
