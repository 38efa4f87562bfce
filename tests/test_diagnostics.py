"""core.evaluation.diagnostics: the ε-prediction loss per timestep bucket."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from core.store import runs
from core.config import ConfigError, ScheduleConfig
from core.evaluation.diagnostics import loss_by_timestep, timestep_buckets
from core.diffusion.schedule import NoiseScheduler


class PredictsZero(nn.Module):
    """ε̂ = 0 everywhere: its MSE against ε ~ N(0, I) is E[ε²] = 1 at every t."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_buckets_cover_one_to_T_without_gaps():
    for T, n in ((20, 10), (1000, 10), (7, 3), (5, 5)):
        buckets = timestep_buckets(T, n)
        assert len(buckets) == n and buckets[0][0] == 1 and buckets[-1][1] == T
        assert all(b[0] == a[1] + 1 for a, b in zip(buckets, buckets[1:]))
    with pytest.raises(ConfigError, match="buckets"):
        timestep_buckets(20, 21)
    with pytest.raises(ConfigError, match="buckets"):
        timestep_buckets(20, 0)


def test_zero_predictor_scores_the_noise_variance_in_every_bucket(tiny_images):
    scheduler = NoiseScheduler(ScheduleConfig(timesteps=50))
    result = loss_by_timestep(PredictsZero(), scheduler, tiny_images.images[:128], pixel_range="symmetric",
                              buckets=5, seed=3)
    assert [(b.t_low, b.t_high) for b in result] == timestep_buckets(50, 5)
    for bucket in result:  # 128·784 standard normal squares: mean 1 within a few hundredths
        assert bucket.loss == pytest.approx(1.0, abs=0.03)


def test_trained_model_is_scored_reproducibly_and_left_in_its_mode(tiny_run, tiny_images):
    loaded = runs.load_model(tiny_run)
    scheduler = NoiseScheduler(loaded.config.schedule)
    loaded.model.train()
    first = loss_by_timestep(loaded.model, scheduler, tiny_images.images[:32], pixel_range="symmetric", seed=1)
    assert loaded.model.training
    again = loss_by_timestep(loaded.model, scheduler, tiny_images.images[:32], pixel_range="symmetric", seed=1)
    other = loss_by_timestep(loaded.model, scheduler, tiny_images.images[:32], pixel_range="symmetric", seed=2)
    assert first == again and first != other
    assert all(b.loss > 0 for b in first)


def test_bad_images_are_refused(tiny_images):
    scheduler = NoiseScheduler(ScheduleConfig(timesteps=20))
    with pytest.raises(ConfigError, match="uint8"):
        loss_by_timestep(PredictsZero(), scheduler, tiny_images.images.float(), pixel_range="unit")
