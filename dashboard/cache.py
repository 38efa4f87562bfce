"""Cached non-UI work for the pages: datasets, schedules, trained models, previews, diagnostics.

Every function takes plain values (paths as strings, plus the weights' modification time so a
checkpoint written by a running job invalidates the cache) and calls `core`; none draws anything.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st
import torch

from core.store import runs
from core.bench.flops import model_cost
from core.config import DATASET_NAMES, DEFAULT_FEW_STEP_SAMPLER, ConfigError, DEFAULT_FEW_STEPS, ModelConfig, RunConfig, SampleConfig, ScheduleConfig
from core.data.datasets import (DatasetNotFoundError, ImageSet, ensure_dataset, load_images, to_model_range,
                                to_uint8)
from core.device import resolve_device
from core.evaluation.diagnostics import loss_by_timestep
from core.models import build_model
from core.store.export import to_display
from core.work import estimates
from core.diffusion.sampling import sample
from core.diffusion.schedule import NoiseScheduler
from dashboard import data_source

# Sampling and scoring run on the best device here (a GPU when there is one); training picks its own.
DEVICE = resolve_device("auto")
COMPARE_SAMPLES = 8       # images per run in Compare's sample rows
BUCKET_IMAGES = 128       # test images scored per timestep bucket


def weights_file(run_dir: Path, use_ema: bool = True) -> Path:
    ema = run_dir / "ema.safetensors"
    return ema if use_ema and ema.exists() else run_dir / "model.safetensors"


def weights_mtime(run_dir: Path, use_ema: bool = True) -> float:
    """The cache key part that changes whenever the run writes a new checkpoint."""
    try:
        return weights_file(run_dir, use_ema).stat().st_mtime
    except OSError:
        return 0.0


@st.cache_resource(show_spinner=False, max_entries=4)
def dataset(name: str, split: str) -> ImageSet:
    return load_images(name, split)


@st.cache_data(show_spinner=False, ttl=60)
@st.cache_resource(show_spinner=False, max_entries=16)
def scheduler(config: ScheduleConfig) -> NoiseScheduler:
    return NoiseScheduler(config)  # ScheduleConfig is frozen, so it is its own cache key


def scheduler_for(config) -> NoiseScheduler:
    return scheduler(config.schedule)


@st.cache_resource(show_spinner=False, max_entries=6)
def trained_model(run_dir: str, mtime: float, use_ema: bool) -> runs.LoadedRun:
    """A run's network in eval mode on DEVICE; `mtime` is only part of the cache key."""
    del mtime
    return runs.load_model(Path(run_dir), use_ema=use_ema, device=DEVICE)


def load_run_model(run_dir: Path, use_ema: bool = True) -> runs.LoadedRun:
    return trained_model(str(run_dir), weights_mtime(run_dir, use_ema), use_ema)


@st.cache_data(show_spinner=False, max_entries=64)
def preview_samples(run_dir: str, mtime: float, seed: int, steps: int = DEFAULT_FEW_STEPS,
                    n: int = COMPARE_SAMPLES, sampler: str = DEFAULT_FEW_STEP_SAMPLER) -> np.ndarray:
    """uint8 (n, 28, 28) samples of a run from `seed`: the same starting noise for every run.

    Cached per run, weights, seed and sampler setting, so a revisit is instant."""
    loaded = trained_model(run_dir, mtime, True)
    sched = scheduler_for(loaded.config)
    steps = 0 if sampler == "ddpm" else min(steps, sched.num_timesteps)
    config = SampleConfig(sampler=sampler, steps=steps, n=n, seed=seed)
    return sample(loaded.model, sched, config, pixel_range=loaded.config.train.pixel_range,
                  clip_default=loaded.config.train.clip_denoised, device=DEVICE,
                  prediction=loaded.config.train.prediction, shape=loaded.config.data.shape).images


@st.cache_data(show_spinner=False, max_entries=64)
def timestep_losses(run_dir: str, mtime: float, buckets: int = 10, n_images: int = BUCKET_IMAGES,
                    seed: int = 0, space: str = "eps") -> list[tuple[int, int, float]]:
    """(t_low, t_high, loss) per bucket on the first `n_images` test images of the run's dataset;
    `space` "eps" is the training loss, "x0" the error of the predicted clean image in [0, 1] units."""
    loaded = trained_model(run_dir, mtime, True)
    test = data_source.run_images(loaded.config.data, "test")  # a folder run: its training images
    result = loss_by_timestep(loaded.model, scheduler_for(loaded.config), test.images[:n_images],
                              pixel_range=loaded.config.train.pixel_range, buckets=buckets, seed=seed,
                              device=DEVICE, prediction=loaded.config.train.prediction)
    return [(b.t_low, b.t_high, b.loss if space == "eps" else b.x0_loss) for b in result]


