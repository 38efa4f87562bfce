"""Shared fixtures: tiny generated images and tiny configs, so unit tests take seconds on 2 cores."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core.config import ModelConfig, RunConfig, ScheduleConfig, TrainConfig
from core.data.datasets import ImageSet

REPO = Path(__file__).resolve().parents[1]
# Tests share 2 cores with each other's subprocesses; one thread each avoids oversubscription.
# An explicit OMP_NUM_THREADS wins: on a busy machine two spinning threads per process run ~8x slower.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


def make_tiny_images(n: int = 256, seed: int = 0) -> ImageSet:
    """Bright rectangles on black, 10 classes by position: enough structure to learn in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.zeros((n, 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=gen)
    for i in range(n):
        r, c = divmod(int(labels[i]), 5)
        top, left = 4 + r * 10, 2 + c * 5
        images[i, 0, top:top + 10, left:left + 5] = int(torch.randint(150, 256, (1,), generator=gen))
    return ImageSet(images=images, labels=labels, dataset="fashion_mnist", split="train")


def tiny_config(**train_changes) -> RunConfig:
    """A run that trains in about a second: small ImprovedUNet, T = 20, CPU."""
    train = TrainConfig(optimizer="adamw", lr=2e-3, batch_size=32, epochs=1,
                        max_steps=6, device="cpu", sample_every_epochs=0, grid_steps=5,
                        checkpoint_every_s=0.0, log_every=2, channels_last=False, pixel_range="symmetric")
    return RunConfig(
        model=ModelConfig(name="improved_unet", base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                          attention=False),
        schedule=ScheduleConfig(timesteps=20),
        train=replace(train, **train_changes),
    )


def as_format(config: dict, version: int) -> dict:
    """A current config dict written as format `version` (1-4): the data section folded back into
    `train.dataset`, as every run under checkpoints/ holds it."""
    old = {k: v for k, v in config.items() if k != "data"}
    old["train"] = {**config["train"], "dataset": config.get("data", {}).get("dataset", "fashion_mnist")}
    return {**old, "format_version": version}


@pytest.fixture
def tiny_images() -> ImageSet:
    return make_tiny_images()


@pytest.fixture
def tiny_run(tmp_path, tiny_images) -> Path:
    """A finished tiny run folder (with EMA) in a temporary runs dir."""
    from core.store import runs
    from core.train.training import train_run
    run_dir = runs.create_run(tmp_path / "runs", "tiny", tiny_config(ema_decay=0.9))
    train_run(run_dir, images=tiny_images)
    return run_dir
