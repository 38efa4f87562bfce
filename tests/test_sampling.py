"""Sampling: one generator for every sampler; seeded, batched, frames recorded where asked, model
left as it was, progress and early stop from outside the loop."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from core.config import ConfigError, ModelConfig, SampleConfig, ScheduleConfig
from core.models import build_model
from core.diffusion.sampling import collect, reverse_process, sample, total_steps
from core.diffusion.schedule import NoiseScheduler


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
    assert a.shape == (6, 1, 28, 28) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_records_every_frame_for_ddpm(model, scheduler):
    result = sample(model, scheduler, SampleConfig(n=3), record="all", pixel_range="symmetric")
    assert result.frame_timesteps == list(range(12, 0, -1))
    assert result.frames_xt.shape == (12, 3, 1, 28, 28) and result.frames_x0.shape == (12, 3, 1, 28, 28)
    assert result.frames_xt.dtype == np.uint8


def test_records_only_chosen_steps_for_ddim(model, scheduler):
    result = sample(model, scheduler, SampleConfig(sampler="ddim", steps=4, n=2), record=[12, 9, 5])
    ts = scheduler.sampling_timesteps(4)
    assert ts == [12, 9, 6, 3]
    assert result.frame_timesteps == [12, 9]
    assert result.frames_xt.shape == (2, 2, 1, 28, 28)


def test_ddpm_refuses_fewer_steps_and_ddim_more_than_T(model, scheduler):
    with pytest.raises(ConfigError, match="ddim"):
        sample(model, scheduler, SampleConfig(sampler="ddpm", steps=5, n=1))
    with pytest.raises(ConfigError, match="between 1 and T"):
        sample(model, scheduler, SampleConfig(sampler="ddim", steps=13, n=1))


def test_model_mode_is_restored_and_every_step_is_yielded(model, scheduler):
    model.train()
    config = SampleConfig(n=5, batch_size=2)
    steps = list(reverse_process(model, scheduler, config))
    assert model.training
    assert len(steps) == total_steps(config, scheduler) == 36  # 3 batches × 12 steps
    assert [s.t for s in steps[:12]] == list(range(12, 0, -1)) and steps[11].last
    assert [s.batch_start for s in steps[::12]] == [0, 2, 4] and steps[-1].x_next.shape == (1, 1, 28, 28)


def test_stopping_early_is_islice_and_restores_the_model(model, scheduler):
    model.train()
    steps = reverse_process(model, scheduler, SampleConfig(n=2))
    taken = list(itertools.islice(steps, 3))
    assert [s.t for s in taken] == [12, 11, 10] and not model.training  # still sampling: eval mode
    steps.close()
    assert model.training
    # what was taken continues the chain: each step starts where the previous one ended
    assert torch.equal(taken[1].x_t, taken[0].x_next)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m", "dpmpp2m-sde"])
def test_every_sampler_runs_through_the_same_loop(model, scheduler, sampler):
    config = SampleConfig(sampler=sampler, steps=0 if sampler == "ddpm" else 5, n=3, seed=1)
    result = collect(reverse_process(model, scheduler, config, pixel_range="symmetric"), pixel_range="symmetric",
                     record="all")
    again = sample(model, scheduler, config, pixel_range="symmetric")
    assert result.images.shape == (3, 1, 28, 28) and np.array_equal(result.images, again.images)  # seeded
    assert len(result.frame_timesteps) == (12 if sampler == "ddpm" else 5)


def test_unit_range_images_are_the_books_clamp(model, scheduler):
    """In [0, 1] mode a sample is x·255 clamped to [0, 255]: a well-trained-or-not model still gives uint8."""
    img = sample(model, scheduler, SampleConfig(n=2), pixel_range="unit").images
    assert img.min() >= 0 and img.max() <= 255
