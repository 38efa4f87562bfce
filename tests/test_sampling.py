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
from core.diffusion.spacing import sampling_timesteps


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(name="improved_unet", base_channels=8, channel_mults=(1, 2), attention=False))


@pytest.fixture
def scheduler():
    return NoiseScheduler(ScheduleConfig(timesteps=12))


def final_images(model, scheduler, config: SampleConfig, **kwargs) -> torch.Tensor:
    """The float images (model range) a whole reverse process ends with, in image order."""
    return torch.cat([step.x_next for step in reverse_process(model, scheduler, config, **kwargs) if step.last])


def test_same_seed_same_images_and_another_seed_others(model, scheduler):
    a = sample(model, scheduler, SampleConfig(n=6, seed=5, batch_size=6)).images
    b = sample(model, scheduler, SampleConfig(n=6, seed=5, batch_size=6)).images
    c = sample(model, scheduler, SampleConfig(n=6, seed=6, batch_size=6)).images
    assert a.shape == (6, 1, 28, 28) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m", "dpmpp2m-sde"])
def test_image_i_of_a_seed_is_the_same_whatever_the_batch_size_and_the_other_images(model, scheduler, sampler):
    """Every image has its own noise stream (x_T and each step's noise), seeded from (seed, i): batches
    of 1, 3 and 8, and a request for only the first 3 images, give the same images. DDIM with η > 0
    and the SDE form draw noise at every step, so a batch-wide stream would show here."""
    def images(n: int, batch_size: int) -> torch.Tensor:
        config = SampleConfig(sampler=sampler, steps=0 if sampler == "ddpm" else 5, eta=0.5, n=n, seed=11, clip="on",
                              batch_size=batch_size)
        return final_images(model, scheduler, config, pixel_range="symmetric")
    reference = images(8, 8)
    # the same network on a different batch may round its last bit differently: compare to 1e-4
    for batch_size in (1, 3):
        torch.testing.assert_close(images(8, batch_size), reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(images(3, 3), reference[:3], atol=1e-4, rtol=0)
    assert (reference[0] - reference[1]).abs().max() > 0.1  # and the images differ from one another


def test_records_every_frame_for_ddpm(model, scheduler):
    result = sample(model, scheduler, SampleConfig(n=3), record="all", pixel_range="symmetric")
    assert result.frame_timesteps == list(range(12, 0, -1))
    assert result.frames_xt.shape == (12, 3, 1, 28, 28) and result.frames_x0.shape == (12, 3, 1, 28, 28)
    assert result.frames_xt.dtype == np.uint8


def test_records_only_chosen_steps_for_ddim(model, scheduler):
    result = sample(model, scheduler, SampleConfig(sampler="ddim", steps=4, n=2), record=[12, 9, 5])
    ts = sampling_timesteps(scheduler, 4)
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
    """In [0, 1] mode a sample is x·255 clamped to [0, 255] and rounded: pixels below 0 become 0 and
    above 1 become 255 (not wrapped around), the rest round(x·255). The untrained network lands outside
    [0, 1] on both sides, so the clamp is exercised."""
    config = SampleConfig(n=2)
    x = final_images(model, scheduler, config, pixel_range="unit").double().numpy()
    img = sample(model, scheduler, config, pixel_range="unit").images
    assert (x < 0).any() and (x > 1).any()
    assert (img[x < 0] == 0).all() and (img[x > 1] == 255).all()
    inside = (x >= 0) & (x <= 1)
    assert np.array_equal(img[inside], np.round(x[inside] * 255).astype(np.uint8))