@st.cache_data(show_spinner=False, max_entries=32)
def forward_example(dataset_name: str, index: int, timesteps: int, schedule: str, pixel_range: str,
                    noise_seed: int, scale_to_timesteps: bool = True) -> dict[str, np.ndarray]:
    """x_0, ε and x_t for every t in 1..T (uint8) of one dataset image, and ᾱ_t.

    All T frames at once (T·784 bytes): the t slider then only indexes, it never recomputes.
    """
    images = data_source.source_images(dataset_name)   # a built-in dataset or a run's own images
    sched = scheduler(ScheduleConfig(timesteps=timesteps, schedule=schedule, scale_to_timesteps=scale_to_timesteps))
    x_0 = to_model_range(images.images[index:index + 1], pixel_range)            # (1, 1, 28, 28)
    noise = torch.randn(x_0.shape, generator=torch.Generator().manual_seed(noise_seed))
    t_all = torch.arange(1, timesteps + 1)
    x_t = sched.add_noise(x_0.expand(timesteps, -1, -1, -1), t_all, noise.expand(timesteps, -1, -1, -1))
    return {
        "x0": to_display(to_uint8(x_0, pixel_range).numpy())[0],
        "noise": to_display(to_uint8(noise, "symmetric").numpy())[0],  # ε shown with 0 as mid-grey
        "xt": to_display(to_uint8(x_t, pixel_range).numpy()),          # (T, H, W) or (T, H, W, 3)
        "alpha_bars": sched.alpha_bars.numpy(),
    }


def strip_timesteps(timesteps: int, count: int = 10) -> tuple[int, ...]:
    """`count` evenly spaced t in 1..T, always including 1 and T, like the book's figure."""
    values = np.unique(np.linspace(1, timesteps, min(count, timesteps)).round().astype(int))
    return tuple(int(v) for v in values)


@st.cache_data(show_spinner=False, max_entries=32)
def forward_seconds(run_dir: str, mtime: float, use_ema: bool, batch: int) -> float:
    """One forward pass of `batch` images through this run's network, timed here after warm-up: the
    estimates' fallback before this machine has recorded any work with the network."""
    loaded = trained_model(run_dir, mtime, use_ema)
    return estimates.measure_forward_seconds(loaded.model, batch, DEVICE, shape=loaded.config.data.shape)


@st.cache_data(show_spinner=False, max_entries=16)
def config_forward_seconds(config: ModelConfig, batch: int, shape: tuple[int, int, int] = (1, 28, 28)) -> float:
    """The same for a network not trained yet (the Train form's estimate), at fresh weights on the CPU
    (training picks its device itself; the CPU is the slower, so the estimate errs long)."""
    return estimates.measure_forward_seconds(build_model(config), min(batch, 256), "cpu",
                                             shape=shape) * max(1.0, batch / 256)


def sampling_estimate(info: runs.RunInfo, sampler: str, steps: int, n: int, use_ema: bool = True,
                      guided: bool = False) -> estimates.Estimate:
    """How long sampling `n` images of this run takes here (steps: per batch; DDPM: T)."""
    def calibrate(batch: int) -> float:
        return forward_seconds(str(info.path), weights_mtime(info.path, use_ema), use_ema, batch)

    steps = info.config.schedule.timesteps if sampler == "ddpm" else steps
    return estimates.estimate_sampling(estimates.read_timings(info.path.parent), estimates.network_key(info.config.model, info.config.data.shape),
                                       DEVICE.type, sampler + ("+cfg" if guided else ""), steps, n,
                                       SampleConfig.batch_size, calibrate)


def training_estimate(runs_folder: Path, config: RunConfig, steps: int) -> estimates.Estimate:
    """How long `steps` optimiser steps of this config take here."""
    # "auto" is what this machine picks; a named device is taken as named (Train says if it is missing).
    device = resolve_device("auto").type if config.train.device == "auto" else config.train.device.split(":")[0]
    work = estimates.Work("train", estimates.network_key(config.model, config.data.shape), device,
                          config.train.batch_size)
    found = estimates.estimate_steps(estimates.read_timings(runs_folder), work, steps,
                                     lambda batch: config_forward_seconds(config.model, batch, config.data.shape))
    assert found is not None  # a calibration was given
    return found


@st.cache_resource(show_spinner=False, max_entries=64)
def network_cost(config: ModelConfig, image_size: int = 28) -> dict:
    """Parameters and GFLOP per image (forward; forward + backward) of a network at the run's image size,
    counted once."""
    return model_cost(config, image_size)
