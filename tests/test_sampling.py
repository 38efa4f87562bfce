"""Sampling: seeded, batched, frames recorded where asked, model left as it was."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import ConfigError, ModelConfig, SampleConfig, ScheduleConfig
from core.models import build_model
from core.sampling import sample
from core.schedule import NoiseScheduler


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(name="improved_unet", base_channels=8, channel_mults=(1, 2), attention=False))


@pytest.fixture
def scheduler():
    return NoiseScheduler(ScheduleConfig(timesteps=12))


def test_same_seed_same_images_whatever_the_batch_size(model, scheduler):
    a = sample(model, scheduler, SampleConfig(n=6, seed=5, batch_size=6)).images
    b = sample(model, scheduler, SampleConfig(n=6, seed=5, batch_size=6)).images
    c = sample(model, scheduler, SampleConfig(n=6, seed=6, batch_size=6)).images
    assert a.shape == (6, 28, 28) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_records_every_frame_for_ddpm(model, scheduler):
    result = sample(model, scheduler, SampleConfig(n=3), record="all", pixel_range="symmetric")
    assert result.frame_timesteps == list(range(12, 0, -1))
    assert result.frames_xt.shape == (12, 3, 28, 28) and result.frames_x0.shape == (12, 3, 28, 28)
    assert result.frames_xt.dtype == np.uint8


def test_records_only_chosen_steps_for_ddim(model, scheduler):
    result = sample(model, scheduler, SampleConfig(sampler="ddim", steps=4, n=2), record=[12, 1, 5])
    ts = scheduler.ddim_timesteps(4)
    assert ts == [12, 8, 5, 1]
    assert result.frame_timesteps == [t for t in ts if t in (12, 1, 5)]


def test_ddpm_refuses_fewer_steps_and_ddim_more_than_T(model, scheduler):
    with pytest.raises(ConfigError, match="ddim"):
        sample(model, scheduler, SampleConfig(sampler="ddpm", steps=5, n=1))
    with pytest.raises(ConfigError, match="between 1 and T"):
        sample(model, scheduler, SampleConfig(sampler="ddim", steps=13, n=1))


def test_model_mode_is_restored_and_progress_reported(model, scheduler):
    model.train()
    calls = []
    sample(model, scheduler, SampleConfig(n=5, batch_size=2), progress=lambda d, t: calls.append((d, t)))
    assert model.training
    assert calls[-1] == (36, 36) and len(calls) == 36  # 3 batches × 12 steps


def test_stop_request_interrupts(model, scheduler):
    with pytest.raises(InterruptedError):
        sample(model, scheduler, SampleConfig(n=2), should_stop=lambda: True)


def test_unit_range_images_are_the_books_clamp(model, scheduler):
    """In [0, 1] mode a sample is x·255 clamped to [0, 255]: a well-trained-or-not model still gives uint8."""
    img = sample(model, scheduler, SampleConfig(n=2), pixel_range="unit").images
    assert img.min() >= 0 and img.max() <= 255
